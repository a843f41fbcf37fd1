"""`python -m nearl_rt demo [--out DIR]`: train -> evaluate -> export -> serve on the bundled X-rays.
`python -m nearl_rt info CKPT`: show what a checkpoint holds."""
from __future__ import annotations

import argparse
import json
import sys

from export.imaging import resolve_policy
from nearl_rt.checkpoint import read_checkpoint
from nearl_rt.cli import run_cli
from nearl_rt.config import preset_name
from nearl_rt.demo import DEFAULT_OUT, run_demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nearl_rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a checkpoint's config, classes and backbone identity")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true", help="print JSON")
    demo = sub.add_parser("demo", help="train, evaluate, export and serve on the bundled chest X-rays (~1 min, CPU)")
    demo.add_argument("--out", default=DEFAULT_OUT, help=f"a new or empty directory (default: {DEFAULT_OUT})")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args.out, progress=not args.no_progress)
        return 0
    payload = read_checkpoint(args.checkpoint)
    summary = {
        "format_version": payload["format_version"],
        "nearl_rt_version": payload.get("nearl_rt_version"),
        "preset": preset_name(payload["config"]) or "custom",
        "config": payload["config"].to_dict(),
        "class_names": payload["class_names"],
        "template": payload.get("template"),
        "templates": payload.get("templates"),
        "backbone": payload["backbone"],
        "intensity": str(resolve_policy((payload.get("extra") or {}).get("intensity"), None, args.checkpoint)),
        "adapter_parameters": sum(t.numel() for t in payload["adapter"].values()),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            print(f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt"))
