"""`nearl-rt` (or `python -m nearl_rt`): the demo, `info`, and every other command-line tool by name.

    nearl-rt demo [--out DIR]       train -> evaluate -> export -> serve on the bundled X-rays
    nearl-rt info CKPT|MODEL.onnx   what a checkpoint or an exported model holds
    nearl-rt save-pretrained CKPT OUTDIR   the adapter as safetensors + config.json + model card, to share
    nearl-rt TOOL ...               = python -m MODULE ... for the tools in TOOLS (train, export, ...)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from functools import partial

from nearl_rt.core.cli import run_cli

# nearl-rt TOOL ...: the module whose main(argv) it runs (what `python -m MODULE` runs; a checkout also has the
# shortcuts `python -m export.onnx|triton|serve|preprocess_graph` and `python bench/latency.py`).
TOOLS = {
    "train": "nearl_rt.train", "evaluate": "nearl_rt.evaluate", "calibrate": "nearl_rt.calibrate",
    "predict": "nearl_rt.predict",
    "sweep": "nearl_rt.sweep", "export": "nearl_rt.export.onnx", "preprocess-graph": "nearl_rt.export.preprocess_graph",
    "triton": "nearl_rt.serving.triton_repository", "serve": "nearl_rt.serving.server", "bench": "nearl_rt.bench.latency",
}


def run_tool(name: str, argv) -> int:
    """`nearl-rt NAME ARGS...`: the tool's main on ARGS, its errors as one line."""
    return run_cli(importlib.import_module(TOOLS[name]).main, argv, prog=f"nearl-rt {name}")


def cli() -> int:
    """The `nearl-rt` console script."""
    return run_cli(main, prog="nearl-rt")


def _tool_script(name: str) -> int:
    return run_cli(importlib.import_module(TOOLS[name]).main, sys.argv[1:], prog=f"nearl-{name}")


export_cli = partial(_tool_script, "export")  # the `nearl-export` console script
bench_cli = partial(_tool_script, "bench")    # the `nearl-bench` console script


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return run_tool(argv[0], argv[1:])
    from nearl_rt.checkpoint import is_onnx_file
    from nearl_rt.demo import DEFAULT_OUT, run_demo
    parser = argparse.ArgumentParser(prog="python -m nearl_rt", description=__doc__.split("\n")[0],
                                     epilog="tools: " + ", ".join(f"{n} (python -m {m})" for n, m in TOOLS.items()))
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a checkpoint's config, classes and backbone identity, or an exported "
                                       ".onnx file's metadata, inputs and outputs")
    info.add_argument("checkpoint", help="a checkpoint (.pt), a save-pretrained folder or an exported model (.onnx)")
    info.add_argument("--json", action="store_true", help="print JSON")
    share = sub.add_parser("save-pretrained", help="write a checkpoint's adapter as a shareable folder: "
                           "adapter.safetensors, config.json, README.md model card (nearl_rt.pretrained)")
    share.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run directory (its best.pt)")
    share.add_argument("outdir", metavar="OUTDIR", help="a new or empty folder")
    share.add_argument("--eval", metavar="JSON", action="append", default=[],
                       help="an evaluate --json file whose metrics go on the model card (repeatable; a sweep's run "
                            "directory adds its eval.json by itself)")
    share.add_argument("--dataset", help="the training data's name on the card (default: from the run's run.json)")
    demo = sub.add_parser("demo", help="train, evaluate, export and serve on the bundled chest X-rays (~1 min, CPU)")
    demo.add_argument("--out", default=DEFAULT_OUT, help=f"a new or empty directory (default: {DEFAULT_OUT})")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args.out, progress=not args.no_progress)
        return 0
    if args.command == "save-pretrained":
        from nearl_rt.pretrained import save_checkpoint_pretrained
        print(f"wrote {save_checkpoint_pretrained(args.checkpoint, args.outdir, args.eval, args.dataset)}")
        return 0
    summary = onnx_summary(args.checkpoint) if is_onnx_file(args.checkpoint) else None
    if summary is None:
        summary = checkpoint_summary(args.checkpoint)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            print(f"{k:>20}: {v}")
    return 0


def checkpoint_summary(path) -> dict:
    """What `nearl-rt info` shows of a checkpoint (validated as load_checkpoint validates it)."""
    from nearl_rt.checkpoint import read_checkpoint
    from nearl_rt.config import preset_name
    from nearl_rt.core.imaging import resolve_policy
    payload = read_checkpoint(path)
    return {
        "format_version": payload["format_version"],
        "nearl_rt_version": payload.get("nearl_rt_version"),
        "preset": preset_name(payload["config"]) or "custom",
        "config": payload["config"].to_dict(),
        "class_names": payload["class_names"],
        "template": payload.get("template"),
        "templates": payload.get("templates"),
        "backbone": payload["backbone"],
        "intensity": str(resolve_policy((payload.get("extra") or {}).get("intensity"), None, path)),
        "adapter_parameters": sum(t.numel() for t in payload["adapter"].values()),
        "calibration": (payload.get("extra") or {}).get("calibration"),  # temperature, operating point, thresholds
    }


def onnx_summary(path) -> dict:
    """What `nearl-rt info` shows of an exported ONNX file: its nearl.* metadata, inputs, outputs and size."""
    import onnx

    from nearl_rt.core.metadata import read_metadata
    proto = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in proto.graph.initializer}

    def tensors(values):
        return {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                         for d in v.type.tensor_type.shape.dim] for v in values if v.name not in weights}
    meta = read_metadata(proto)
    kind = "preprocessing graph" if meta.get("kind") == "preprocess" else \
        "classifier" if "class_names" in meta else "ONNX model without nearl.* metadata (not written by nearl-rt)"
    return {"file": f"ONNX, {kind}", "size_mib": round(os.path.getsize(path) / 2**20, 2),
            "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "producer": proto.producer_name, "inputs": tensors(proto.graph.input),
            "outputs": tensors(proto.graph.output), **meta}


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt"))
