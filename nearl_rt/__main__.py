"""`python -m nearl_rt info CKPT`: show what a checkpoint holds."""
from __future__ import annotations

import argparse
import json
import sys

from nearl_rt.checkpoint import read_checkpoint
from nearl_rt.cli import run_cli
from nearl_rt.config import preset_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nearl_rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a checkpoint's config, classes and backbone identity")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
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
