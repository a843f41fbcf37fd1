"""Exported tiny models shared by the export, runtime and C++ client tests (each exported once per run)."""
from __future__ import annotations

import atexit
import functools
import inspect
import shutil
import tempfile
from pathlib import Path

from nearl_rt.calibration import Calibration
from nearl_rt.export.onnx import export_model
from nearl_rt.export.preprocess_graph import export_preprocess_graph
from tests.helpers import CLASSES, perturb_adapters, tiny

TEMPLATE = "a chest x-ray showing {}."
# One uint8 step on one of the tiny model's 32x32 pixels weighs ~50x more than on one of vit_b16's 224x224
# (where export.preprocess_graph's 1e-5 holds with room: ~4e-7); measured here up to 1.4e-5.
TINY_PREPROCESS_PROBS_ATOL = 1e-4
# A calibration as nearl_rt.calibrate stores it: T far enough from 1 that softmax(logits / T) and softmax(logits)
# differ by far more than the parity tolerances; one-vs-rest thresholds for the 3 classes.
CALIBRATION = Calibration(2.5, "youden", {c: t for c, t in zip(CLASSES, (0.41, 0.27, 0.33))},
                          {"split": "val", "images": 30})
_DIR = Path(tempfile.mkdtemp(prefix="nearl-export-tests-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)


def _cached_by_full_arguments(fn):
    """lru_cache keyed on the arguments with defaults filled in: f(x) and f(x, preset="tiny") share one entry
    (two entries would export the same file twice)."""
    signature = inspect.signature(fn)
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return cached(*bound.args)
    return call


@_cached_by_full_arguments
def tiny_model(interaction: str, preset: str = "tiny"):
    """A tiny model with non-trivial adapters (an untrained one is the frozen backbone) and classes."""
    model = perturb_adapters(tiny(interaction, preset, backend="torch"), seed=3).eval()
    model.set_classes(CLASSES, TEMPLATE)
    return model


@_cached_by_full_arguments
def exported(interaction: str, fp16: bool = False, batch_size="dynamic", optimize: bool = False,
             opset=None, preset: str = "tiny") -> Path:
    name = f"{preset}-{interaction}-{'fp16' if fp16 else 'fp32'}-b{batch_size}-o{int(optimize)}-op{opset}.onnx"
    return export_model(tiny_model(interaction, preset), _DIR / name, fp16=fp16, batch_size=batch_size,
                        optimize=optimize, opset=opset, checkpoint_sha256="ab" * 32)


@_cached_by_full_arguments
def exported_calibrated(interaction: str) -> Path:
    """exported(interaction) of the same model with CALIBRATION: probs = softmax(logits / 2.5)."""
    return export_model(tiny_model(interaction), _DIR / f"tiny-{interaction}-calibrated.onnx",
                        checkpoint_sha256="cd" * 32, calibration=CALIBRATION)


@_cached_by_full_arguments
def exported_int8(interaction: str, method: str = "dynamic") -> Path:
    """exported(interaction) quantised to int8 (static: calibrated on 32 seeded random inputs), gates open:
    callers compare runtimes on this one file."""
    import numpy as np

    from nearl_rt.export.quantize import Gates, ImageSet, quantize
    path = _DIR / f"{interaction}-int8-{method}.onnx"
    calibration = ImageSet(np.random.default_rng(1).standard_normal((32, 3, 32, 32), dtype=np.float32))
    quantize(exported(interaction), path, method=method, calibration=calibration if method == "static" else None,
             gates=Gates(min_agreement=0.0, max_accuracy_change=100.0))
    return path


@_cached_by_full_arguments
def exported_with_preprocess(interaction: str, fp16: bool = False, batch_size="dynamic", optimize: bool = False,
                             opset=None, preset: str = "tiny", precision: str = "fp32") -> Path:
    """exported(...), or with precision "int8" / "int8_static" exported_int8(interaction, "dynamic" /
    "static"), or "calibrated" exported_calibrated(interaction), plus its preprocessing graph next to it
    (model.preprocess.onnx)."""
    if precision == "calibrated":
        path = exported_calibrated(interaction)
    elif precision.startswith("int8"):
        path = exported_int8(interaction, "static" if precision == "int8_static" else "dynamic")
    else:
        path = exported(interaction, fp16, batch_size, optimize, opset, preset)
    export_preprocess_graph(path, probs_atol=TINY_PREPROCESS_PROBS_ATOL)
    return path
