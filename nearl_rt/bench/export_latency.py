"""Export time, file size and onnxruntime CPU latency vs PyTorch eager for NEARL-CLIP ONNX files.

    python -m nearl_rt.bench.export_latency --preset vit_b16 --opsets 18 23 --batch-sizes 1 8 --iters 5

For each interaction mode and opset: export (verified) and time it, then time ORT CPU and PyTorch CPU
eager (reference ops) on the same inputs; prints a table and writes JSON (--out). Random backbone weights
unless --pretrained. Latency is the median of --iters runs after one warm-up run, ORT and eager alternating.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


import onnxruntime as ort
import torch

import nearl_rt
from nearl_rt.export.onnx import export_model
from nearl_rt.core.session import NearlSession


def paired_median_ms(fns, iters: int) -> list[float]:
    """Median ms of each function; the functions alternate so that load from other processes hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="vit_b16")
    p.add_argument("--pretrained", default=None, help="backbone weights file (default: random init)")
    p.add_argument("--modes", nargs="+", default=["bidirectional", "text_cacheable"])
    p.add_argument("--opsets", nargs="+", type=int, default=[18])
    p.add_argument("--optimize", action="store_true", help="also time the --optimize variant of each export")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both runtimes")
    p.add_argument("--out", default="export_latency.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            model = nearl_rt.build_model(args.preset, interaction=mode, backend="torch", pretrained=args.pretrained)
            model.set_classes([f"class {i}" for i in range(args.classes)])
            model.eval()
            size = model.preprocess_cfg["size"]
            variants = [(o, False) for o in args.opsets] + ([(o, True) for o in args.opsets] if args.optimize else [])
            for opset, optimize in variants:
                path = Path(tmp) / f"{mode}-{opset}-{int(optimize)}.onnx"
                t0 = time.perf_counter()
                export_model(model, path, opset=opset, optimize=optimize)
                row = {"mode": mode, "opset": opset, "optimize": optimize, "export_s": time.perf_counter() - t0,
                       "size_mib": path.stat().st_size / 2**20}
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = args.threads
                session = NearlSession(path, providers=["CPUExecutionProvider"], session_options=opts)
                for b in args.batch_sizes:
                    x = torch.randn(b, 3, *size)
                    xn = x.numpy()
                    with torch.no_grad():
                        onnx_ms, eager = paired_median_ms([lambda: session.run(xn), lambda: model.classify(x)],
                                                          args.iters)
                    row[f"b{b}"] = {"ort_cpu_ms": onnx_ms, "torch_eager_ms": eager, "speedup": eager / onnx_ms}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"preset": args.preset, "threads": args.threads, "iters": args.iters, "torch": torch.__version__,
              "onnxruntime": ort.__version__, "cpu": platform.processor() or platform.machine(),
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'mode':<15} {'opset':>5} {'opt':>3} {'export s':>9} {'MiB':>7} " +
          " ".join(f"{'b' + str(b) + ' ort/eager ms':>22} {'x':>5}" for b in args.batch_sizes))
    for r in rows:
        cells = " ".join(f"{r[f'b{b}']['ort_cpu_ms']:>10.1f} /{r[f'b{b}']['torch_eager_ms']:>10.1f} "
                         f"{r[f'b{b}']['speedup']:>5.2f}" for b in args.batch_sizes)
        print(f"{r['mode']:<15} {r['opset']:>5} {int(r['optimize']):>3} {r['export_s']:>9.1f} {r['size_mib']:>7.1f} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
