"""`python -m nearl_rt.predict CKPT INPUTS...`: top-k classes with probabilities for image files, folders
of images (PNG/JPEG/16-bit TIFF/DICOM, ...), or the images of a dataset file (.npz / split .json,
`--split`); `--frames each` predicts every frame of a multi-frame file (named FILE:frame=N). Prints CSV
(`input,rank,class,probability`), or writes CSV / JSON to `--output` (by its extension). The probabilities are
the model's calibrated ones; `--decision` (binary models) adds the class decided at the stored threshold.
A multi-label model lists every finding's probability (unless --topk is given) and, as `decision`, the findings at
or above their stored thresholds (';'-joined; 0.5 for a finding without one).
`--explain OUTDIR` also writes a saliency map per image (PNG overlay + .npy: nearl_rt.saliency, docs/explain.md)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from nearl_rt.core.imaging import expand_frames
from nearl_rt.core.atomic import atomic_output
from nearl_rt.classifier import load_classifier, resolve_device
from nearl_rt.core.cli import run_cli
from nearl_rt.data import (DataError, Preprocess, Split, add_inference_arguments, intensity_from_args, is_image_file,
                           read_dataset, skip_summary)
from nearl_rt.core.errors import NearlError
from nearl_rt.core.session import binary_threshold
from nearl_rt.saliency import DEFAULT_METHOD, METHODS, NEEDS_CHECKPOINT, class_index, write_explanations


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.predict", description=__doc__)
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file, run directory (its best.pt) or exported .onnx file")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder of images, or .npz / split .json")
    p.add_argument("--split", default="test", help="which split of a dataset file to read")
    p.add_argument("--image-root", help="folder a split JSON's paths are relative to")
    p.add_argument("--limit", type=int, help="predict the first N images only")
    p.add_argument("--topk", type=int, help="classes per image (default 1; multi-label: every finding)")
    p.add_argument("--output", help="write .csv or .json here instead of printing CSV")
    p.add_argument("--decision", action="store_true",
                   help="binary models: also the class decided at the stored operating point's threshold")
    p.add_argument("--explain", metavar="OUTDIR",
                   help="also write per image a saliency overlay (PNG) and its map (.npy) here; needs the checkpoint")
    p.add_argument("--class", dest="explain_class", metavar="NAME",
                   help="--explain: the class to explain (default: each image's predicted class)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help="--explain: the saliency method")
    add_inference_arguments(p)
    return p


def collect_inputs(inputs: list, split: str, image_root, frames: str = "refuse") -> tuple[list, list]:
    """(names, sources) for every input image, in the order given (folders sorted); frames="each": one per
    frame of a multi-frame file, named FILE:frame=N (N from 1)."""
    names, sources = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not files:
                raise DataError(f"folder {path} holds no image files (.png, .jpg, .bmp, .tif, ...)")
            names += [str(p) for p in files]
            sources += [str(p) for p in files]
        elif path.suffix in (".npz", ".json"):
            part = read_dataset(path, image_root, names_matter=False).split(split)
            names += [s if isinstance(s, str) else f"{path}:{split}:{i}" for i, s in enumerate(part.sources)]
            sources += part.sources
        elif path.is_file():
            names.append(str(path))
            sources.append(str(path))
        else:
            raise DataError(f"input not found: {path}")
    if frames == "each":  # after listing, so dataset files' images are expanded too
        expanded, origin = expand_frames(sources)
        names = [str(s) if s is not sources[o] else names[o] for s, o in zip(expanded, origin)]
        sources = expanded
    return names, sources


def rows(names: list, probs: np.ndarray, class_names: list, topk: int, threshold=None, findings=None) -> list:
    """Per image its top-k classes; with a binary model's threshold also the class decided at it; with a multi-label
    model's per-finding thresholds (`findings`, {finding: t}) the findings decided present."""
    out = []
    order = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
    for name, p, top in zip(names, probs, order):
        out.append({"input": name, "top": [{"class": class_names[c], "probability": float(p[c])} for c in top]})
        if threshold is not None:
            out[-1]["decision"] = class_names[int(p[1] >= threshold)]
        if findings is not None:
            out[-1]["decision"] = ";".join(c for c, pc in zip(class_names, p) if pc >= findings[c])
    return out


def to_csv(results: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    decided = bool(results) and "decision" in results[0]
    w.writerow(["input", "rank", "class", "probability"] + (["decision"] if decided else []))
    for r in results:
        for rank, t in enumerate(r["top"], 1):
            w.writerow([r["input"], rank, t["class"], f"{t['probability']:.6f}"] + ([r["decision"]] if decided else []))
    return buf.getvalue()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (args.topk is not None and args.topk < 1) or (args.limit is not None and args.limit < 1):
        raise NearlError(f"--topk and --limit must be >= 1 (got {args.topk}, {args.limit})")
    if args.output and Path(args.output).suffix not in (".csv", ".json"):
        raise NearlError(f"--output {args.output}: use a .csv or .json file name")
    if args.explain and Path(args.checkpoint).suffix == ".onnx":
        raise NearlError(f"--explain: {NEEDS_CHECKPOINT}")
    names, sources = collect_inputs(args.inputs, args.split, args.image_root, args.frames)
    if args.limit is not None:
        names, sources = names[:args.limit], sources[:args.limit]
    classifier, extra = load_classifier(args.checkpoint, pretrained=args.pretrained, backend=args.backend,
                                    device=resolve_device(args.device))
    findings = {c: classifier.calibration.thresholds.get(c, 0.5) for c in classifier.class_names} \
        if classifier.multi_label else None
    if args.topk is None:
        args.topk = len(classifier.class_names) if findings else 1
    if args.topk > len(classifier.class_names):
        raise NearlError(f"--topk {args.topk} exceeds the checkpoint's {len(classifier.class_names)} classes")
    if args.explain:
        class_index(classifier, args.explain_class)  # an unknown name fails before any work
    threshold = binary_threshold(classifier.class_names, classifier.calibration.thresholds) \
        if args.decision and not findings else None
    split = Split(sources, np.zeros(len(sources), dtype=np.int64))
    preprocess = Preprocess(classifier.preprocess_cfg,
                            intensity=intensity_from_args(args, extra.get("intensity"), args.checkpoint))
    probs, kept, skipped = classifier.probabilities(split, preprocess, args.batch_size, args.skip_bad_images)
    results = rows([names[i] for i in kept], probs, classifier.class_names, args.topk, threshold, findings)
    if skipped:
        print(skip_summary(skipped), file=sys.stderr)
    if args.output is None:
        sys.stdout.write(to_csv(results))
    else:
        text = json.dumps(results, indent=1) + "\n" if args.output.endswith(".json") else to_csv(results)
        with atomic_output(Path(args.output)) as tmp:
            tmp.write_text(text)
        print(f"wrote {len(results)} predictions to {args.output}")
    if args.explain:
        written = write_explanations(classifier, [names[i] for i in kept], [sources[i] for i in kept], preprocess,
                                     args.explain, class_name=args.explain_class, method=args.method)
        print(f"wrote {len(written)} saliency overlays (.png) and maps (.npy) to {args.explain}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt.predict"))
