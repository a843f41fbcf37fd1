"""Exported ONNX files side by side on onnxruntime CPU: size, latency and how far each moves the first one's
probabilities (an fp32 export against its int8 versions, say).

    python -m nearl_rt.bench.int8 ckpt.onnx ckpt.int8.onnx ckpt.static.onnx --batch-sizes 1 8 --iters 10

Every file is served through nearl_rt.NearlSession (the Python serving path). Per batch size the
files are timed in interleaved rounds (nearl_rt.bench.harness.time_rounds: the order rotates each round, so load
from other processes hits all alike) on the same random inputs; `speedup` is the first file's median over
each file's. The inputs are random, so `max|dprob|` and `top-1 agree` measure numerical closeness, not
accuracy: score accuracy with `python -m nearl_rt.evaluate FILE --data DATA` (docs/int8.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


import numpy as np
import torch

from nearl_rt.bench.harness import machine_info, summarize, time_rounds
from nearl_rt.core.errors import NearlError

PROG = "python -m nearl_rt.bench.int8"


def _session(path: Path, threads: int):
    import onnxruntime as ort

    from nearl_rt.core.session import NearlSession
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return NearlSession(path, providers=["CPUExecutionProvider"], session_options=options)


def compare(paths, batch_sizes, *, iters: int, warmup: int, threads: int, seed: int = 0) -> list[dict]:
    """One row per (file, batch size): size, precision, latency summary, speedup and closeness to paths[0]."""
    sessions = {str(p): _session(Path(p), threads) for p in paths}
    first = str(paths[0])
    sizes = {tuple(s.input_size) for s in sessions.values()}
    if len(sizes) != 1:
        raise NearlError(f"the files take different input sizes {sorted(sizes)}: compare exports of one model")
    (h, w), = sizes
    rng = np.random.default_rng(seed)
    rows = []
    for b in batch_sizes:
        inputs = [rng.standard_normal((b, 3, h, w), dtype=np.float32) for _ in range(4)]
        probs = {name: np.concatenate([s.run(x)[1] for x in inputs]) for name, s in sessions.items()}
        times, errors = time_rounds({name: (lambda x, s=s: s.run(x)) for name, s in sessions.items()}, inputs,
                                    warmup=warmup, iters=iters, device=torch.device("cpu"))
        if errors:
            raise NearlError("; ".join(f"{name}: {e}" for name, e in errors.items()))
        medians = {name: summarize(t, b)["median_ms"] for name, t in times.items()}
        for name, s in sessions.items():
            meta = s.metadata
            rows.append({"file": name, "batch_size": b, "size_mib": Path(name).stat().st_size / 2**20,
                         "precision": meta.get("precision", "fp32"),
                         "method": (meta.get("quantization") or {}).get("method"),
                         **summarize(times[name], b), "speedup": medians[first] / medians[name],
                         "max_abs_prob_diff": float(np.abs(probs[name] - probs[first]).max()),
                         "top1_agreement": float(np.mean(probs[name].argmax(1) == probs[first].argmax(1)))})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'file':40s} {'prec':>5s} {'MiB':>7s} {'B':>3s} {'median ms':>10s} {'p90 ms':>9s} {'speedup':>8s} "
             f"{'max|dprob|':>10s} {'top-1 agree':>11s}"]
    for r in rows:
        prec = r["precision"] + (f"/{r['method'][0]}" if r["method"] else "")
        lines.append(f"{Path(r['file']).name[-40:]:40s} {prec:>5s} {r['size_mib']:7.1f} {r['batch_size']:3d} "
                     f"{r['median_ms']:10.2f} {r['p90_ms']:9.2f} {r['speedup']:8.2f} {r['max_abs_prob_diff']:10.4f} "
                     f"{100 * r['top1_agreement']:10.1f}%")
    lines.append("speedup and max|dprob| / top-1 agree are against the first file, on the same random inputs; "
                 "prec /d = dynamic, /s = static int8")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="exported .onnx files of one model (the first is the reference)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--iters", type=int, default=10, help="timed rounds per batch size (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="onnxruntime intra-op threads (default: torch's, the machine's cores)")
    p.add_argument("--out", help="also write the rows and the machine as JSON here")
    args = p.parse_args(argv)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        raise NearlError(f"not found: {', '.join(missing)} (export with `python -m export.onnx CKPT --int8`)")
    if args.iters < 1 or args.warmup < 0 or args.threads < 1 or min(args.batch_sizes) < 1:
        raise NearlError("--iters, --threads and --batch-sizes must be >= 1, --warmup >= 0")
    if args.out and not Path(args.out).resolve().parent.is_dir():  # fail before the timing, not after
        raise NearlError(f"cannot write {args.out}: directory {Path(args.out).parent} does not exist")
    rows = compare(args.files, args.batch_sizes, iters=args.iters, warmup=args.warmup, threads=args.threads)
    print(format_table(rows))
    if args.out:
        from nearl_rt.core.atomic import atomic_output
        with atomic_output(Path(args.out)) as tmp:
            tmp.write_text(json.dumps({"machine": machine_info(torch.device("cpu")), "threads": args.threads,
                                       "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    from nearl_rt.core.cli import run_cli
    sys.exit(run_cli(main, prog=PROG))
