"""`python -m nearl_rt.bench.export_verification`: how often the export's verification refuses a correct file, and
how often it catches a wrong one.

For every preset, interaction mode and seed: a model with random adapters (nearl_rt.adapters.perturb_adapters,
`--noise` sigma), exported without verification, then verified (nearl_rt.export.onnx.verify_onnx): a correct
export must pass. Then the same file with one weight of the image projection moved by each of `--bumps` x its
largest |weight| should be refused (a corrupted or mis-converted weight; the smallest bumps are within the float32
noise of some models, so their catch rate says how small a corruption the check sees). Prints one line per run and
a summary (refusals of correct files, catches of wrong ones per bump, the largest error ratios seen); --out writes
every figure as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from nearl_rt.core.atomic import atomic_output
from nearl_rt.core.cli import run_cli
from nearl_rt.core.errors import RandomBackboneWarning

CLASSES = ["normal lungs", "pneumonia with consolidation in the left lower lobe", "a nodule"]
# The image projection to the joint space: open_clip's ViT, timm's ViT (BiomedCLIP).
PROJECTIONS = ("model.backbone.visual.proj", "model.backbone.visual.head.proj.weight")


def build(preset: str, mode: str, seed: int, noise: float):
    """A model with a random backbone and random adapters (both from `seed`) and three classes, on the reference
    ops."""
    import torch
    from nearl_rt.adapters import perturb_adapters
    from nearl_rt.model import build_model
    torch.manual_seed(seed)
    model = perturb_adapters(build_model(preset, interaction=mode, backend="torch"), seed=seed, noise=noise).eval()
    model.set_classes(CLASSES, "a chest x-ray showing {}.")
    return model


def bumped(src: Path, dst: Path, bump: float) -> Path:
    """`src` with one weight of the image projection moved by bump x max |weight|."""
    proto = onnx.load(str(src))
    init = next((i for i in proto.graph.initializer if i.name in PROJECTIONS), None)
    if init is None:
        raise ValueError(f"{src} has none of the initializers {PROJECTIONS} to perturb")
    a = numpy_helper.to_array(init).copy()
    a.flat[a.size // 3] += bump * np.abs(a).max()
    init.CopyFrom(numpy_helper.from_array(a, init.name))
    onnx.save(proto, str(dst))
    return dst


def run_one(preset: str, mode: str, seed: int, noise: float, bumps: list, workdir: Path) -> dict:
    from nearl_rt.export.graph import export_module
    from nearl_rt.export.onnx import ExportError, export_model, verify_onnx
    model = build(preset, mode, seed, noise)
    module = export_module(model)
    path = export_model(model, workdir / "m.onnx", verify=False)
    row = {"preset": preset, "mode": mode, "seed": seed}
    try:
        row["correct"] = verify_onnx(path, module)
    except ExportError as e:
        row["correct"] = {"refused": str(e)}
    row["wrong_caught"] = {}
    for bump in bumps:
        try:
            verify_onnx(bumped(path, workdir / "bad.onnx", bump), module)
            row["wrong_caught"][str(bump)] = False
        except ExportError:
            row["wrong_caught"][str(bump)] = True
    return row


def summary(rows: list) -> dict:
    ok = [r["correct"] for r in rows if "refused" not in r["correct"]]
    return {"runs": len(rows), "correct_refused": len(rows) - len(ok),
            "wrong_caught": {bump: sum(r["wrong_caught"][bump] for r in rows) for bump in rows[0]["wrong_caught"]},
            "max_rms_ratio": max((c["rms_error"]["onnxruntime"] / c["scale"] for c in ok), default=None),
            "max_worst_ratio": max((c["max_error"]["onnxruntime"] / c["scale"] for c in ok), default=None),
            "scale_range": [min((c["scale"] for c in ok), default=None), max((c["scale"] for c in ok), default=None)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.bench.export_verification", description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,tiny_bert", help="comma-separated presets (default %(default)s)")
    p.add_argument("--modes", default="bidirectional,text_cacheable", help="comma-separated interaction modes")
    p.add_argument("--seeds", type=int, default=50, help="seeds 0..N-1 per preset and mode (default %(default)s)")
    p.add_argument("--noise", type=float, default=0.3, help="adapter perturbation sigma (default %(default)s)")
    p.add_argument("--bumps", default="0.01,0.1",
                   help="comma-separated: a wrong file per value, one projection weight moved by it x max |weight| "
                        "(default %(default)s)")
    p.add_argument("--out", type=Path, help="write every run's figures and the summary as JSON")
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: give at least 1")
    try:
        bumps = [float(b) for b in args.bumps.split(",")]
    except ValueError:
        raise ValueError(f"--bumps {args.bumps!r}: give comma-separated numbers, e.g. 0.01,0.1") from None
    if args.out and not args.out.resolve().parent.is_dir():
        raise ValueError(f"cannot write {args.out}: its directory does not exist")
    warnings.simplefilter("ignore", RandomBackboneWarning)
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nearl-verify-") as workdir:
        for preset in args.presets.split(","):
            for mode in args.modes.split(","):
                for seed in range(args.seeds):
                    row = run_one(preset, mode, seed, args.noise, bumps, Path(workdir))
                    c = row["correct"]
                    verdict = f"REFUSED ({c['refused']})" if "refused" in c else (
                        f"kept: ORT rms {c['rms_error']['onnxruntime']:.2g} (worst {c['max_error']['onnxruntime']:.2g}), "
                        f"PyTorch rms {c['rms_error']['pytorch']:.2g}"
                        f", bound rms {c['bound']['rms']:.2g} / max {c['bound']['max']:.2g}")
                    wrong = ", ".join(f"{'caught' if caught else 'MISSED'} at {bump}"
                                      for bump, caught in row["wrong_caught"].items())
                    print(f"{preset} {mode} seed {seed}: {verdict}; wrong files {wrong}", flush=True)
                    rows.append(row)
    result = {"settings": vars(args) | {"out": str(args.out)}, "summary": summary(rows), "runs": rows,
              "wall_s": time.perf_counter() - start}
    s = result["summary"]
    caught = ", ".join(f"{n} of {s['runs']} at {bump}" for bump, n in s["wrong_caught"].items())
    print(f"{s['runs']} correct exports: {s['correct_refused']} refused; wrong files caught: {caught}; largest "
          f"ORT/scale ratio rms {s['max_rms_ratio']:.3g}, worst logit {s['max_worst_ratio']:.3g}; "
          f"{result['wall_s']:.0f} s")
    if args.out:
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt.bench.export_verification"))
