"""Where an exported model's CPU time goes: onnxruntime's profiler, node times grouped by the module that
exported each node (image tower, text tower, OCA, USEformer, other).

    python -m nearl_rt.bench.ort_profile nearl.onnx frozen.onnx --batch-size 1 --runs 3 --out profile.json

Each file runs in a CPU session (one intra-op thread per physical core, as NearlSession) on random inputs:
one warm-up run, then `--runs` profiled ones. A node's module comes from the exporter's
`pkg.torch.onnx.name_scopes` metadata (the nn.Module path that emitted it); nodes that onnxruntime fused at
load time keep the name of one of the nodes they replace, and nodes without a module (shape arithmetic, the
logits) count as "other". The shares are of the summed node kernel time, which on a multi-threaded CPU
session is close to, not equal to, the wall time.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from nearl_rt.core.errors import NearlError

PROG = "python -m nearl_rt.bench.ort_profile"
GROUPS = ("image tower", "text tower", "OCA (image)", "OCA (text)", "USEformer", "other")


def module_group(scope: str) -> str:
    """The group of an nn.Module path such as 'model.backbone.visual.transformer.resblocks.3'."""
    if scope.startswith("model.oca_v"):
        return "OCA (image)"
    if scope.startswith("model.oca_t"):
        return "OCA (text)"
    if scope.startswith("model.use"):
        return "USEformer"
    if scope.startswith(("model.backbone.visual", "backbone.visual", "visual")):
        return "image tower"
    if scope.startswith(("model.backbone", "backbone", "transformer", "token_embedding", "ln_final")):
        return "text tower"
    return "other"


def node_groups(graph) -> dict:
    """ONNX node name -> group, from each node's exporter metadata."""
    groups = {}
    for node in graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        modules = [s for s in scopes[:-1] if s]  # the last scope is the op itself
        groups[node.name] = module_group(modules[-1]) if modules else "other"
    return groups


def input_size(graph, path) -> tuple:
    """(H, W) of the `images` input [B, 3, H, W] (also of files without nearl.* metadata: the frozen baselines)."""
    images = [i for i in graph.input if i.name == "images"]
    if not images:
        raise NearlError(f"{path} has no `images` input: profile files written by `python -m export.onnx` (or the "
                         f"frozen-CLIP baselines of bench/latency.py)")
    return tuple(d.dim_value for d in images[0].type.tensor_type.shape.dim[2:])


def profile(path, batch_size: int, runs: int, threads: int, seed: int = 0) -> dict:
    """Kernel time per group (ms per run, summed over nodes) and the wall time per run of one file."""
    import time

    import onnxruntime as ort

    import onnx
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...
        raise NearlError(f"cannot read {path} as ONNX: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    groups, (h, w) = node_groups(graph), input_size(graph, path)
    x = np.random.default_rng(seed).standard_normal((batch_size, 3, h, w)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="nearl-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, {"images": x})  # warm-up (profiled too: dropped below by run count)
        start = time.perf_counter()
        for _ in range(runs):
            session.run(None, {"images": x})
        wall = (time.perf_counter() - start) / runs * 1e3
        events = json.loads(Path(session.end_profiling()).read_text())
    per_run = defaultdict(list)  # node -> durations in the order run (warm-up first)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_run[e["name"][:-len("_kernel_time")]].append(e["dur"])
    ms = dict.fromkeys(GROUPS, 0.0)
    unmapped = 0
    for node, durations in per_run.items():
        group = groups.get(node)
        if group is None:  # a node onnxruntime created: name it by the original node it starts with, if any
            group = next((g for n, g in groups.items() if node.startswith(n)), "other")
            unmapped += 1
        ms[group] += sum(durations[-runs:]) / runs / 1e3
    return {"file": str(path), "batch_size": batch_size, "runs": runs, "threads": threads, "wall_ms": wall,
            "kernel_ms": ms, "nodes": len(per_run), "nodes_created_by_onnxruntime": unmapped}


def table(results: list) -> str:
    lines = ["| file | B | wall ms | kernel ms | " + " | ".join(GROUPS) + " |",
             "|---|---|---|---|" + "---|" * len(GROUPS)]
    for r in results:
        total = sum(r["kernel_ms"].values())
        shares = " | ".join(f"{r['kernel_ms'][g]:.0f} ({100 * r['kernel_ms'][g] / total:.1f} %)" for g in GROUPS)
        lines.append(f"| {Path(r['file']).name} | {r['batch_size']} | {r['wall_ms']:.0f} | {total:.0f} | {shares} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from nearl_rt.core.cpu import physical_cores
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="exported .onnx files (plain or --fused)")
    p.add_argument("--batch-size", type=int, default=1, help="default %(default)s")
    p.add_argument("--runs", type=int, default=3, help="profiled runs after one warm-up (default %(default)s)")
    p.add_argument("--threads", type=int, default=physical_cores(), help="intra-op threads (default: physical cores)")
    p.add_argument("--out", help="write the results as JSON too")
    args = p.parse_args(argv)
    for path in args.models:
        if not Path(path).is_file():
            p.error(f"{path}: no such file (export one with `python -m export.onnx CKPT`)")
    if args.batch_size < 1 or args.runs < 1 or args.threads < 1:
        p.error("--batch-size, --runs and --threads must be >= 1")
    results = [profile(path, args.batch_size, args.runs, args.threads) for path in args.models]
    print(table(results))
    if args.out:
        from nearl_rt.core.atomic import atomic_output
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    from nearl_rt.core.cli import run_cli
    sys.exit(run_cli(main, prog=PROG))
