"""Fused ops vs the eager PyTorch reference vs torch.compile(reference), forward and forward+backward.

    python -m nearl_rt.bench.kernels --out bench/kernels.json            # CUDA, ViT-B/16 shapes, B in {1, 8, 64}
    python -m nearl_rt.bench.kernels --smoke --out /tmp/kernels.json     # tiny shapes; on CPU via the Triton interpreter

What is timed is the kernels, not the Python wrappers around them: on CUDA each measurement captures
one CUDA graph of N calls, call i on its own input set i, with N sets together larger than the L2
(so every call reads its inputs from HBM, as in a real forward), replays it, and divides by N; where
capture fails it falls back to triton.testing.do_bench (which flushes the L2 before every call) and
says so (`method`). The inputs are what the model passes: activations and weights in the activation
dtype (fp16 or bf16), contiguous, the ViT-B/16 shapes with C = 2 classes: OCA on image rows
[B, 197, 768] and text rows [B*C, 16, 512] (r = 32, M = 16); USEformer attention of M = 16 queries
(d_s = 128, 4 heads) over each image's 197 tokens and its C*16 prompt tokens (bidirectional), or the
shared class prompts (text_cacheable).

Figures per (op, B, pass, implementation): median ms, the op's minimum HBM bytes (forward: read the
tokens once, OCA also writes them once; forward+backward adds reading the tokens and their gradient
and writing the input gradient), GB/s, % of a device-to-device copy timed the same way in the same
run, TFLOP/s, and the fused op's speed-up over eager and compiled. The JSON is rewritten (atomically)
after every case, so a crash keeps every figure measured before it; a failing case records its error
and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from functools import partial

import torch


SCHEMA = "nearl-rt-bench-kernels/2"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
C, TEXT_LEN, R, M, DS, HEADS = 2, 16, 32, 16, 128, 4
DEFAULT_L2 = 60 * 2**20  # H200; the device's own figure is used where torch reports it
PASSES = ("fwd", "fwd+bwd")
OPS = ("oca_image", "oca_text", "use_attention", "use_attention_shared_text")


def oca_case(B, rows, width, dtype, device, *, text, seed):
    """OCA inputs as the model passes them: `rows` tokens of `width` per sequence; text rows read their image's Z."""
    g = torch.Generator(device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    S = B * C if text else B
    group = (torch.arange(B, device=device).repeat_interleave(C) if text else torch.arange(B, device=device))
    args = dict(x=rnd(S, rows, width), group=group, k=rnd(B, M, R), v=rnd(B, M, R),  # nearl_rt.kernels.oca's order
                w_q=rnd(width, R) / width ** 0.5, w_o=rnd(R, width) / R ** 0.5,
                scale=torch.tensor(0.5, device=device, dtype=dtype))
    token_bytes = args["x"].numel() * args["x"].element_size()
    # per token: q = x W_q, scores and values over M keys, out = a W_o, ~6 D for the orthogonal split
    flops = S * rows * (4 * width * R + 4 * R * M + 6 * width)
    return dict(args=args, diff=("x", "k", "v", "w_q", "w_o", "scale"),
                bytes={"fwd": 2 * token_bytes, "fwd+bwd": 5 * token_bytes},
                flops={"fwd": flops, "fwd+bwd": 3 * flops})


def use_case(B, nx, dx, nt, dt, dtype, device, *, shared_text, seed):
    """USEformer attention inputs: B groups, nx image tokens of width dx, nt prompt tokens of width dt;
    shared_text: one prompt set for every group (text_cacheable), else one per image (bidirectional)."""
    g = torch.Generator(device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    Gt = 1 if shared_text else B
    valid = torch.ones(Gt, nt, dtype=torch.bool, device=device)
    valid[:, nt // 2:] = torch.arange(nt - nt // 2, device=device) < 3  # trimmed prompts still carry some padding
    ones, zeros = (lambda n: 1 + 0.1 * rnd(n)), (lambda n: 0.1 * rnd(n))
    args = dict(q=rnd(B, M, DS), x=rnd(B, nx, dx), t=rnd(Gt, nt, dt), t_valid=valid, ln_x_w=ones(dx),  # its order
                ln_x_b=zeros(dx), w_dx=rnd(DS, dx) / dx ** 0.5, ln_t_w=ones(dt), ln_t_b=zeros(dt),
                w_dt=rnd(DS, dt) / dt ** 0.5, w_k=rnd(DS, DS) / DS ** 0.5, b_k=zeros(DS),
                w_v=rnd(DS, DS) / DS ** 0.5, b_v=zeros(DS))
    token_bytes = sum(args[n].numel() * args[n].element_size() for n in ("x", "t"))
    keys = nx + nt
    flops = B * (2 * nx * dx * DS + 4 * keys * DS * DS + 4 * M * keys * DS) + Gt * 2 * nt * dt * DS
    return dict(args=args, diff=tuple(n for n in args if n != "t_valid"),
                bytes={"fwd": token_bytes, "fwd+bwd": 3 * token_bytes},
                flops={"fwd": flops, "fwd+bwd": 3 * flops})


def cases(batches, smoke):
    """(op, B, builder(dtype, device, seed) -> case); the builder makes one fresh input set per seed."""
    if smoke:
        return [("oca_image", 1, partial(oca_case, 1, 5, 24, text=False)),
                ("oca_text", 1, partial(oca_case, 1, 3, 16, text=True)),
                ("use_attention", 1, partial(use_case, 1, 5, 24, 6, 16, shared_text=False)),
                ("use_attention_shared_text", 1, partial(use_case, 1, 5, 24, 6, 16, shared_text=True))]
    return [(name, B, builder) for B in batches for name, builder in (
        ("oca_image", partial(oca_case, B, 197, 768, text=False)),
        ("oca_text", partial(oca_case, B, TEXT_LEN, 512, text=True)),
        ("use_attention", partial(use_case, B, 197, 768, C * TEXT_LEN, 512, shared_text=False)),
        ("use_attention_shared_text", partial(use_case, B, 197, 768, C * TEXT_LEN, 512, shared_text=True)))]


def implementations(op_name, compile_ref):
    from nearl_rt import kernels
    if op_name.startswith("oca"):
        ref, fused = kernels.oca_reference, partial(kernels.oca, backend="triton")
    else:
        ref = partial(kernels.use_attention_reference, heads=HEADS)
        fused = partial(kernels.use_attention, heads=HEADS, backend="triton")
    impls = {"fused": fused, "eager": ref}
    if compile_ref:
        impls["compiled"] = torch.compile(ref, dynamic=False)
    return impls


def call(op, case, mode):
    """A closure running op forward (no autograd) or forward + backward with a fixed output gradient.
    The case's args are in the op's positional order."""
    args, diff = case["args"], case["diff"]
    if mode == "fwd":
        values = list(args.values())

        def run():
            with torch.no_grad():
                op(*values)
        return run
    leaves = {n: (a.detach().requires_grad_() if n in diff else a) for n, a in args.items()}
    values, wrt = list(leaves.values()), [leaves[n] for n in diff]
    with torch.no_grad():
        grad_out = torch.randn_like(op(*args.values()))

    def run():  # autograd.grad: no .grad accumulation (an extra pass over the tokens) in the timing
        torch.autograd.grad(op(*values), wrt, grad_out)
    return run


def graph_ms(calls, reps: int) -> float:
    """Median ms per call of one CUDA graph that runs every closure in `calls` once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # JIT compiles and allocator warm-up, outside the capture
        for c in calls[:2]:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(calls))
    return statistics.median(samples)


def bench_ms(calls, reps: int) -> float:
    """Median ms per call by triton.testing.do_bench (L2 flushed before every call), cycling through `calls`."""
    import triton.testing
    it = iter(range(1 << 62))
    return triton.testing.do_bench(lambda: calls[next(it) % len(calls)](), warmup=10, rep=max(20, reps),
                                   return_mode="median")


def host_ms(calls, reps: int) -> float:
    """CPU (interpreter) smoke: wall-clock median per call; checks the script, not a speed."""
    samples = []
    for i in range(max(reps, 1)):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples)


def measure(calls, reps, device):
    """(ms, method): a graph of the calls on CUDA, do_bench if capture fails; host time on CPU."""
    if device.type != "cuda":
        return host_ms(calls, reps), "host_clock_smoke"
    try:
        return graph_ms(calls, reps), f"cuda_graph_of_{len(calls)}_calls"
    except Exception as e:  # noqa: BLE001 - some ops cannot be captured: time them another way, and say so
        torch.cuda.synchronize()
        return bench_ms(calls, reps), f"do_bench_l2_flush ({type(e).__name__} in capture)"


def input_sets(builder, dtype, device, l2_bytes, smoke):
    """Distinct input sets whose tokens together exceed the L2 (at least 3, at most 512)."""
    first = builder(dtype, device, seed=0)
    if smoke:
        return [first, builder(dtype, device, seed=1)]
    per_set = sum(a.numel() * a.element_size() for a in first["args"].values())
    n = min(512, max(3, math.ceil(1.5 * l2_bytes / per_set) + 1))
    return [first] + [builder(dtype, device, seed=i) for i in range(1, n)]


def copy_gbps(device, reps, smoke) -> float:
    """Bandwidth of a device-to-device copy (bytes read + written), timed like the ops."""
    n = (1 << 22) if smoke else (1 << 30)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms, _ = measure([lambda: dst.copy_(src)] * 4, reps, device)
    return 2 * n / ms / 1e6


def markdown_table(rows) -> str:
    """One line per (op, B, pass): each implementation's ms, the fused op's GB/s, % copy, TFLOP/s and speed-ups."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r["B"], r["mode"]), {})[r["impl"]] = r
    lines = ["| op | B | pass | fused ms | eager ms | compiled ms | fused GB/s | % copy | fused TFLOP/s | x eager | "
             "x compiled |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(r):
        return f"{r['ms']:.4f}" if r and r.get("status") == "ok" else (r or {}).get("status", "-")

    def num(value, spec):
        return "-" if value is None else format(value, spec)
    for (op, B, mode), impl in by_key.items():
        f = impl.get("fused", {})
        ok = f.get("status") == "ok"
        lines.append(f"| {op} | {B} | {mode} | {ms(f)} | {ms(impl.get('eager'))} | {ms(impl.get('compiled'))} | "
                     f"{num(f.get('GBps') if ok else None, '.1f')} | {num(f.get('pct_copy') if ok else None, '.1f')} | "
                     f"{num(f.get('TFLOPs') if ok else None, '.2f')} | {num(f.get('x_eager'), '.2f')} | "
                     f"{num(f.get('x_compiled'), '.2f')} |")
    return "\n".join(lines)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _reason(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nearl_rt/bench/kernels.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/kernels.json", help="JSON results path (rewritten after every case)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 8, 1])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops (default: all)")
    parser.add_argument("--reps", type=int, default=20, help="graph replays (or do_bench ms) per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; measurements not started by then are recorded as skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one call (CPU: Triton interpreter)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise ValueError("the kernel benchmark needs a CUDA GPU; run with --smoke for a CPU check of the script")
    from nearl_rt.core.atomic import atomic_output

    t_start = time.perf_counter()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    reps = 1 if args.smoke else args.reps
    compile_ref = cuda and not args.no_compile
    l2 = DEFAULT_L2
    if cuda:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2
    copy = copy_gbps(device, reps, args.smoke)
    command = " ".join(["python -m nearl_rt.bench.kernels", *(argv if argv is not None else sys.argv[1:])])
    doc = dict(schema=SCHEMA, command=command, device=torch.cuda.get_device_name() if cuda else
               "cpu (Triton interpreter)", dtype=args.dtype, torch=torch.__version__, l2_bytes=l2,
               copy_GBps=_sig(copy), reps=reps, smoke=args.smoke, complete=False, rows=[], table="")
    print(f"device-to-device copy: {copy:.1f} GB/s; L2 {l2 / 2**20:.0f} MiB", flush=True)

    def save():
        doc["table"] = markdown_table(doc["rows"])
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    save()
    for name, B, builder in cases(args.batches, args.smoke):
        if name not in args.ops:
            continue
        base = dict(op=name, B=B)
        try:
            sets = input_sets(builder, dtype, device, l2, args.smoke)
            impls = implementations(name, compile_ref)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory building the inputs: recorded, the run goes on
            doc["rows"] += [dict(base, mode=m, impl="fused", status="failed", reason=_reason(e)) for m in PASSES]
            save()
            continue
        set_bytes = sum(a.numel() * a.element_size() for a in sets[0]["args"].values())
        for mode in PASSES:
            group = {}
            for impl, op in impls.items():
                row = dict(base, mode=mode, impl=impl, sets=len(sets), sets_MB=round(len(sets) * set_bytes / 1e6, 1))
                if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                    row.update(status="skipped", reason=f"--time-budget {args.time_budget:g} s reached")
                else:
                    try:
                        ms, method = measure([call(op, s, mode) for s in sets], reps, device)
                        nbytes, flops = sets[0]["bytes"][mode], sets[0]["flops"][mode]
                        gbps = nbytes / ms / 1e6
                        row.update(status="ok", ms=_sig(ms), method=method, bytes=nbytes, GBps=_sig(gbps),
                                   pct_copy=_sig(100 * gbps / copy), TFLOPs=_sig(flops / ms / 1e9))
                    except Exception as e:  # noqa: BLE001 - recorded; the other cases still run
                        row.update(status="failed", reason=_reason(e))
                    finally:
                        if cuda:
                            torch.cuda.synchronize()
                group[impl] = row
                doc["rows"].append(row)
                status = f"{row['ms']:9.4f} ms {row['GBps']:8.1f} GB/s {row['pct_copy']:6.1f}% copy" \
                    if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
                print(f"{name:26s} B={B:<3d} {mode:8s} {impl:9s} {status}", flush=True)
            fused = group.get("fused", {})
            for impl, key in (("eager", "x_eager"), ("compiled", "x_compiled")):
                other = group.get(impl, {})
                if fused.get("status") == "ok" and other.get("status") == "ok":
                    fused[key] = _sig(other["ms"] / fused["ms"])
            save()
        del sets
    doc["complete"] = True
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(doc["table"])
    print(f"results in {args.out}")
    failed = [r for r in doc["rows"] if r["status"] == "failed"]
    if failed:
        print(f"nearl_rt/bench/kernels.py: {len(failed)} measurement(s) failed; see the JSON", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU smoke run; must precede the first triton import
    from nearl_rt.core.cli import run_cli
    sys.exit(run_cli(main, prog="nearl_rt/bench/kernels.py"))
