"""`python -m nearl_rt.evaluate CKPT... --data PATH --split test`: accuracy, macro-F1, balanced accuracy,
one-vs-rest AUC, per-class accuracy and the confusion matrix of a checkpoint (or run directory, which
means its best.pt). Several checkpoints, or one path with `{seed}` and `--seeds 0 1 2`, are evaluated
one by one and summarised as mean ± std."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nearl_rt.atomic import atomic_output
from nearl_rt.classifier import check_classes, load_classifier, resolve_device
from nearl_rt.cli import run_cli
from nearl_rt.data import (DataError, Preprocess, add_image_arguments, intensity_from_args, parse_classes, read_dataset,
                           skip_summary)
from nearl_rt.errors import NearlError
from nearl_rt.metrics import SUMMARY_KEYS, aggregate, classification_metrics
from nearl_rt.sampling import balanced_subset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.evaluate", description=__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint file or run directory; may hold {seed}")
    p.add_argument("--seeds", type=int, nargs="+", help="fill {seed} in CKPT with each of these")
    p.add_argument("--data", required=True, help="image folder tree, split .json, or MedMNIST .npz")
    p.add_argument("--image-root", help="folder the split JSON's paths are relative to")
    p.add_argument("--classes", help="comma-separated class names (default: from the data)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="evaluate a fixed class-balanced subset of N images (the first of each class)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) unreadable images")
    add_image_arguments(p, training=False)
    p.add_argument("--pretrained", help="the backbone weights file or download folder, if it moved since training")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    return p


def expand_checkpoints(paths: list, seeds) -> list:
    if seeds is None:
        missing = [p for p in paths if "{seed}" in p]
        if missing:
            raise NearlError(f"{missing[0]} holds {{seed}}: pass --seeds, e.g. --seeds 0 1 2")
        return paths
    if not all("{seed}" in p for p in paths):
        raise NearlError("--seeds needs '{seed}' in every CKPT path, e.g. runs/nearl_s{seed}")
    return [p.replace("{seed}", str(s)) for p in paths for s in seeds]


def format_result(name: str, m: dict) -> str:
    lines = [f"{name}: {m['num_images']} images"]
    lines += [f"  {k:>18}: {m[k]:.4f}" for k in SUMMARY_KEYS]
    lines += [f"  accuracy[{c}]: {'n/a' if a is None else f'{a:.4f}'}" for c, a in m["per_class_accuracy"].items()]
    lines.append(f"  confusion (rows true, cols predicted): {m['confusion_matrix']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise NearlError(f"--limit must be >= 1, got {args.limit}")
    if args.json and not Path(args.json).resolve().parent.is_dir():  # fail before the (slow) evaluation
        raise NearlError(f"cannot write {args.json}: directory {Path(args.json).parent} does not exist")
    checkpoints = expand_checkpoints(args.checkpoints, args.seeds)
    ds = read_dataset(args.data, args.image_root, parse_classes(args.classes), frames=args.frames)
    split = ds.split(args.split)
    if args.limit is not None:
        split = split.subset(balanced_subset(split.labels, args.limit))
    if len(split) == 0:
        raise DataError(f"the {args.split} split of {args.data} is empty")
    device = resolve_device(args.device)
    results = {}
    for ckpt in checkpoints:
        classifier, extra = load_classifier(ckpt, pretrained=args.pretrained, backend=args.backend, device=device)
        check_classes(classifier, ds.class_names, args.data)
        preprocess = Preprocess(classifier.model.preprocess_cfg,
                                intensity=intensity_from_args(args, extra.get("intensity"), ckpt))
        probs, kept, skipped = classifier.probabilities(split, preprocess, args.batch_size, args.skip_bad_images)
        m = classification_metrics(split.labels[kept], probs, classifier.class_names)
        m.update(method=extra.get("method", "nearl"), split=args.split, skipped_images=skipped)
        results[ckpt] = m
        print(format_result(ckpt, m), flush=True)
        if skipped:
            print(f"  {skip_summary(skipped)}")
    report = {"data": args.data, "split": args.split, "results": results}
    if len(results) > 1:
        report["summary"] = aggregate(list(results.values()))
        print(f"mean ± std over {len(results)} runs:")
        for k in SUMMARY_KEYS:
            print(f"  {k:>18}: {report['summary'][k]['mean']:.4f} ± {report['summary'][k]['std']:.4f}")
    if args.json:
        with atomic_output(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt.evaluate"))
