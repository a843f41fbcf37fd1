"""Kernels and host time that backend="triton" adds per layer over frozen CLIP, counted on the CPU with
the Triton launches recorded and not run (nearl_rt/kernels/launches.py); no GPU needed.

    python -m nearl_rt.bench.launch_budget                        # tiny preset, bf16, 3 images, C = 2 classes
    python -m nearl_rt.bench.launch_budget --reps 60 --json launches.json

Counted as in the GPU review: aten ops that would each be a CUDA kernel plus the Triton launches, after a
warm-up call, per layer, over frozen CLIP computing the same logits (its class text cached in
text_cacheable, its text tower run per call in bidirectional). Host time: the median of --reps calls of
`classify`, interleaved with frozen CLIP's, on one thread; on a CPU most of it is the aten ops' own work,
so compare runs on one machine, in one run. tests/test_kernels_launches.py pins the counts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


CLASSES = ["normal lungs", "pneumonia with consolidation in the left lower lobe"]
MODES = ("text_cacheable", "bidirectional")


def _frozen_clip(model, images, cached_text):
    """Frozen CLIP's logits for the model's classes: the cached class text, or the text tower per call."""
    import torch.nn.functional as F
    bb = model.backbone
    txt = cached_text if cached_text is not None else F.normalize(bb.encode_text(model.class_tokens), dim=-1)
    return bb.logit_scale.exp() * F.normalize(bb.encode_image(images), dim=-1) @ txt.t()


def launches_per_layer(model, images, reps: int = 0):
    """(added kernels per layer, Counter of the aten ops added, names of the Triton launches of one forward,
    host ms per forward {"nearl", "frozen"} or None without reps) for a model whose classes are set."""
    import torch
    import torch.nn.functional as F

    from nearl_rt.kernels.launches import counted_kernels, recorded_launches
    bb = model.backbone
    with torch.no_grad(), recorded_launches(run=False) as launches:
        cached = None
        if model.interaction == "text_cacheable":
            cached = F.normalize(bb.encode_text(model.class_tokens), dim=-1)
        model.classify(images)  # warm-up: class prompts, class text stream, folded weights
        start = len(launches)
        with counted_kernels() as nearl:
            model.classify(images)
        names = [launch.name for launch in launches[start:]]
        with counted_kernels() as plain:
            _frozen_clip(model, images, cached)
        host = None
        if reps:
            times = {"nearl": [], "frozen": []}
            for _ in range(reps):  # interleaved: both see the same machine load
                for name, run in (("nearl", lambda: model.classify(images)),
                                  ("frozen", lambda: _frozen_clip(model, images, cached))):
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
            host = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    added = sum(nearl.values()) + len(names) - sum(plain.values())
    return added / len(model.vision_tower.blocks), nearl - plain, names, host


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nearl_rt.bench.launch_budget", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--reps", type=int, default=60, help="host-time calls per side (0: counts only)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the fused ops' checks; nothing is run
    import torch

    import nearl_rt
    torch.set_num_threads(1)  # host time without OpenMP barriers on a shared machine
    out = {}
    for mode in MODES:
        model = nearl_rt.build_model(args.preset, interaction=mode, backend="triton").to(torch.bfloat16)
        model.set_classes(CLASSES)
        size = model.backbone.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        images = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        per_layer, extra, names, host = launches_per_layer(model, images, args.reps)
        out[mode] = dict(added_per_layer=per_layer, extra_aten_ops=dict(extra.most_common()), triton_launches=names,
                         host_ms=host, layers=len(model.vision_tower.blocks))
        line = f"{mode}: {per_layer:.1f} kernels per layer over frozen CLIP; extra aten ops {dict(extra)}"
        if host:
            line += (f"; host {host['nearl']:.2f} ms vs frozen {host['frozen']:.2f} ms per forward "
                     f"(+{(host['nearl'] - host['frozen']) / len(model.vision_tower.blocks):.2f} ms per layer)")
        print(line)
    if args.json:
        from nearl_rt.core.atomic import atomic_output
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
