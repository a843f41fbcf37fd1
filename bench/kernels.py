"""Fused ops vs the eager PyTorch reference vs torch.compile(reference), forward and forward+backward.

    python bench/kernels.py --out bench/kernels.json            # CUDA, ViT-B/16 shapes, B in {1, 8, 64}
    python bench/kernels.py --smoke --out /tmp/kernels.json     # tiny shapes; on CPU via the Triton interpreter

Shapes (ViT-B/16, C = 2 classes): OCA on image rows [B, 197, 768] and text rows [B*C, 16, 512] (r = 32,
M = 16); USEformer attention of M = 16 queries (d_s = 128, 4 heads) over each image's 197 tokens and its
C*16 prompt tokens. GB/s counts the minimum HBM traffic of the op (forward: read the tokens once, OCA
also writes them once; forward+backward adds reading the tokens and their gradient and writing the
input gradient) over the measured time; % HBM divides it by the bandwidth of a large device-to-device
copy measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/kernels.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
C, TEXT_LEN, R, M, DS, HEADS = 2, 16, 32, 16, 128, 4


def oca_case(B, rows, width, dtype, device, *, text):
    """OCA inputs: `rows` tokens per sequence of `width`; text rows read the Z of their image."""
    g = torch.Generator().manual_seed(B)
    S = B * C if text else B
    group = torch.arange(B).repeat_interleave(C) if text else torch.arange(B)
    t = dict(x=torch.randn(S, rows, width, generator=g), k=torch.randn(B, M, R, generator=g),
             v=torch.randn(B, M, R, generator=g), w_q=torch.randn(width, R, generator=g) / width ** 0.5,
             w_o=torch.randn(R, width, generator=g) / R ** 0.5, scale=torch.tensor(0.5))
    args = {n: a.to(device, dtype if n == "x" else torch.float32) for n, a in t.items()}
    args["group"] = group.to(device)
    token_bytes = args["x"].numel() * args["x"].element_size()
    return args, ("x", "k", "v", "w_q", "w_o", "scale"), {"fwd": 2 * token_bytes, "fwd+bwd": 5 * token_bytes}


def use_case(B, nx, dx, nt, dt, dtype, device):
    """USEformer attention inputs: B groups, nx image tokens of width dx, nt prompt tokens of width dt."""
    g = torch.Generator().manual_seed(B)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    valid = torch.ones(B, nt, dtype=torch.bool)
    valid[:, nt // 2:] = torch.arange(nt - nt // 2) < 3  # trimmed prompts still carry some padding
    t = dict(q=rnd(B, M, DS), x=rnd(B, nx, dx), t=rnd(B, nt, dt), ln_x_w=torch.ones(dx), ln_x_b=torch.zeros(dx),
             w_dx=rnd(DS, dx) / dx ** 0.5, ln_t_w=torch.ones(dt), ln_t_b=torch.zeros(dt), w_dt=rnd(DS, dt) / dt ** 0.5,
             w_k=rnd(DS, DS) / DS ** 0.5, b_k=torch.zeros(DS), w_v=rnd(DS, DS) / DS ** 0.5, b_v=torch.zeros(DS))
    args = {n: a.to(device, dtype if n in ("x", "t") else torch.float32) for n, a in t.items()}
    args["t_valid"] = valid.to(device)
    token_bytes = sum(args[n].numel() * args[n].element_size() for n in ("x", "t"))
    diff = tuple(n for n in t if n != "t_valid")
    return args, diff, {"fwd": token_bytes, "fwd+bwd": 3 * token_bytes}


def cases(batches, dtype, device, smoke):
    if smoke:
        yield "oca_image", 1, oca_case(1, 5, 24, dtype, device, text=False)
        yield "oca_text", 1, oca_case(1, 3, 16, dtype, device, text=True)
        yield "use_attention", 1, use_case(1, 5, 24, 6, 16, dtype, device)
        return
    for B in batches:
        yield "oca_image", B, oca_case(B, 197, 768, dtype, device, text=False)
        yield "oca_text", B, oca_case(B, TEXT_LEN, 512, dtype, device, text=True)
        yield "use_attention", B, use_case(B, 197, 768, C * TEXT_LEN, 512, dtype, device)


def timer(device, iters, warmup):
    """Median milliseconds of fn() over `iters` runs after `warmup` runs (CUDA events on GPU)."""
    def measure(fn):
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(samples)
    return measure


def hbm_bandwidth_gbps(device, measure) -> float:
    """Bandwidth of a large device-to-device copy (read + write), GB/s."""
    n = (1 << 30) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6


def runner(op, args, diff, mode):
    """A closure running op forward (no autograd) or forward + backward with a fixed output gradient."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                op(**args)
        return run
    leaves = {n: (a.detach().requires_grad_() if n in diff else a) for n, a in args.items()}
    wrt = [leaves[n] for n in diff]
    with torch.no_grad():
        grad_out = torch.randn_like(op(**args))

    def run():  # autograd.grad: no .grad accumulation (an extra pass over the tokens) in the timing
        torch.autograd.grad(op(**leaves), wrt, grad_out)
    return run


def markdown_table(rows) -> str:
    """One line per (op, B, pass): time of each implementation, fused GB/s and % HBM, fused speed-ups."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r["B"], r["mode"]), {})[r["impl"]] = r
    lines = ["| op | B | pass | fused ms | eager ms | compiled ms | fused GB/s | % HBM | x eager | x compiled |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, B, mode), impl in by_key.items():
        f, e, c = impl["fused"], impl["eager"], impl.get("compiled")
        lines.append(f"| {op} | {B} | {mode} | {f['ms']:.4f} | {e['ms']:.4f} | {c['ms'] if c else float('nan'):.4f} | "
                     f"{f['GBps']:.1f} | {f['pct_hbm']:.1f} | {e['ms'] / f['ms']:.2f} | "
                     f"{c['ms'] / f['ms'] if c else float('nan'):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/kernels.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/kernels.json", help="JSON results path (written atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one iteration (CPU: Triton interpreter)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise ValueError("the kernel benchmark needs a CUDA GPU; run with --smoke for a CPU check of the script")
    from kernels import oca_reference, use_attention_reference
    from kernels.oca_triton import oca_triton
    from kernels.use_attention_triton import use_attention_triton
    from nearl_rt.atomic import atomic_output

    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    iters, warmup = (1, 0) if args.smoke else (args.iters, max(3, args.iters // 5))
    measure = timer(device, iters, warmup)
    compile_ref = cuda and not args.no_compile
    hbm = hbm_bandwidth_gbps(device, measure)
    rows = []
    for name, B, (inputs, diff, traffic) in cases(args.batches, dtype, device, args.smoke):
        oca = name.startswith("oca")
        ref = oca_reference if oca else partial(use_attention_reference, heads=HEADS)
        impls = {"fused": oca_triton if oca else partial(use_attention_triton, heads=HEADS), "eager": ref}
        if compile_ref:
            impls["compiled"] = torch.compile(ref, dynamic=False)
        for mode, nbytes in traffic.items():
            for impl, op in impls.items():
                ms = measure(runner(op, inputs, diff, mode))
                gbps = nbytes / ms / 1e6
                rows.append(dict(op=name, B=B, mode=mode, impl=impl, ms=round(ms, 4), GBps=round(gbps, 2),
                                 pct_hbm=round(100 * gbps / hbm, 2)))
                print(f"{name:14s} B={B:<3d} {mode:8s} {impl:9s} {ms:9.4f} ms {gbps:8.1f} GB/s "
                      f"{100 * gbps / hbm:6.1f}% HBM", flush=True)
    table = markdown_table(rows)
    print(table)
    command = " ".join(["python bench/kernels.py", *(argv if argv is not None else sys.argv[1:])])
    result = dict(table=table, command=command,
                  device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)", dtype=args.dtype,
                  torch=torch.__version__, hbm_copy_GBps=round(hbm, 1), iters=iters, smoke=args.smoke, rows=rows)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"HBM copy bandwidth {hbm:.1f} GB/s; results in {args.out}")
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU smoke run; must precede the first triton import
    from nearl_rt.cli import run_cli
    sys.exit(run_cli(main, prog="bench/kernels.py"))
