"""`python -m nearl_rt.calibrate CKPT --data DATA [--split val] [--operating-point RULE]`: fit a trained run's
temperature and decision thresholds on held-out labelled images and store them in its checkpoint.

The temperature T makes the probabilities honest: softmax(logits / T), fitted by negative log-likelihood; the
thresholds (one per class one-vs-rest, the positive class of a binary model) are chosen on those calibrated
probabilities by the rule: `youden` (default), `sensitivity=X` or `specificity=X`. The checkpoint (a run
directory means its best.pt) is rewritten atomically with extra["calibration"]; evaluate, predict and
export.onnx (which bakes T into the graph and records T and the thresholds in its metadata) use them.
Training does this itself on its validation shots; this command refits an existing run, e.g. on a larger
validation split. docs/evaluation.md defines the fit.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from nearl_rt.calibration import DEFAULT_RULE, RULE_HELP, Calibration, OperatingPointRule, fit_calibration
from nearl_rt.checkpoint import update_extra
from nearl_rt.classifier import load_classifier, resolve_checkpoint, resolve_device
from nearl_rt.core.cli import run_cli
from nearl_rt.core.errors import NearlError
from nearl_rt import multilabel
from nearl_rt.data import add_inference_arguments, add_label_arguments, dataset_from_args, intensity_from_args
from nearl_rt.evaluate import score_findings, score_split_of


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run directory (its best.pt); rewritten")
    p.add_argument("--data", required=True, help="image folder tree, split .json, or MedMNIST .npz")
    p.add_argument("--image-root", help="folder the split JSON's paths are relative to")
    p.add_argument("--data-classes", help="comma-separated names of the dataset's labels (default: from the data)")
    add_label_arguments(p)
    p.add_argument("--split", default="val", help="held-out labelled split to fit on (default: val; never the test split "
                                                  "you report on)")
    p.add_argument("--limit", type=int, help="fit on a fixed class-balanced subset of N images")
    p.add_argument("--operating-point", default=DEFAULT_RULE, metavar="RULE", help=f"{RULE_HELP} (default: youden)")
    add_inference_arguments(p)
    return p


def logits_of(classifier, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """Raw logits [N, C] (float32) of preprocessed images."""
    classifier.model.eval()
    with torch.no_grad():
        return torch.cat([classifier.logits(images[i:i + batch]).float().cpu()
                          for i in range(0, len(images), batch)]).numpy()


def calibrate_checkpoint(path, logits, labels, class_names, rule: OperatingPointRule,
                         fitted_on: Optional[dict] = None) -> tuple[Calibration, dict]:
    """Fit the temperature and thresholds on held-out raw logits [N, C] and labels [N] and store them in the
    checkpoint `path` (extra["calibration"], atomically). Returns (Calibration, fit report)."""
    calibration, report = fit_calibration(logits, labels, class_names, rule, fitted_on)
    update_extra(path, {"calibration": calibration.to_dict()})
    return calibration, report


def describe(calibration: Calibration, report: dict) -> str:
    """One line: the temperature, NLL and ECE before -> after on the fit images, the thresholds."""
    thresholds = ", ".join(f"p({c}) >= {t:.4f}" for c, t in calibration.thresholds.items())
    return (f"temperature {calibration.temperature:.4g} (NLL {report['nll']:.4f} -> {report['nll_calibrated']:.4f}, "
            f"ECE {report['ece']:.4f} -> {report['ece_calibrated']:.4f} on the {calibration.fitted_on['images']} fit "
            f"images); operating point {calibration.operating_point}: {thresholds}")


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def run(args: argparse.Namespace) -> Calibration:
    """Fit and store with build_parser's options: the library entry point behind `python -m nearl_rt.calibrate`."""
    rule = OperatingPointRule.parse(args.operating_point)
    if args.limit is not None and args.limit < 1:
        raise NearlError(f"--limit must be >= 1, got {args.limit}")
    if Path(args.checkpoint).suffix == ".onnx":
        raise NearlError(f"{args.checkpoint} is an exported file: calibrate its checkpoint, then export it again (the "
                         f"temperature is part of the graph)")
    ckpt = resolve_checkpoint(args.checkpoint)
    ds = dataset_from_args(args, args.data_classes)
    ds.split(args.split)  # exists, before the model is built
    if args.split == "test":
        print("warning: fitting on the test split: metrics reported on it afterwards are optimistic", file=sys.stderr)
    classifier, extra = load_classifier(ckpt, pretrained=args.pretrained, backend=args.backend,
                                        device=resolve_device(args.device))
    if classifier.multi_label:  # per-finding thresholds (nearl_rt.multilabel), temperature 1
        scored = score_findings(classifier, ds, args.split, limit=args.limit, batch_size=args.batch_size,
                                skip_bad=args.skip_bad_images,
                                intensity=intensity_from_args(args, extra.get("intensity"), ckpt))
        subset = "all images" if args.limit is None else f"the first {args.limit} images"
        calibration, unfitted = multilabel.calibrate_findings(ckpt, scored.logits, scored.labels, scored.class_names,
                                                              rule, {"data": os.path.abspath(args.data),
                                                                     "split": args.split, "subset": subset})
        print(f"{ckpt}: {multilabel.describe(calibration, unfitted)}")
        return calibration
    scored = score_split_of(classifier, ds, classifier.class_names, args.split, explicit=False, limit=args.limit,
                            batch_size=args.batch_size, skip_bad=args.skip_bad_images,
                            intensity=intensity_from_args(args, extra.get("intensity"), ckpt))
    subset = "all images" if args.limit is None else f"{args.limit}-image class-balanced subset"
    calibration, report = calibrate_checkpoint(ckpt, scored.logits, scored.labels, scored.class_names, rule,
                                               {"data": os.path.abspath(args.data), "split": args.split,
                                                "subset": subset})
    print(f"{ckpt}: {describe(calibration, report)}")
    return calibration


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt.calibrate"))
