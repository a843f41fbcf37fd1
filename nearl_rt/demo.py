"""`python -m nearl_rt demo [--out DIR]`: the whole product in well under a minute of CPU time.

Trains a few-shot NEARL adapter (the `tiny` preset, random backbone weights: nothing is downloaded) on
the 56 real chest X-rays bundled with the package (`nearl_rt/demo_data`), evaluates it, exports it to
ONNX and serves a prediction with onnxruntime (`nearl_rt.NearlSession`), through the library functions behind
the command-line tools a user runs next (with the options those commands take). Prints where every artefact is
and the commands to try next.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from nearl_rt.core.errors import NearlError, RandomBackboneWarning
from nearl_rt.core.session import NearlSession

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEFAULT_OUT = "nearl-demo"
STEPS = 4
ARTEFACTS = {"run": "run directory (best.pt, metrics.jsonl, shots.json, ...)",
             "checkpoint": "checkpoint (the final model)", "eval": "evaluation (JSON)", "onnx": "ONNX model"}


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter commands to copy)."""
    try:
        return os.fspath(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return os.fspath(path)


def _step(n: int, title: str) -> float:
    print(f"\n[{n}/{STEPS}] {title}", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"      ({time.perf_counter() - t0:.1f} s)", flush=True)


def _train_evaluate_export(data: str, out: Path, progress: bool) -> None:
    from nearl_rt import evaluate, train
    from nearl_rt.core.cli import log_to_stderr
    from nearl_rt.export.onnx import export_checkpoint
    ckpt = os.fspath(out / "run" / "last.pt")

    t = _step(1, f"few-shot training: 16 images per class, {train.DEFAULT_STEPS} optimizer steps "
                 "(python -m nearl_rt.train, default options)")
    train.run(train.build_parser().parse_args(
        ["--data", data, "--preset", "tiny", "--shots", "16",
         "--template", "a chest X-ray showing {}.", "--out", os.fspath(out / "run")] + ([] if progress else ["--no-progress"])))
    _done(t)

    t = _step(2, "evaluation on the 16 held-out test images (python -m nearl_rt.evaluate)")
    evaluate.run(evaluate.build_parser().parse_args([ckpt, "--data", data, "--split", "test",
                                                     "--json", os.fspath(out / "eval.json")]))
    _done(t)

    t = _step(3, "ONNX export, verified against PyTorch before it is kept (python -m export.onnx)")
    log_to_stderr("nearl_rt.export")  # the verification figures, as the command shows them
    path, model = export_checkpoint(ckpt, out / "model.onnx")
    print(f"wrote {_shown(path)} ({path.stat().st_size / 2**20:.1f} MiB, {model.interaction}, "
          f"{len(model.class_names)} classes)")
    _done(t)


def run_demo(out, *, progress: bool = True) -> dict:
    """Train, evaluate, export and serve into `out` (a new or empty directory). Returns the artefact paths."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NearlError(f"--out {out} already exists and is not empty; remove it or pass --out NEW_DIR")
    if not (DEMO_DATA / "train").is_dir():
        raise NearlError(f"the bundled demo images are missing ({DEMO_DATA}); reinstall nearl-rt")
    data = _shown(DEMO_DATA)
    artefacts = {"run": out / "run", "checkpoint": out / "run" / "last.pt", "eval": out / "eval.json",
                 "onnx": out / "model.onnx"}
    start = time.perf_counter()
    print("nearl-rt demo: train -> evaluate -> export -> serve, on 56 real chest X-rays shipped with the package\n"
          "(PneumoniaMNIST, CC BY 4.0; see nearl_rt/demo_data/README.md).\n"
          "The backbone is the `tiny` preset with RANDOM weights (nothing is downloaded), so the accuracy below\n"
          "MEANS NOTHING: it shows the pipeline, not the model. Train with --pretrained on real CLIP weights for that.")
    with warnings.catch_warnings():  # said once above, not once per tool
        warnings.simplefilter("ignore", RandomBackboneWarning)
        _train_evaluate_export(data, out, progress)

    t = _step(4, "serving with onnxruntime alone (nearl_rt.NearlSession)")
    session = NearlSession(artefacts["onnx"])
    images = [p for c in session.class_names for p in sorted((DEMO_DATA / "test" / c).glob("*.png"))[:2]]
    for path, top in zip(images, session.predict([os.fspath(p) for p in images], top_k=2)):
        ranked = ", ".join(f"{name} {p:.3f}" for name, p in top)
        print(f"      {_shown(path)} (true: {path.parent.name}) -> {ranked}")
    _done(t)

    print("\nartefacts:")
    for key, path in artefacts.items():
        print(f"  {ARTEFACTS[key]}: {_shown(path)}")
    ckpt, onnx_path = _shown(artefacts["checkpoint"]), _shown(artefacts["onnx"])
    print("\nnext commands:\n"
          f"  python -m nearl_rt info {ckpt}\n"
          f"  python -m nearl_rt.predict {ckpt} {data}/test --topk 2\n"
          f"  python -m export.onnx {ckpt} -o model.onnx --optimize\n"
          f"  python -c \"from nearl_rt import NearlSession; "
          f"print(NearlSession('{onnx_path}').predict(['{_shown(images[0])}']))\"\n"
          "  # with a real backbone (a local open_clip / OpenAI CLIP weights file; nothing is downloaded):\n"
          f"  python -m nearl_rt.train --data {data} --preset vit_b16 --pretrained /path/to/ViT-B-16.pt "
          "--shots 16 --out runs/demo_b16")
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s")
    return artefacts
