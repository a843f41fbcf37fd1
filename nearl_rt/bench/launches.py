"""Kernels per forward: frozen CLIP vs NEARL (eager and triton backends), both modes, from the profiler.

    python -m nearl_rt.bench.launches --out launches.json                 # CUDA: vit_b16, B = 1 and 64, fp16
    python -m nearl_rt.bench.launches --quick --out launches.json         # CPU: tiny preset, aten ops instead of kernels

On CUDA it counts the GPU kernels (cuBLAS, cuDNN, PyTorch and Triton launches alike) that the profiler
records over `--forwards` forwards after a warm-up, divided by the number of forwards, and the kernels
NEARL adds per layer over frozen CLIP. On a CPU there are no kernels: it counts aten ops, which
checks the script, not the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch



def count_per_forward(fn, x, forwards: int, cuda: bool) -> float:
    from torch.profiler import ProfilerActivity, profile
    fn(x)  # warm-up: JIT compiles and caches stay out of the count
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(forwards):
            fn(x)
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        n = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    else:
        n = sum(e.name.startswith("aten::") for e in events)
    return n / forwards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nearl_rt/bench/launches.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--quick", action="store_true", help="tiny preset on the CPU (aten ops): a check of the script")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 64 (1 with --quick)")
    p.add_argument("--forwards", type=int, default=3)
    args = p.parse_args(argv)
    import nearl_rt
    from nearl_rt.bench.frozen_clip import FrozenClip
    from nearl_rt.core.atomic import atomic_output
    from nearl_rt.config import INTERACTIONS

    cuda = torch.cuda.is_available() and not args.quick
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    preset = "tiny" if args.quick else "vit_b16"
    batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 64])
    rows = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in INTERACTIONS:
            torch.manual_seed(0)
            model = nearl_rt.build_model(preset, interaction=mode, backend="torch").to(device, dtype).eval()
            model.set_classes(["normal", "pneumonia"])
            layers = len(model.vision_tower.blocks)
            size = model.preprocess_cfg["size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            for b in batch_sizes:
                x = torch.randn(b, 3, *size, device=device)
                counts = {"frozen_clip": count_per_forward(FrozenClip(model), x, args.forwards, cuda)}
                for backend in ("torch", "triton") if cuda else ("torch",):
                    model.backend = backend
                    counts[f"nearl_{backend}"] = count_per_forward(model.classify, x, args.forwards, cuda)
                for name, n in counts.items():
                    rows.append(dict(mode=mode, B=b, forward=name, per_forward=n,
                                     added_per_layer=(n - counts["frozen_clip"]) / layers))
                    print(f"{mode:15s} B={b:<3d} {name:13s} {n:8.1f} per forward "
                          f"({rows[-1]['added_per_layer']:+.1f} per layer over frozen CLIP)", flush=True)
    doc = dict(counted="CUDA kernels" if cuda else "aten ops (CPU check, not kernels)", preset=preset,
               dtype=str(dtype), forwards=args.forwards, rows=rows)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from nearl_rt.core.cli import run_cli
    sys.exit(run_cli(main, prog="nearl_rt/bench/launches.py"))
