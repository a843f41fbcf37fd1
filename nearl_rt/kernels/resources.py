"""Offline resource table: every fused Triton kernel, in every configuration the wrappers choose, compiled
for a GPU architecture with the installed Triton and its ptxas; no GPU needed.

    python -m nearl_rt.kernels.resources                          # sm_90, every geometry, dtype, batch, pass
    python -m nearl_rt.kernels.resources --arch sm_80 --json table.json
    python -m nearl_rt.kernels.resources --geometry vit_b16 --dtype bf16 --batch 64 --check

One row per kernel and configuration: registers, spill bytes (stores/loads), shared memory, blocks per SM,
grid size and waves. The launches are the wrappers' own: each site below runs the op the model runs at a
layer (on "meta" tensors, kernels recorded and not run: nearl_rt/kernels/launches.py) for the architecture's SM
count, forward alone (inference) and forward + backward (training), so the table follows any change of
block sizes or split plans. `--check` exits 1 when a configuration does not fit (shared memory over the
per-block limit, or more spill than SPILL_BOUND). `--summary` prints one row per kernel and dtype instead.

The table depends on the Triton release (its code generation and the ptxas it ships): TABLE_TRITON names the
releases whose full table passes `--check` (docs/kernels.md shows both); `bash .ci/triton-version.sh VERSION`
reruns the table and the interpreter tests with another release.

Geometries: ViT-B/16 and ViT-B/32 CLIP (image 197 / 50 tokens x 768, text 512 wide) and BiomedCLIP
(image 197 x 768, 768-wide PubMedBERT text); the presets' adapter (M = 16, d_s = 128, 4 heads, r = 32),
C = 2 classes, prompts trimmed to 16 tokens.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

SPILL_BOUND = 0  # bytes of spill stores allowed per kernel and configuration
# Triton releases whose full table (sm_90 and sm_80) passes --check: the oldest supported (the GPU image's)
# and CI's; pyproject.toml's triton bound spans them (tests/test_bench_suite.py)
TABLE_TRITON = ("3.6.0", "3.8.0")


@dataclass(frozen=True)
class Arch:
    capability: int
    sms: int
    smem_per_block: int   # opt-in maximum of dynamic shared memory per block
    smem_per_sm: int
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32


ARCHS = {"sm_90": Arch(90, 132, 232_448, 233_472),    # H100 SXM / H200: 227 KB per block
         "sm_80": Arch(80, 108, 166_912, 167_936)}    # A100: 163 KB per block
GEOMETRIES = {"vit_b16": (197, 768, 512), "vit_b32": (50, 768, 512), "biomedclip": (197, 768, 768)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BATCHES = (1, 8, 64)
M, DS, HEADS, RANK, CLASSES, PROMPT = 16, 128, 4, 32, 2, 16


def _meta(*shape, dtype, grad):
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=grad and dtype.is_floating_point)


def _oca_site(rows, n, width, groups, dtype, grad):
    from nearl_rt.kernels.oca_triton import oca_triton
    x = _meta(rows, n, width, dtype=dtype, grad=grad)
    kv = _meta(groups, M, 2 * RANK, dtype=dtype, grad=grad)
    group = torch.empty(rows, device="meta", dtype=torch.int64)
    return oca_triton(x, group, kv[..., :RANK], kv[..., RANK:], _meta(width, RANK, dtype=dtype, grad=grad),
                      _meta(RANK, width, dtype=dtype, grad=grad), _meta(dtype=dtype, grad=grad))


def _use_site(groups, image, text_groups, text_width, dtype, grad):
    from nearl_rt.kernels.use_attention_triton import use_attention_triton
    p = lambda *s: _meta(*s, dtype=dtype, grad=grad)  # noqa: E731
    img = (p(groups, *image), p(image[1]), p(image[1]), p(DS, image[1])) if image else (None,) * 4
    t = p(text_groups, CLASSES * PROMPT, text_width)
    valid = torch.empty(text_groups, CLASSES * PROMPT, device="meta", dtype=torch.bool)
    return use_attention_triton(p(groups, M, DS), img[0], t, valid, *img[1:], p(text_width), p(text_width),
                                p(DS, text_width), p(DS, DS), p(DS), p(DS, DS), p(DS), heads=HEADS)


def sites(geometry: str, B: int):
    """(site name, fn(dtype, grad)) for what one layer runs at batch B; B-independent sites only at B=1."""
    n, dv, dt = GEOMETRIES[geometry]
    out = [("oca_image", lambda d, g: _oca_site(B, n, dv, B, d, g)),
           ("oca_text_per_image", lambda d, g: _oca_site(B * CLASSES, PROMPT, dt, B, d, g)),
           ("use_image+class_text", lambda d, g: _use_site(B, (n, dv), 1, dt, d, g)),
           ("use_image+own_text", lambda d, g: _use_site(B, (n, dv), B, dt, d, g))]
    if B == BATCHES[0]:
        out += [("oca_text_classes", lambda d, g: _oca_site(CLASSES, PROMPT, dt, 1, d, g)),
                ("use_class_text_only", lambda d, g: _use_site(1, None, 1, dt, d, g))]
    return out


PASSES = ("fwd", "fwd+bwd")
SITES = ("oca_image", "oca_text_per_image", "use_image+class_text", "use_image+own_text", "oca_text_classes",
         "use_class_text_only")


def plan(arch: Arch, geometries, dtypes, batches, site_names=SITES, passes=PASSES):
    """Every launch the wrappers make, as (config dict, Launch)."""
    from nearl_rt.kernels.launches import recorded_launches
    from nearl_rt.kernels.triton_common import set_planned_sms
    set_planned_sms(arch.sms)
    for geometry in geometries:
        for B in batches:
            for site, run in sites(geometry, B):
                if site not in site_names:
                    continue
                for dname in dtypes:
                    for pass_ in passes:
                        grad = pass_ == "fwd+bwd"
                        with recorded_launches(run=False) as launches, torch.set_grad_enabled(grad):
                            out = run(DTYPES[dname], grad)
                            if grad:
                                out.backward(torch.empty_like(out))
                        for launch in launches:
                            if grad and launch.name in FORWARD_ONLY:
                                continue  # listed in the fwd rows
                            yield dict(geometry=geometry, B=B, site=site, dtype=dname, pass_=pass_), launch


FORWARD_ONLY = ("_ln_down_fwd",)


def _specialize(launch, arch: Arch):
    """Triton's own specialization of the recorded call (the JIT's binder), for the target architecture."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.kernel
    target = GPUTarget("cuda", arch.capability, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = (fn.fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
           repr(sorted(attrs.items(), key=str)), options.num_warps, options.num_stages)
    return key, (fn, ASTSource(fn, signature, constexprs, attrs), target, options)


_TASKS: list = []


def _compile(index: int) -> dict:
    import triton
    from triton import knobs
    fn, src, target, options = _TASKS[index]
    k = triton.compile(src, target=target, options=options.__dict__)
    gpu = f"sm_{target.arch}a" if target.arch == 90 else f"sm_{target.arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(k.asm["ptx"])
        f.flush()
        info = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, info)) else 0  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), smem=int(k.metadata.shared), warps=options.num_warps)


def blocks_per_sm(res: dict, arch: Arch) -> int:
    """Resident blocks per SM by registers (256-register warp granules), threads and shared memory."""
    if res["smem"] > arch.smem_per_block:
        return 0
    warp_regs = -(-max(res["regs"], 1) * 32 // 256) * 256
    by_regs = (arch.regs_per_sm // warp_regs) // res["warps"]
    by_threads = arch.threads_per_sm // (32 * res["warps"])
    by_smem = arch.smem_per_sm // (res["smem"] + 1024)  # 1 KB reserved per block
    return min(by_regs, by_threads, by_smem, arch.blocks_per_sm)


def violations(rows, arch: Arch, spill_bound: int = SPILL_BOUND) -> list[str]:
    """Why configurations would not run (or would spill) on `arch`; empty when every row fits."""
    out = []
    for r in rows:
        where = f"sm_{arch.capability} {r['kernel']} {r['geometry']} {r['site']} {r['dtype']} {r['pass']} B={r['B']}"
        if r["smem"] > arch.smem_per_block:
            out.append(f"{where}: {r['smem']} B of shared memory > {arch.smem_per_block} B per block")
        if r["spill_stores"] > spill_bound:
            out.append(f"{where}: {r['spill_stores']} B of register spill > {spill_bound} B")
    return out


def table(arch_name: str, geometries, dtypes, batches, jobs: int, site_names=SITES, passes=PASSES,
          progress=None) -> list[dict]:
    arch = ARCHS[arch_name]
    planned, keys = [], {}
    _TASKS.clear()
    for config, launch in plan(arch, geometries, dtypes, batches, site_names, passes):
        key, task = _specialize(launch, arch)
        if key not in keys:
            keys[key] = len(_TASKS)
            _TASKS.append(task)
        planned.append((config, launch, keys[key]))
    if progress:
        progress(f"{arch_name}: {len(planned)} launches, {len(_TASKS)} distinct compiles")
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile, range(len(_TASKS)))
    else:
        results = [_compile(i) for i in range(len(_TASKS))]
    rows = []
    for config, launch, index in planned:
        res = results[index]
        grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
        programs = grid[0] * grid[1] * grid[2]
        per_sm = blocks_per_sm(res, arch)
        rows.append(dict(arch=arch_name, kernel=launch.name, geometry=config["geometry"], site=config["site"],
                         dtype=config["dtype"], **{"pass": config["pass_"]}, B=config["B"], grid=list(grid),
                         blocks=block_sizes(launch), **res, blocks_per_sm=per_sm,
                         waves=round(programs / (per_sm * arch.sms), 2) if per_sm else None))
    return rows


def block_sizes(launch) -> str:
    """The launch's block sizes, e.g. "T64 D64 M16 R32" for BLOCK_T=64, BLOCK_D=64, ..."""
    return " ".join(f"{k[6:]}{v}" for k, v in launch.kwargs.items() if k.startswith("BLOCK_"))


COLUMNS = ("arch", "geometry", "site", "dtype", "pass", "B", "kernel", "grid", "blocks", "warps", "regs",
           "spill_stores", "spill_loads", "smem", "blocks_per_sm", "waves")


def markdown(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("x".join(map(str, r[c])) if c == "grid" else str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def summary(rows) -> str:
    """One row per architecture, kernel and dtype: configurations, block sizes, warps, the register range,
    the largest spill and shared memory, the fewest resident blocks per SM."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["arch"], r["kernel"], r["dtype"]), []).append(r)
    lines = ["| arch | kernel | dtype | rows | blocks | warps | registers | spill stores, B (max) | "
             "shared memory, B (max) | blocks/SM (min) |", "|" + "---|" * 10]
    for (arch, kernel, dtype), rs in groups.items():
        regs = sorted(r["regs"] for r in rs)
        lines.append(f"| {arch} | `{kernel}` | {dtype} | {len(rs)} | {'; '.join(sorted({r['blocks'] for r in rs}))} | "
                     f"{'/'.join(map(str, sorted({r['warps'] for r in rs})))} | {regs[0]}–{regs[-1]} | "
                     f"{max(r['spill_stores'] for r in rs)} | {max(r['smem'] for r in rs):,} | "
                     f"{min(r['blocks_per_sm'] for r in rs)} |")
    return "\n".join(lines)


def _choices(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"--{what} {value!r}: choose from {', '.join(map(str, allowed))} (comma-separated)")
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nearl_rt.kernels.resources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90", help="sm_90, sm_80 or both, comma-separated (default sm_90)")
    ap.add_argument("--geometry", default=",".join(GEOMETRIES), help=f"subset of {','.join(GEOMETRIES)}")
    ap.add_argument("--dtype", default=",".join(DTYPES), help=f"subset of {','.join(DTYPES)}")
    ap.add_argument("--batch", default=",".join(map(str, BATCHES)), help="batch sizes (default 1,8,64)")
    ap.add_argument("--site", default=",".join(SITES), help=f"subset of {','.join(SITES)}")
    ap.add_argument("--pass", dest="passes", default=",".join(PASSES), help="fwd (inference), fwd+bwd (training)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--check", action="store_true", help=f"exit 1 if any row exceeds shared memory or spills "
                                                          f"more than {SPILL_BOUND} B")
    ap.add_argument("--summary", action="store_true", help="print one row per kernel and dtype, not every row")
    args = ap.parse_args(argv)
    archs = _choices(args.arch, ARCHS, "arch")
    geometries = _choices(args.geometry, GEOMETRIES, "geometry")
    dtypes = _choices(args.dtype, DTYPES, "dtype")
    site_names = _choices(args.site, SITES, "site")
    passes = _choices(args.passes, PASSES, "pass")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise ValueError(f"--batch {args.batch!r}: give integers, e.g. 1,8,64") from None
    if any(b < 1 for b in batches):
        raise ValueError(f"--batch {args.batch!r}: batch sizes must be >= 1")
    import triton
    from triton import knobs
    if not os.path.isfile(knobs.nvidia.ptxas.path or ""):
        raise ValueError("ptxas not found (it ships with triton's NVIDIA backend); reinstall triton")
    _require_compiled_kernels()
    checked = "" if triton.__version__ in TABLE_TRITON else " (not one of the checked releases " \
        f"{', '.join(TABLE_TRITON)}: docs/kernels.md)"
    print(f"triton {triton.__version__}{checked}, ptxas {knobs.nvidia.ptxas.path}", file=sys.stderr)
    rows, problems = [], []
    for name in archs:
        arch_rows = table(name, geometries, dtypes, batches, max(1, args.jobs), site_names, passes,
                          progress=lambda msg: print(msg, file=sys.stderr))
        rows += arch_rows
        problems += violations(arch_rows, ARCHS[name])
    print(summary(rows) if args.summary else markdown(rows))
    if args.json:
        from nearl_rt.core.atomic import atomic_output
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(dict(triton=triton.__version__, table_triton=TABLE_TRITON,
                                           spill_bound=SPILL_BOUND, archs={n: asdict(ARCHS[n]) for n in archs},
                                           problems=problems, rows=rows), indent=1))
    for p in problems:
        print(f"does not fit: {p}", file=sys.stderr)
    return 1 if args.check and problems else 0


def _require_compiled_kernels() -> None:
    from triton.runtime.jit import JITFunction
    from nearl_rt.kernels import oca_triton
    if not isinstance(oca_triton._oca_fwd, JITFunction):
        raise ValueError("the kernels were imported under TRITON_INTERPRET=1; run `python -m nearl_rt.kernels.resources` "
                         "in a fresh process")


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are imported: compile them, never interpret
    from nearl_rt.core.cli import run_cli
    sys.exit(run_cli(main, prog="python -m nearl_rt.kernels.resources"))
