"""`python bench/latency.py`: latency and throughput of every NEARL-CLIP backend, side by side.

With no arguments: the vit_b16 preset with random weights, C = 2 classes, the available device, both
interaction modes, every backend that can run here without minutes of preparation (the others are
listed with the reason: torch_compile on a CPU and ONNX exports not yet cached run when named in
--backends). Prints what it will run and a time estimate first, then a table; --out writes every figure
and the machine info as JSON; --plot draws latency vs batch size.

Within each (mode, batch size) the backends are interleaved: every timed round runs each backend once,
in an order rotated every round. xCLIP divides a backend's median by that of its own runtime's frozen
CLIP (frozen_clip, frozen_clip_graphs, frozen_clip_ort_cpu, frozen_clip_ort_cuda[_fp32]); rows whose
p90 / median exceeds 1.5 are flagged as noisy.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path


import torch
from tqdm import tqdm

import nearl_rt
from nearl_rt.bench.backends import BACKENDS, BenchContext
from nearl_rt.bench.harness import (SPREAD_FLAG, PeakMemory, machine_info, peak_memory, summarize, synchronize,
                           time_rounds)
from nearl_rt.core.atomic import atomic_output
from nearl_rt.core.hashing import sha256_file
from nearl_rt.core.cli import run_cli
from nearl_rt.classifier import resolve_device
from nearl_rt.config import INTERACTIONS, PRESETS
from nearl_rt.core.errors import RandomBackboneWarning

PROG = "bench/latency.py"
SCHEMA = "nearl-rt-bench-latency/2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TEMPLATE = "a chest X-ray showing {}."
INPUT_ROTATION = 4  # distinct input batches cycled through the iterations
DEFAULTS = {  # (warmup, iters, batch sizes)
    "quick": (1, 3, (1, 3)),
    "cuda": (10, 100, (1, 8, 64)),
    "cpu": (1, 10, (1, 8)),  # the default CPU run: 120 s on 2 cores (bench/RESULTS.md)
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through run_cli, not argparse's usage block
        raise ValueError(f"{message} (see {PROG} --help)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,8,64") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, got {text!r}")
    return tuple(dict.fromkeys(values))


def _positive(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _backend_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names == ("all",):
        return tuple(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown or [text]}; choose from all, "
                                         f"{', '.join(BACKENDS)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=_int_list, help="comma-separated, e.g. 1,8,64 "
                   "(default: 1,8,64 on CUDA, 1,8 on CPU, 1,3 with --quick)")
    p.add_argument("--classes", type=_positive(1), help="number of classes C (default 2, or the checkpoint's)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="PyTorch backends' dtype (auto: float16 on CUDA, float32 on CPU)")
    p.add_argument("--mode", choices=["both", *INTERACTIONS], default="both", help="interaction mode(s)")
    p.add_argument("--backends", type=_backend_list,
                   help=f"comma-separated subset of: {', '.join(BACKENDS)} (default: all)")
    p.add_argument("--warmup", type=_positive(0), help="untimed calls per measurement (default 10 CUDA, 3 CPU)")
    p.add_argument("--iters", type=_positive(1), help="timed calls per measurement (default 100 CUDA, 20 CPU)")
    p.add_argument("--out", type=Path, help="write every figure and the machine info to this JSON file")
    p.add_argument("--plot", type=Path, help="draw latency vs batch size to this PNG (needs matplotlib)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test, not a measurement: tiny preset, batch sizes 1,3, 1 warm-up + 3 timed calls "
                        "(what CI runs: every backend runs and agrees)")
    p.add_argument("--ckpt", type=Path, help="a nearl-rt checkpoint (default: the preset with random weights)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default vit_b16; tiny with --quick)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and input images")
    p.add_argument("--cache-dir", type=Path, default=_default_cache(),
                   help="ONNX exports are kept here, named by weights, classes and code (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="export into a temporary directory, keep nothing")
    args = p.parse_args(argv)
    _check_args(args)
    return args


def _check_args(args) -> None:
    """Everything that can be wrong with the options, before any model is built."""
    if os.environ.get("NEARL_RT_BACKEND"):
        raise ValueError("NEARL_RT_BACKEND is set and would override every backend's kernels; unset it "
                         "(the benchmark picks each backend itself)")
    args.device = _resolve_device(args.device)
    if args.dtype == "auto":
        args.dtype = "float16" if args.device.type == "cuda" else "float32"
    kind = "quick" if args.quick else args.device.type
    warmup, iters, batch_sizes = DEFAULTS[kind]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.iters = iters if args.iters is None else args.iters
    args.batch_sizes = args.batch_sizes or batch_sizes
    args.preset = args.preset or ("tiny" if args.quick else "vit_b16")
    args.explicit_backends = args.backends or ()
    args.backends = args.backends or tuple(BACKENDS)
    if args.ckpt is not None and not args.ckpt.is_file():
        raise ValueError(f"--ckpt {args.ckpt}: file not found (pass a checkpoint written by nearl_rt.save_checkpoint)")
    for opt, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None and not (path.parent if str(path.parent) else Path(".")).is_dir():
            raise ValueError(f"{opt} {path}: directory {path.parent} does not exist")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'nearl-rt[bench]' (or leave out --plot)") from None


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nearl-rt" / "bench"


def _resolve_device(name: str) -> torch.device:
    device = resolve_device(name)
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def class_names(n: int) -> list[str]:
    return ["normal", "pneumonia", *(f"finding {i}" for i in range(3, n + 1))][:n]


def build_master(args, mode: str) -> nearl_rt.NearlCLIP:
    """The model every backend copies: float32 on the CPU, classes set. Random weights are seeded, so a
    later run builds the same model (and finds its cached exports)."""
    torch.manual_seed(args.seed)
    if args.ckpt is not None:
        model = nearl_rt.load_checkpoint(args.ckpt, backend="torch", interaction=mode)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomBackboneWarning)  # said in the table header instead
            model = nearl_rt.build_model(args.preset, interaction=mode, backend="torch", zero_init="scale")
        with torch.no_grad():  # an untrained model is the identity; a random W_o and s != 0 make the adapters count
            for name, p in model.adapter_state_dict().items():
                if name.endswith("scale"):
                    p.fill_(0.5)
    if args.classes is not None or not model.class_names:
        model.set_classes(class_names(args.classes or 2), template=model.template or TEMPLATE)
    return model.eval()


def make_inputs(model, batch_sizes, device, seed: int) -> dict[int, list[torch.Tensor]]:
    size = model.preprocess_cfg["size"]
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    return {b: [torch.randn(b, 3, h, w, generator=g).to(device) for _ in range(INPUT_ROTATION)]
            for b in batch_sizes}


def _reason(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


def run_benchmark(args, progress, say) -> tuple[list[dict], int]:
    """Every (mode, backend, batch size): a record with figures, or status skipped/failed and the reason.
    Returns the records and the number of classes."""
    records = []
    device, dtype = args.device, DTYPES[args.dtype]
    modes = INTERACTIONS if args.mode == "both" else (args.mode,)
    sha = sha256_file(args.ckpt) if args.ckpt is not None else None
    memory = PeakMemory(device)
    with tempfile.TemporaryDirectory(prefix="nearl-bench-") as workdir, torch.no_grad():
        for mode_index, mode in enumerate(modes):
            master = build_master(args, mode)
            inputs = make_inputs(master, args.batch_sizes, device, args.seed)
            reference = master if device.type == "cpu" else copy.deepcopy(master).to(device)
            expected, reference_s = {}, {}
            for b, x in inputs.items():
                expected[b] = reference.classify(x[0]).float().cpu()
                t0 = time.perf_counter()  # the second call: the first one's start-up cost is paid once, not per round
                reference.classify(x[0])
                reference_s[b] = time.perf_counter() - t0
            del reference
            ctx = BenchContext(master=master, device=device, dtype=dtype, workdir=Path(workdir), quick=args.quick,
                               explicit=frozenset(args.explicit_backends), checkpoint_sha256=sha,
                               cache_dir=None if args.no_cache else args.cache_dir)
            live, exports = {}, set()
            for name in args.backends:
                backend = BACKENDS[name]()
                ok, reason = backend.available(ctx)
                if ok:
                    live[name] = backend
                    onnx = getattr(backend, "onnx_kind", None), getattr(backend, "onnx_precision", None)
                    if onnx[0] and not ctx.onnx_cached(*onnx):
                        exports.add(onnx)
                else:
                    records += [_record(backend, mode, b, args, status="skipped", reason=reason)
                                for b in args.batch_sizes]
                    progress.update(len(args.batch_sizes))
            if mode_index == 0:
                left_out = len(args.backends) - len(live)
                plan = f"runs {', '.join(live) or 'nothing'}"
                plan += f" ({left_out} left out here, each with its reason in the table)" if left_out else ""
                say(f"{plan}; {_estimate(args, len(modes), len(live), reference_s, len(exports))}")
            for name, backend in list(live.items()):
                progress.set_postfix_str(f"{mode} setup {name}")
                try:
                    t0 = time.perf_counter()
                    backend.setup(ctx)
                    backend.setup_s = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - one backend failing must not hide the others
                    del live[name]
                    records += [_record(backend, mode, b, args, status="failed", reason=f"setup failed: {_reason(e)}")
                                for b in args.batch_sizes]
                    progress.update(len(args.batch_sizes))
            for b in args.batch_sizes:
                progress.set_postfix_str(f"{mode} B={b}")
                records += _measure_batch(live, mode, b, inputs[b], expected[b], args, memory)
                progress.update(len(live))
            del live
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            num_classes = len(master.class_names)
    _add_ratios(records)
    return records, num_classes


def _estimate(args, modes: int, backends: int, reference_s: dict, exports: int) -> str:
    """Rough run time: every backend costs about what the eager reference's first call did."""
    rounds = 2 + args.warmup + args.iters  # first call, warm-up, timed rounds, memory call
    seconds = modes * backends * rounds * sum(reference_s.values())
    text = f"estimated time: ~{f'{seconds:.0f} s' if seconds < 90 else f'{round(seconds / 60)} min'} for the timing"
    if exports:
        each = "seconds" if args.preset.startswith("tiny") else "1-3 min"
        text += (f", plus {exports} ONNX export(s) for this mode ({each} each on a CPU; "
                 f"{'kept in ' + str(args.cache_dir) if not args.no_cache else 'not kept: --no-cache'})")
    if args.quick:
        text += (f". --quick is a smoke test ({args.iters} timed calls on the tiny preset): it checks that every "
                 f"backend runs and agrees, its times are no measurement (run without --quick for figures)")
    return text


def _record(backend, mode: str, batch_size: int, args, **fields) -> dict:
    return {"backend": backend.name, "mode": mode, "dtype": backend.precision or args.dtype,
            "batch_size": batch_size, **fields}


def _measure_batch(live: dict, mode: str, batch_size: int, inputs, expected, args, memory) -> list[dict]:
    """One batch size: each backend's first call and result check, then interleaved timed rounds."""
    runners, done = {}, {}
    for name, backend in live.items():
        base = _record(backend, mode, batch_size, args, setup_s=backend.setup_s)
        try:
            t0 = time.perf_counter()
            run = backend.runner(batch_size)
            logits = run(inputs[0])
            synchronize(args.device)
            first_call_s = time.perf_counter() - t0
            # copy now: IO-binding outputs are buffers that the timed calls overwrite
            got = logits.float().cpu().clone() if isinstance(logits, torch.Tensor) else torch.tensor(logits).float()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at this batch size: recorded, the run goes on
            done[name] = {**base, "status": "failed", "reason": _reason(e)}
            continue
        diff = None
        if backend.compares_to_eager:
            if tuple(got.shape) != tuple(expected.shape):
                done[name] = {**base, "status": "failed",
                              "reason": f"logits have shape {tuple(got.shape)}, expected {tuple(expected.shape)}"}
                continue
            diff = float((got - expected).abs().max())
        runners[name] = run
        done[name] = {**base, "first_call_s": first_call_s, "max_abs_diff_vs_fp32_eager": diff}
    times, errors = time_rounds(runners, inputs, warmup=args.warmup, iters=args.iters, device=args.device)
    for name, e in errors.items():
        done[name] = {**done[name], "status": "failed", "reason": _reason(e)}
    for name, t in times.items():
        mem = None
        if live[name].torch_allocated:
            try:
                mem = peak_memory(runners[name], inputs[0], args.device, memory)
            except Exception:  # noqa: BLE001 - it timed fine; only the extra memory call failed
                mem = None
        done[name] = {**done[name], "status": "ok", **summarize(t, batch_size), "warmup": args.warmup,
                      "iters": args.iters, "peak_mem_mib": mem}
    return list(done.values())


def _add_ratios(records: list[dict]) -> None:
    """xCLIP (median / the median of the same runtime's frozen CLIP) and speed-up vs eager, same mode and B."""
    median = {(r["backend"], r["mode"], r["batch_size"]): r["median_ms"] for r in records if r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            continue
        r["baseline"] = BACKENDS[r["backend"]].baseline or r["backend"]
        floor = median.get((r["baseline"], r["mode"], r["batch_size"]))
        eager = median.get(("eager", r["mode"], r["batch_size"]))
        r["xclip"] = r["median_ms"] / floor if floor else None
        r["speedup_vs_eager"] = eager / r["median_ms"] if eager else None
        r["noisy"] = r["spread"] > SPREAD_FLAG


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(records: list[dict], header: str) -> str:
    lines = [header]
    cols = ("backend", "B", "median ms", "p90 ms", "spread", "img/s", "peak MiB", "xCLIP", "vs", "speedup",
            "max|dlogit|", "1st call s")
    widths = (25, 4, 10, 9, 7, 8, 9, 6, 25, 8, 11, 10)

    def line(cells):
        return "  ".join(c.rjust(w) if i not in (0, 8) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    for mode in dict.fromkeys(r["mode"] for r in records):
        rows = [r for r in records if r["mode"] == mode]
        lines += ["", f"mode: {mode}", line(cols).rstrip()]
        for r in rows:
            if r["status"] != "ok":
                continue
            spread = _fmt(r["spread"], ".2f") + ("!" if r["noisy"] else " ")
            cells = (r["backend"], str(r["batch_size"]), _fmt(r["median_ms"], ".2f"), _fmt(r["p90_ms"], ".2f"),
                     spread, _fmt(r["images_per_s"], ".1f"), _fmt(r["peak_mem_mib"], ".1f"),
                     _fmt(r["xclip"], ".2f"), r["baseline"] if r["baseline"] != r["backend"] else "-",
                     _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["max_abs_diff_vs_fp32_eager"], ".1e"),
                     _fmt(r["first_call_s"], ".2f"))
            lines.append(line(cells).rstrip())
        notes = {}
        for r in rows:
            if r["status"] != "ok":
                notes.setdefault((r["backend"], r["status"], r["reason"]), []).append(str(r["batch_size"]))
        for (name, status, reason), sizes in notes.items():
            lines.append(f"  {status}: {name} (B={','.join(sizes)}): {reason}")
    noisy = sum(r["status"] == "ok" and r["noisy"] for r in records)
    lines += ["", f"xCLIP = median / the median of `vs`, the frozen CLIP run by the same runtime; speedup = eager "
              f"median / median;\nspread = p90 / median, ! above {SPREAD_FLAG} (a noisy row: {noisy} here); "
              "max|dlogit| = vs the fp32 eager model on the same input;\n1st call s = the untimed first call "
              "(compilation, graph capture, engine build) after the backend's setup (setup_s in the JSON)"]
    return "\n".join(lines)


def write_plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(dict.fromkeys(r["mode"] for r in records))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for name in dict.fromkeys(r["backend"] for r in records):
            pts = [(r["batch_size"], r["median_ms"]) for r in records
                   if r["mode"] == mode and r["backend"] == name and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        sizes = sorted({r["batch_size"] for r in records})
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median latency (ms)", title=mode)
        ax.set_xticks(sizes, [str(b) for b in sizes], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    modes = INTERACTIONS if args.mode == "both" else (args.mode,)
    total = len(modes) * len(args.backends) * len(args.batch_sizes)

    def say(text):
        tqdm.write(f"{PROG}: {text}", file=sys.stderr)
    say(f"{args.preset if args.ckpt is None else args.ckpt} on {args.device} ({args.dtype}), modes "
        f"{', '.join(modes)}, B = {', '.join(map(str, args.batch_sizes))}: each of the backends asked "
        f"({', '.join(args.backends)}) that can run here gets 1 first call, {args.warmup} warm-up and "
        f"{args.iters} timed rounds, interleaved")
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True) as progress:
        records, num_classes = run_benchmark(args, progress, say)
    weights = f"checkpoint {args.ckpt}" if args.ckpt else f"preset {args.preset}, random weights"
    info = machine_info(args.device)
    where = info["gpu"]["name"] if info["gpu"] else (f"{info['cpu']}, {info['torch_threads']} PyTorch threads, "
                                                         f"{info['physical_cores']} ONNX runtime threads")
    header = (f"NEARL-CLIP latency: {weights}, C={num_classes}, device {args.device} ({where}), PyTorch backends "
              f"{args.dtype}; {args.iters} timed calls after {args.warmup} warm-up")
    print(format_table(records, header))
    if args.out is not None:
        doc = {"schema": SCHEMA, "command": [PROG, *argv], "created_unix": time.time(), "machine": info,
               "settings": {"preset": None if args.ckpt else args.preset, "ckpt": str(args.ckpt) if args.ckpt else None,
                            "classes": num_classes, "dtype": args.dtype,
                            "device": str(args.device), "modes": list(dict.fromkeys(r["mode"] for r in records)),
                            "backends": list(args.backends), "batch_sizes": list(args.batch_sizes),
                            "warmup": args.warmup, "iters": args.iters, "quick": args.quick, "seed": args.seed,
                            "input_rotation": INPUT_ROTATION, "peak_mem_kind": PeakMemory.describe(args.device),
                            "timing": "interleaved rounds, order rotated each round", "spread_flag": SPREAD_FLAG},
               "backends": {n: {"description": BACKENDS[n].description, "baseline": BACKENDS[n].baseline or n}
                            for n in args.backends},
               "results": records}
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.out}")
    if args.plot is not None:
        write_plot(records, args.plot)
        print(f"wrote {args.plot}")
    failed = sum(r["status"] == "failed" for r in records)
    if failed:
        print(f"{PROG}: {failed} measurement(s) failed; see the table", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
