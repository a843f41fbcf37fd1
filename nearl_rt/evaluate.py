"""`python -m nearl_rt.evaluate CKPT... --data PATH --split test`: accuracy, macro-F1, balanced accuracy,
one-vs-rest AUC, per-class accuracy and the confusion matrix of a checkpoint (or run directory, which
means its best.pt) or of an exported .onnx file (fp32, fp16 or int8, scored with onnxruntime, as it
is served). Several checkpoints, or one path with `{seed}` and `--seeds 0 1 2`, are evaluated
one by one and summarised as mean ± std.

`--classes a,b,c` scores that class set (images matched by class name; default: the checkpoint's own
classes). `--base-to-novel` scores base-test images among the base classes and novel-test images among
the novel classes (the split recorded at training, or `--base-classes` / `--novel-classes`) and reports
the harmonic mean of the two."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from nearl_rt.core.imaging import DEFAULT_POLICY, IntensityPolicy
from nearl_rt.core.atomic import atomic_output
from nearl_rt.classifier import Classifier, load_classifier, resolve_device
from nearl_rt.classsets import dataset_for_classes, split_base_novel
from nearl_rt.core.cli import run_cli
from nearl_rt.data import (DataError, Dataset, Preprocess, add_image_arguments, intensity_from_args, parse_classes,
                           read_dataset, skip_summary)
from nearl_rt.core.errors import NearlError
from nearl_rt.metrics import SUMMARY_KEYS, aggregate, classification_metrics, harmonic_mean
from nearl_rt.sampling import balanced_subset

PARTS = ("base", "novel", "hm")
B2N_KEYS = tuple(f"{part}_{k}" for part in PARTS for k in SUMMARY_KEYS)  # flat base/novel/HM summary keys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.evaluate", description=__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoint file, run directory or exported .onnx file; may hold {seed}")
    p.add_argument("--seeds", type=int, nargs="+", help="fill {seed} in CKPT with each of these")
    p.add_argument("--data", required=True, help="image folder tree, split .json, or MedMNIST .npz")
    p.add_argument("--image-root", help="folder the split JSON's paths are relative to")
    p.add_argument("--classes", help="comma-separated class names to score (default: the checkpoint's classes)")
    p.add_argument("--data-classes", help="comma-separated names of the dataset's labels (default: from the data)")
    p.add_argument("--base-to-novel", action="store_true",
                   help="score base and novel classes separately and report their harmonic mean")
    p.add_argument("--base-classes", help="comma-separated base classes (default: as recorded at training)")
    p.add_argument("--novel-classes", help="comma-separated novel classes (default: the other classes)")
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
    if "base" in m:
        lines = [f"{name}: base-to-novel"]
        for part in ("base", "novel"):
            lines.append("  " + format_result(f"{part} {m[part]['class_names']}", m[part]).replace("\n", "\n  "))
        lines += [f"  {'harmonic mean ' + k:>27}: {m['hm_' + k]:.4f}" for k in SUMMARY_KEYS]
        return "\n".join(lines)
    lines = [f"{name}: {m['num_images']} images"]
    lines += [f"  {k:>18}: {m[k]:.4f}" for k in SUMMARY_KEYS]
    lines += [f"  accuracy[{c}]: {'n/a' if a is None else f'{a:.4f}'}" for c, a in m["per_class_accuracy"].items()]
    lines.append(f"  confusion (rows true, cols predicted): {m['confusion_matrix']}")
    return "\n".join(lines)


def score_classes(classifier: Classifier, ds: Dataset, classes: Sequence[str], split: str, *, explicit: bool = True,
                  limit: Optional[int] = None, batch_size: int = 64, skip_bad: bool = False,
                  intensity: IntensityPolicy = DEFAULT_POLICY) -> dict:
    """Metrics of `classifier` scoring class set `classes` on the images of those classes in `split`
    (files read with the intensity policy `intensity`: the checkpoint's, see data.intensity_from_args)."""
    classifier.set_classes(classes)
    part = dataset_for_classes(ds, classes, explicit).split(split)
    if limit is not None:
        part = part.subset(balanced_subset(part.labels, limit))
    if len(part) == 0:
        raise DataError(f"the {split} split of {ds.path} has no images of classes {list(classes)}")
    preprocess = Preprocess(classifier.preprocess_cfg, intensity=intensity)
    probs, kept, skipped = classifier.probabilities(part, preprocess, batch_size, skip_bad)
    m = classification_metrics(part.labels[kept], probs, classifier.class_names)
    m["skipped_images"] = skipped
    return m


def evaluate_classifier(classifier: Classifier, extra: dict, ds: Dataset, split: str, *, classes=None,
                        base_to_novel: bool = False, base=None, novel=None, **kw) -> dict:
    """One run's metrics: on `classes` (default: its own), or base, novel and their harmonic means."""
    if not (base_to_novel or base is not None):
        own = classes is None
        return score_classes(classifier, ds, classifier.class_names if own else classes, split,
                             explicit=not own, **kw)
    if classes is not None:
        raise NearlError("--classes and --base-to-novel exclude each other (use --base-classes / --novel-classes)")
    if base is None and extra.get("base_classes"):
        base, novel = extra["base_classes"], extra["novel_classes"]
    base, novel = split_base_novel(ds.class_names, base, novel)
    m = {"base": score_classes(classifier, ds, base, split, **kw),
         "novel": score_classes(classifier, ds, novel, split, **kw)}
    for k in SUMMARY_KEYS:
        m[f"base_{k}"], m[f"novel_{k}"] = m["base"][k], m["novel"][k]
        m[f"hm_{k}"] = harmonic_mean(m["base"][k], m["novel"][k])
    return m


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def run(args: argparse.Namespace) -> dict:
    """Evaluate with build_parser's options, print the results (and write --json): the library entry point behind
    `python -m nearl_rt.evaluate`. Returns the report."""
    if args.limit is not None and args.limit < 1:
        raise NearlError(f"--limit must be >= 1, got {args.limit}")
    if args.json and not Path(args.json).resolve().parent.is_dir():  # fail before the (slow) evaluation
        raise NearlError(f"cannot write {args.json}: directory {Path(args.json).parent} does not exist")
    checkpoints = expand_checkpoints(args.checkpoints, args.seeds)
    ds = read_dataset(args.data, args.image_root, parse_classes(args.data_classes), frames=args.frames)
    device = resolve_device(args.device)
    b2n = args.base_to_novel or args.base_classes is not None
    results = {}
    for ckpt in checkpoints:
        classifier, extra = load_classifier(ckpt, pretrained=args.pretrained, backend=args.backend, device=device)
        m = evaluate_classifier(classifier, extra, ds, args.split, classes=parse_classes(args.classes),
                                base_to_novel=b2n, base=parse_classes(args.base_classes),
                                novel=parse_classes(args.novel_classes), limit=args.limit,
                                batch_size=args.batch_size, skip_bad=args.skip_bad_images,
                                intensity=intensity_from_args(args, extra.get("intensity"), ckpt))
        m.update(method=extra.get("method", "nearl"), split=args.split)
        results[ckpt] = m
        print(format_result(ckpt, m), flush=True)
        skipped = m["base"]["skipped_images"] + m["novel"]["skipped_images"] if b2n else m["skipped_images"]
        if skipped:
            print(f"  {skip_summary(skipped)}")
    report = {"data": args.data, "split": args.split, "results": results}
    if len(results) > 1:
        keys = B2N_KEYS if b2n else SUMMARY_KEYS
        report["summary"] = aggregate(list(results.values()), keys)
        print(f"mean ± std over {len(results)} runs:")
        for k in keys:
            print(f"  {k:>20}: {report['summary'][k]['mean']:.4f} ± {report['summary'][k]['std']:.4f}")
    if args.json:
        with atomic_output(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt.evaluate"))
