"""Experiment tracking for train and sweep (`--report-to tensorboard,mlflow`): scalars, the run's options as
hyper-parameters, and files (the sweep's plot) go to TensorBoard event files under the run folder
(RUN/tensorboard) and/or an MLflow run (default store: a `file:` store in RUN/mlruns; `--tracking-uri` another).
metrics.jsonl stays the record; these are views of it. Both packages are optional: `pip install 'nearl-rt[tracking]'`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

from nearl_rt.core.atomic import atomic_output
from nearl_rt.core.errors import NearlError

REPORTERS = ("tensorboard", "mlflow")
EXPERIMENT = "nearl-rt"
STATE_FILE = "tracking.json"  # the MLflow run id, so --resume and the sweep's test metrics reach the same run


def add_tracking_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report-to", default="none", metavar="LIST",
                   help="comma-separated: tensorboard (event files in OUT/tensorboard), mlflow, or none (default)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: file: store OUT/mlruns)")


def parse_report_to(text: str) -> list:
    names = [n.strip() for n in (text or "none").split(",") if n.strip()]
    bad = [n for n in names if n not in (*REPORTERS, "none")]
    if bad or ("none" in names and len(names) > 1):
        raise NearlError(f"--report-to {text!r}: use none or a comma-separated list of {', '.join(REPORTERS)}")
    return [n for n in names if n != "none"]


def missing_extra(package: str) -> NearlError:
    return NearlError(f"--report-to needs the {package} package: pip install 'nearl-rt[tracking]'")


def _plain(value):
    """A hyper-parameter value as TensorBoard/MLflow take it: numbers, strings and booleans; others as JSON."""
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value)


class TensorBoard:
    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_extra("tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def params(self, values: dict) -> None:
        from torch.utils.tensorboard.summary import hparams
        for summary in hparams({k: _plain(v) for k, v in values.items()}, {}):
            self.writer.file_writer.add_summary(summary)

    def metrics(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image
            self.writer.add_image(path.stem, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, out: Path, uri: Optional[str], run_name: str):
        try:
            import mlflow
        except ImportError:
            raise missing_extra("mlflow") from None
        if uri is None:
            uri = (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # mlflow 3 keeps its file store in maintenance mode behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        state = out / STATE_FILE
        stored = json.loads(state.read_text()) if state.is_file() else {}
        if stored.get("mlflow_uri") == uri:
            self.run_id = stored["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(EXPERIMENT)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            with atomic_output(state) as tmp:
                tmp.write_text(json.dumps({"mlflow_uri": uri, "mlflow_run_id": self.run_id}) + "\n")

    def params(self, values: dict) -> None:
        from mlflow.entities import Param
        self.client.log_batch(self.run_id, params=[Param(k, str(_plain(v))) for k, v in values.items()])

    def metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Tracker:
    """The reporters --report-to names (none: every call does nothing)."""

    def __init__(self, report_to: str, out: Path, tracking_uri: Optional[str] = None):
        names = parse_report_to(report_to)
        self.backends = [TensorBoard(out) if n == "tensorboard" else MLflow(out, tracking_uri, out.name)
                         for n in names]

    def params(self, values: dict) -> None:
        for b in self.backends:
            b.params(values)

    def metrics(self, values: dict, step: int) -> None:
        for b in self.backends:
            b.metrics(values, step)

    def artifact(self, path) -> None:
        for b in self.backends:
            b.artifact(Path(path))

    def close(self) -> None:
        for b in self.backends:
            b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
