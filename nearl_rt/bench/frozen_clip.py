"""The frozen CLIP floor: the backbone of a NearlCLIP without its adapters, as PyTorch and as ONNX.

`FrozenClip(model)` maps images to the logits the frozen backbone gives for the model's classes (class
text features computed once). `export_frozen_clip` writes it as ONNX the way `export.onnx` writes
NEARL (same exporter, opset, dynamic batch axis, float16 conversion, float32 input and outputs,
`logits`/`probs`), so that onnxruntime NEARL can be compared with onnxruntime frozen CLIP.
"""
from __future__ import annotations

import copy
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from nearl_rt.core.atomic import atomic_output
from nearl_rt.model import NearlCLIP


class FrozenClip(nn.Module):
    """images [B, 3, H, W] -> frozen-CLIP logits [B, C] for `model`'s classes, in the model's dtype."""

    def __init__(self, model: NearlCLIP):
        super().__init__()
        if not model.class_names:
            raise ValueError("the model has no classes: call model.set_classes([...]) first")
        self.model = model  # `model` is what export.onnx's tracer reads (device, input size, backend)
        with torch.no_grad():
            self.text = F.normalize(model.backbone.encode_text(model.class_tokens), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.scaled_logits(F.normalize(m.backbone.encode_image(images.to(m.dtype)), dim=-1), self.text)


class _FrozenClipGraph(FrozenClip):
    def forward(self, images: torch.Tensor):
        logits = super().forward(images).float()
        return logits, torch.softmax(logits, dim=-1)


def export_frozen_clip(model: NearlCLIP, out_path, *, fp16: bool = False) -> Path:
    """Write `model`'s frozen CLIP (no adapters) as ONNX to `out_path`, atomically."""
    from nearl_rt.export.onnx import DEFAULT_OPSET, trace_to_onnx  # the NEARL exporter itself: same settings, same ops
    model = copy.deepcopy(model).float()
    module = _FrozenClipGraph(model.half() if fp16 else model).eval()
    out_path = Path(out_path)
    with atomic_output(out_path) as tmp:
        onnx.save(trace_to_onnx(module, DEFAULT_OPSET, None), tmp)
    return out_path
