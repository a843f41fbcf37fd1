"""The modules that become ONNX graphs: a NearlCLIP classifier with its class prompts baked in.

Both take `images` float32 [B, 3, H, W] (normalised) and return (`logits`, `probs`) float32 [B, C]: the
logits raw, the probabilities calibrated, softmax(logits / temperature), when the checkpoint stores a
temperature (nearl_rt.calibration; plain softmax(logits) otherwise). A multi-label model's are per finding
[B, F]: logits = positive minus negative prompt logit, probs = sigmoid(logits / temperature).

- bidirectional: the whole lock-step model; the trimmed class prompts are constants and the text
  tower runs for B x C rows inside the graph.
- text_cacheable: image tower + USEformer + OCA; the cached class text stream (class text features
  and the per-layer prompt tokens the USEformer reads) are constants. A prompt learner's learned context
  (CoOp, KgCoOp, BiomedCoOp) is in that constant stream.
- a feature head (CLIP-Adapter, Tip-Adapter(-F), LP++; nearl_rt.feature_heads): the frozen image tower's
  normalised features, then the head, whose text features and cache are constants.

Both run the PyTorch reference ops (fused Triton kernels are not ONNX ops). A float16 model casts
the float32 input itself (its embedding layers do); the reference OCA accumulates the orthogonal
split in float32, and the logits and softmax run in float32 here.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from nearl_rt.classifier import frozen_image_features
from nearl_rt.model import NearlCLIP, PromptBatch, TextStream
from nearl_rt.prompts import pool_prompts


def _check_model(model) -> None:
    if not isinstance(model, NearlCLIP):
        raise TypeError(f"expected a nearl_rt NearlCLIP model, got {type(model).__name__}")
    if not model.class_names:
        raise ValueError("the model has no classes: call model.set_classes([...]) before exporting")


class _Classifier(nn.Module):
    def __init__(self, model: NearlCLIP, temperature: Optional[float] = None):
        super().__init__()
        _check_model(model)
        if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature={temperature!r}: use a finite value > 0 (or None: no calibration)")
        self.model = model
        self.temperature = temperature

    def _outputs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.class_logits(logits.float())
        scaled = logits if self.temperature is None else logits / self.temperature
        # multi-label: per-finding probabilities, sigmoid(positive - negative logit) = softmax over the pair
        return logits, torch.sigmoid(scaled) if self.model.multi_label else torch.softmax(scaled, dim=-1)


class BidirectionalGraph(_Classifier):
    """images -> (logits, probs) of the whole lock-step model, class prompts as constants."""

    def __init__(self, model: NearlCLIP, temperature: Optional[float] = None):
        super().__init__(model, temperature)
        self.prompts: PromptBatch = model.trimmed_prompts(model.class_tokens)
        with torch.no_grad():
            self.text_embed = model.embed_prompts(self.prompts)  # (prompt embeddings, text attention mask)

    def forward(self, images: torch.Tensor):
        # The prompts are fixed: the trimmed prompts and their embeddings are constants (trimming reads
        # EOT positions back as Python ints and cannot be traced; the embedding lookup would put the
        # whole token embedding table into the file).
        m = self.model
        img, txt = m.lockstep(images, self.prompts, *self.text_embed)
        return self._outputs(m.scaled_logits_paired(img.float(), pool_prompts(txt, m.prompt_pool).float()))


class TextCacheableGraph(_Classifier):
    """images -> (logits, probs) of the image stream; the class text stream is constant."""

    def __init__(self, model: NearlCLIP, temperature: Optional[float] = None):
        super().__init__(model, temperature)
        with torch.no_grad():
            self.text: TextStream = model.encode_text_stream(model.class_tokens)
            self.class_features = pool_prompts(self.text.features, model.prompt_pool)  # prompt ensemble

    def forward(self, images: torch.Tensor):
        m = self.model
        img = m.encode_images(images, self.text)
        return self._outputs(m.scaled_logits(img.float(), self.class_features.float()))


class FeatureHeadGraph(_Classifier):
    """images -> (logits, probs) of a feature-level head on the frozen image features."""

    def __init__(self, model: NearlCLIP, head: nn.Module, temperature: Optional[float] = None):
        super().__init__(model, temperature)
        self.head = head

    def forward(self, images: torch.Tensor):
        features = frozen_image_features(self.model, images)
        return self._outputs(self.head(features.to(self.head.text.dtype)))


def export_module(model: NearlCLIP, temperature: Optional[float] = None, head: Optional[nn.Module] = None) -> nn.Module:
    """The module to export for `model`'s interaction mode (or its feature `head`); `temperature` calibrates its
    probs. A CoCoOp context (image-conditioned prompts) is refused."""
    _check_model(model)
    if head is not None:
        return FeatureHeadGraph(model, head, temperature).eval()
    if getattr(model.prompt_context, "conditional", False):
        raise ValueError("a CoCoOp model's prompts depend on each image: its graph is not built")
    cls = BidirectionalGraph if model.interaction == "bidirectional" else TextCacheableGraph
    return cls(model, temperature).eval()


@contextmanager
def reference_ops(model: NearlCLIP, backend: str = "torch"):
    """Run the model on the PyTorch reference ops (NEARL_RT_BACKEND and model.backend overridden), or on another
    PyTorch-only backend: "graph" (nearl_rt.kernels.graph_ops, the fused export's forms)."""
    if backend not in ("torch", "graph"):
        raise ValueError(f"backend={backend!r}: an export traces 'torch' (the reference) or 'graph'")
    saved_backend, saved_env = model.backend, os.environ.get("NEARL_RT_BACKEND")
    model.backend = backend
    os.environ["NEARL_RT_BACKEND"] = backend
    try:
        yield model
    finally:
        model.backend = saved_backend
        if saved_env is None:
            del os.environ["NEARL_RT_BACKEND"]
        else:
            os.environ["NEARL_RT_BACKEND"] = saved_env
