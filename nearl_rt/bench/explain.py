"""`python -m nearl_rt.bench.explain`: how good and how costly the saliency maps (nearl_rt.saliency) are
(docs/explain.md).

- `bright-patch`: images whose class is a bright square at a random position, a tiny model's adapters
  trained to find it (seconds on a CPU); the share of test images of that class whose saliency peak falls
  inside the square, and the deletion test (nearl_rt.faithfulness) on them, per method.
- `faithfulness CKPT --data PATH`: the deletion test of a checkpoint on a dataset's split.
- `cost --preset vit_b16`: the time of one map per method for one image (random backbone weights: the time
  does not depend on them), and of ordinary inference of the explained model vs an untouched copy (rounds
  interleaved).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from nearl_rt.bench.harness import machine_info, summarize, time_rounds
from nearl_rt.classifier import Classifier, load_classifier
from nearl_rt.config import PRESETS
from nearl_rt.core.atomic import atomic_output
from nearl_rt.core.cli import run_cli
from nearl_rt.core.errors import NearlError, RandomBackboneWarning
from nearl_rt.core.preprocess import resize_crop_geometry
from nearl_rt.data import Preprocess, Split, intensity_from_args, load_images, read_dataset
from nearl_rt.saliency import METHODS, explain_sources, render_overlay, saliency_maps
from nearl_rt.faithfulness import deletion_test
from nearl_rt.model import build_model

BRIGHT_CLASSES = ["plain noise", "a bright square"]
BRIGHT_TEMPLATE = "an image of {}."
OVERLAYS = 3  # example overlays per method (--overlays)


def bright_patch_set(n: int, seed: int, shape: tuple = (64, 80), side: int = 24,
                     size: int = 32) -> tuple[list, np.ndarray, np.ndarray]:
    """n grey uint8 images of `shape` (rows, columns): noise in 60..180 (around the mean colour deleted patches
    get, so that deleting looks like no square), and for label 1 (every other image) a `side`-pixel square of
    230..255 at a random position inside the part the model sees (the centre crop of a `size`-pixel input).
    Returns (images, labels [n], boxes [n, 4] = top, left, bottom, right; -1 for label 0)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    (rw, rh), (left, top) = resize_crop_geometry(cols, rows, size)
    y0, x0 = int(np.ceil(top * rows / rh)), int(np.ceil(left * cols / rw))
    y1, x1 = int((top + size) * rows / rh), int((left + size) * cols / rw)
    images, labels, boxes = [], np.arange(n) % 2, np.full((n, 4), -1)
    for i in range(n):
        img = rng.integers(60, 181, shape).astype(np.uint8)
        if labels[i]:
            t, l = rng.integers(y0, y1 - side + 1), rng.integers(x0, x1 - side + 1)
            img[t:t + side, l:l + side] = rng.integers(230, 256, (side, side))
            boxes[i] = (t, l, t + side, l + side)
        images.append(img)
    return images, labels, boxes


def fit_adapters(model, images: list, labels: np.ndarray, *, steps: int = 50, batch_size: int = 32,
                 lr: float = 3e-3, seed: int = 0):
    """Train the adapters (cross-entropy, AdamW, no augmentation) on uint8 images; returns the model in eval()."""
    x = Preprocess(model.preprocess_cfg).eval(load_images(Split(images, labels))[0])
    y = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[:batch_size]
        loss = torch.nn.functional.cross_entropy(model.classify(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def peak_in_box(saliency: np.ndarray, box) -> bool:
    """Whether the map's largest value (its first, row-major) lies inside box (top, left, bottom, right)."""
    r, c = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    return bool(box[0] <= r < box[2] and box[1] <= c < box[3])


def bright_patch_model(preset: str = "tiny", interaction: str = "bidirectional", *, train: int = 64,
                       steps: int = 50, seed: int = 0):
    """A `preset` model (random backbone from `seed`) whose adapters learnt the bright-square set."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        torch.manual_seed(seed)
        model = build_model(preset, interaction=interaction, backbone_init_seed=seed)
    model.set_classes(BRIGHT_CLASSES, BRIGHT_TEMPLATE)
    images, labels, _ = bright_patch_set(train, seed)
    return fit_adapters(model, images, labels, steps=steps, seed=seed)


def bright_patch_report(model, *, test: int = 64, seed: int = 1, methods=METHODS, overlays=None) -> dict:
    """Accuracy, peak-in-square rate (images of the square's class) and deletion summary per method;
    `overlays`: a folder to draw the first OVERLAYS square images' maps into (METHOD_N.png)."""
    images, labels, boxes = bright_patch_set(test, seed)
    classifier = Classifier(model)
    preprocess = Preprocess(model.preprocess_cfg)
    x = preprocess.eval(load_images(Split(images, labels))[0])
    with torch.no_grad():
        accuracy = float((model.classify(x).argmax(1).numpy() == labels).mean())
    squares = np.flatnonzero(labels == 1)
    report = {"accuracy": accuracy, "test_images": test, "square_images": len(squares)}
    for method in methods:
        explanations = list(explain_sources(classifier, [images[i] for i in squares], preprocess,
                                            class_name=BRIGHT_CLASSES[1], method=method))
        found = [peak_in_box(e.saliency, boxes[i]) for i, e in zip(squares, explanations)]
        if overlays is not None:
            Path(overlays).mkdir(parents=True, exist_ok=True)
            for n, e in enumerate(explanations[:OVERLAYS]):
                render_overlay(e, Path(overlays) / f"{method}_{n}.png")
        report[method] = {"peak_in_square": float(np.mean(found)),
                          "deletion": deletion_test(classifier, x[squares], method).summary()}
    return report


def cost_report(preset: str, interaction: str, rounds: int, methods=METHODS, inference_rounds: int = 5) -> dict:
    """ms per map (batch 1) per method; then ordinary inference (batch 1) of the explained model and of an
    untouched copy made before explaining, interleaved: explaining must leave its speed as it was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        model = build_model(preset, interaction=interaction).eval()
    model.set_classes(["normal", "pneumonia"], "a chest X-ray showing {}.")
    untouched = copy.deepcopy(model)
    classifier = Classifier(model)
    size = model.preprocess_cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = [torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cpu = torch.device("cpu")
    maps = {m: (lambda images, m=m: saliency_maps(classifier, images, [1], m)) for m in methods}
    times, errors = time_rounds(maps, x, warmup=1, iters=rounds, device=cpu)

    def classify(net):
        def run(images):
            with torch.no_grad():
                net.classify(images)
        return run

    pair = {"classify_untouched": classify(untouched), "classify_explained": classify(model)}
    inference, more_errors = time_rounds(pair, x, warmup=1, iters=inference_rounds, device=cpu)
    if errors or more_errors:
        raise NearlError(f"timing failed: {errors or more_errors}")
    return {"preset": preset, "interaction": interaction, "rounds": rounds, "inference_rounds": inference_rounds,
            **{name: summarize(t, 1) for name, t in {**times, **inference}.items()}, "machine": machine_info(cpu)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.bench.explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bright-patch", help="peak-in-square rate and deletion test on the synthetic set")
    b.add_argument("--preset", default="tiny", choices=["tiny", "tiny_bert"])
    b.add_argument("--interaction", default="bidirectional", choices=["bidirectional", "text_cacheable"])
    b.add_argument("--train", type=int, default=64, help="training images (half of them with a square)")
    b.add_argument("--test", type=int, default=64, help="test images (half of them with a square)")
    b.add_argument("--steps", type=int, default=50, help="training steps (batch 32)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overlays", metavar="DIR", help=f"also draw the first {OVERLAYS} square images' maps here")
    f = sub.add_parser("faithfulness", help="the deletion test of a checkpoint on a dataset's split")
    f.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run directory")
    f.add_argument("--data", required=True, help="image folder tree, split .json or MedMNIST .npz")
    f.add_argument("--split", default="test")
    f.add_argument("--limit", type=int, help="the first N images of the split only")
    f.add_argument("--random-draws", type=int, default=5, help="random patch sets per image and fraction")
    f.add_argument("--seed", type=int, default=0, help="seed of the random patches and tie-breaks")
    c = sub.add_parser("cost", help="time of one map per method, and of ordinary inference around it")
    c.add_argument("--preset", default="vit_b16", choices=sorted(PRESETS))
    c.add_argument("--interaction", default="bidirectional", choices=["bidirectional", "text_cacheable"])
    c.add_argument("--rounds", type=int, default=3, help="timed rounds of the maps (interleaved)")
    c.add_argument("--inference-rounds", type=int, default=5,
                   help="timed rounds of ordinary inference, explained model vs an untouched copy (interleaved)")
    for s in (b, f, c):
        s.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
        s.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    return p


def faithfulness_report(args) -> dict:
    classifier, extra = load_classifier(args.checkpoint, device=torch.device("cpu"))
    if not isinstance(classifier, Classifier):
        raise NearlError("the deletion test needs a checkpoint (.pt or run directory), not an exported .onnx file")
    intensity = intensity_from_args(argparse.Namespace(intensity=None, dicom_voi=None), extra.get("intensity"),
                                    args.checkpoint)
    part = read_dataset(args.data).split(args.split)
    if args.limit is not None:
        part = part.subset(range(min(args.limit, len(part))))
    images = load_images(part, intensity=intensity)[0]
    x = Preprocess(classifier.preprocess_cfg, intensity=intensity).eval(images)
    return {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split, "images": len(x),
            **{m: deletion_test(classifier, x, m, random_draws=args.random_draws, seed=args.seed).summary()
               for m in args.methods}}


def print_deletion(method: str, summary: dict) -> None:
    print(f"  {method} deletion test (mean drop of the class probability):")
    for frac, s in summary.items():
        print(f"    {frac:.0%} of patches ({s['deleted']}): salient {s['salient']:+.4f}, random {s['random']:+.4f}, "
              f"salient larger on {s['salient_larger']:.0%} of images")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.command == "bright-patch":
        model = bright_patch_model(args.preset, args.interaction, train=args.train, steps=args.steps, seed=args.seed)
        report = {"preset": args.preset, "interaction": args.interaction, "train": args.train, "steps": args.steps,
                  "seed": args.seed, **bright_patch_report(model, test=args.test, seed=args.seed + 1,
                                                           methods=args.methods, overlays=args.overlays)}
        print(f"bright-square set, {args.preset} {args.interaction}: test accuracy {report['accuracy']:.3f} "
              f"({report['test_images']} images)")
        for m in args.methods:
            print(f"  {m}: saliency peak inside the square on {report[m]['peak_in_square']:.1%} of "
                  f"{report['square_images']} images")
            print_deletion(m, report[m]["deletion"])
    elif args.command == "faithfulness":
        report = faithfulness_report(args)
        print(f"{args.checkpoint} on {args.data} ({args.split}, {report['images']} images):")
        for m in args.methods:
            print_deletion(m, report[m])
    else:
        report = cost_report(args.preset, args.interaction, args.rounds, args.methods, args.inference_rounds)
        print(f"{args.preset} {args.interaction}, one image, CPU ({torch.get_num_threads()} threads), median of "
              f"{args.rounds} interleaved rounds per map, {args.inference_rounds} per inference:")
        for name in [*args.methods, "classify_untouched", "classify_explained"]:
            print(f"  {name:>20}: {report[name]['median_ms']:9.1f} ms")
    report["seconds"] = time.perf_counter() - t0
    if args.json:
        with atomic_output(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt.bench.explain"))
