"""`python -m nearl_rt.bench.serving`: export.serve (Triton, dynamic batching) against NearlSession called directly.

For each --max-queue-delay-us value: a fresh `python -m export.serve` on loopback, then closed-loop gRPC
clients (one preprocessed image per request) at each concurrency; between the server runs, the same
number of threads calling one in-process NearlSession.run with one image each (no batching). Same
model, same onnxruntime build (the server environment pins it), one run, interleaved. Prints a
markdown table (images/s, p50/p99 latency in ms); --out writes it as JSON.

    python -m nearl_rt.bench.serving --preset tiny
    python -m nearl_rt.bench.serving model.onnx --concurrency 1,8,32 --delays 0,2000,20000 --requests 256
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


import numpy as np

from nearl_rt.bench.serving_client import closed_loop
from nearl_rt.core.session import NearlSession
from nearl_rt.serving.server import ServerProcess, ensure_env

CLIENT = Path(__file__).with_name("serving_client.py")


def _ints(text: str) -> list:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers >= 0")
    return values


def export_preset(preset: str, out_dir: Path) -> Path:
    """A random-weight model of `preset` with 2 classes, exported (dynamic batch)."""
    import warnings

    import nearl_rt
    from nearl_rt.export.onnx import export_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nearl_rt.build_model(preset, backend="torch").eval()
        model.set_classes(["normal", "pneumonia"], "a chest X-ray showing {}.")
        return export_model(model, out_dir / f"{preset}.onnx")


def direct(session: NearlSession, images, concurrency: int, requests: int) -> dict:
    """`concurrency` threads sharing one NearlSession, each running one image per call."""
    def make_client(k):
        return lambda i: session.run(images[(k + i) % len(images)])
    return closed_loop(make_client, concurrency, requests)


def served(python, model: Path, size, delay_us: int, args) -> list:
    server_args = ["--max-batch-size", str(args.max_batch_size), "--max-queue-delay-us", str(delay_us)]
    with ServerProcess(model, *server_args) as server:
        done = subprocess.run([str(python), "-I", str(CLIENT), server.host, str(server.grpc_port), server.name,
                               str(size[0]), str(size[1]), ",".join(map(str, args.concurrency)),
                               str(args.requests), str(args.seed)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the load client failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nearl_rt/bench/serving.py", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", type=Path, help="an exported MODEL.onnx (default: --preset, random weights)")
    p.add_argument("--preset", default="tiny", help="preset to export when no MODEL is given (default tiny)")
    p.add_argument("--concurrency", type=_ints, default=[1, 8, 32], help="default 1,8,32")
    p.add_argument("--delays", type=_ints, default=[0, 2000, 20000], help="--max-queue-delay-us values")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the rows as JSON")
    args = p.parse_args(argv)
    python = ensure_env()
    with tempfile.TemporaryDirectory(prefix="nearl-bench-serving-") as tmp:
        model = args.model or export_preset(args.preset, Path(tmp))
        session = NearlSession(model, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(args.seed)
        images = [rng.standard_normal((1, 3, *session.input_size)).astype(np.float32) for _ in range(8)]
        for x in images[:2]:
            session.run(x)  # warm-up
        rows = []
        for delay in args.delays:
            rows += [{"path": "NearlSession direct", "delay_us": None, **direct(session, images, c, args.requests)}
                     for c in args.concurrency]
            rows += [{"path": "export.serve gRPC", "delay_us": delay, **r}
                     for r in served(python, Path(model), session.input_size, delay, args)]
    print(f"model: {args.model or args.preset + ' (random weights)'}; {args.requests} requests per row, "
          f"1 image each; max batch {args.max_batch_size}")
    print("| path | --max-queue-delay-us | concurrency | images/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {'' if r['delay_us'] is None else r['delay_us']} | {r['concurrency']} | "
              f"{r['images_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
