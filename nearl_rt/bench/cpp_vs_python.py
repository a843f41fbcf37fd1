"""`python -m nearl_rt.bench.cpp_vs_python MODEL.onnx`: the C++ library (cpp/, nearl_bench) vs NearlSession on the
same exported model and CPU, interleaved round by round: milliseconds per image for decode + preprocess
of one JPEG (C++: libjpeg-turbo + the preprocessing graph; Python: Pillow decode + Pillow resize, and
Pillow decode + the graph) and for the classifier at batch sizes 1 and 8. MODEL needs its
MODEL.preprocess.onnx (python -m export.preprocess_graph MODEL.onnx); build cpp/ first (docs/cpp.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import numpy as np
from PIL import Image

from nearl_rt.core.session import NearlSession

ROOT = Path(__file__).resolve().parents[1]


def median_ms(iters: int, f) -> float:
    f()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def test_image(path: Path, height: int, width: int) -> None:
    """A smooth gradient with noise, saved as a JPEG (quality 90): an X-ray-sized photo-like input."""
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    img = np.stack([np.sin(5 * xx + 3 * yy + p) for p in (0, 1, 2)], -1) * 90 + 128 + rng.normal(0, 20, (height, width, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nearl_rt/bench/cpp_vs_python.py", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an exported classifier with its .preprocess.onnx")
    parser.add_argument("--bench", default=str(ROOT / "build" / "cpp" / "nearl_bench"), help="nearl_bench binary")
    parser.add_argument("--image-size", default="768x1024", help="HxW of the test JPEG")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    h, w = map(int, args.image_size.split("x"))
    with tempfile.TemporaryDirectory() as d:
        image = Path(d) / "image.jpg"
        test_image(image, h, w)
        pillow, graph = NearlSession(args.model), NearlSession(args.model, preprocess="onnx")
        x = pillow.preprocess([image])
        rows: dict[str, list[float]] = {}
        for _ in range(args.rounds):  # interleaved: C++ then Python, each round
            cmd = [args.bench, args.model, str(image), "--iters", str(args.iters)]
            for b in args.batch:
                cmd += ["--batch", str(b)]
            cpp = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            rows.setdefault("decode+preprocess C++ (libjpeg-turbo + graph)", []).append(cpp["decode_preprocess_ms"])
            rows.setdefault("decode+preprocess Python (Pillow + Pillow)", []).append(
                median_ms(args.iters, lambda: pillow.preprocess([image])))
            rows.setdefault("decode+preprocess Python (Pillow + graph)", []).append(
                median_ms(args.iters, lambda: graph.preprocess([image])))
            for b in args.batch:
                batch = np.repeat(x, b, axis=0)
                rows.setdefault(f"classify B={b} C++", []).append(cpp["classify_ms_per_image"][str(b)])
                rows.setdefault(f"classify B={b} Python", []).append(median_ms(args.iters, lambda: pillow.run(batch)) / b)
    print(f"{args.model}: {h}x{w} JPEG, {args.rounds} interleaved rounds x {args.iters} iterations, "
          f"onnxruntime default threads, ms per image (median of round medians)")
    for name, values in rows.items():
        print(f"  {name:48s} {statistics.median(values):9.2f}   rounds: {', '.join(f'{v:.2f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
