"""The modules that become ONNX graphs: a NearlCLIP classifier with its class prompts baked in.

Both take `images` float32 [B, 3, H, W] (normalised) and return (`logits`, `probs`) float32 [B, C].

- bidirectional: the whole lock-step model; the trimmed class prompts are constants and the text
  tower runs for B x C rows inside the graph.
- text_cacheable: image tower + USEformer + OCA; the cached class text stream (class text features
  and the per-layer prompt tokens the USEformer reads) are constants.

Both run the PyTorch reference ops (fused Triton kernels are not ONNX ops). A float16 model casts
the float32 input itself (its embedding layers do); the reference OCA accumulates the orthogonal
split in float32, and the logits and softmax run in float32 here.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from nearl_rt.model import NearlCLIP, PromptBatch, TextStream
from nearl_rt.prompts import pool_prompts


def _check_model(model) -> None:
    if not isinstance(model, NearlCLIP):
        raise TypeError(f"expected a nearl_rt NearlCLIP model, got {type(model).__name__}")
    if not model.class_names:
        raise ValueError("the model has no classes: call model.set_classes([...]) before exporting")


class _Classifier(nn.Module):
    def __init__(self, model: NearlCLIP):
        super().__init__()
        _check_model(model)
        self.model = model

    @staticmethod
    def _outputs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        return logits, torch.softmax(logits, dim=-1)


class BidirectionalGraph(_Classifier):
    """images -> (logits, probs) of the whole lock-step model, class prompts as constants."""

    def __init__(self, model: NearlCLIP):
        super().__init__(model)
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

    def __init__(self, model: NearlCLIP):
        super().__init__(model)
        with torch.no_grad():
            self.text: TextStream = model.encode_text_stream(model.class_tokens)
            self.class_features = pool_prompts(self.text.features, model.prompt_pool)  # prompt ensemble

    def forward(self, images: torch.Tensor):
        m = self.model
        img = m.encode_images(images, self.text)
        return self._outputs(m.scaled_logits(img.float(), self.class_features.float()))


def export_module(model: NearlCLIP) -> nn.Module:
    """The module to export for `model`'s interaction mode."""
    _check_model(model)
    cls = BidirectionalGraph if model.interaction == "bidirectional" else TextCacheableGraph
    return cls(model).eval()


@contextmanager
def reference_ops(model: NearlCLIP):
    """Run the model on the PyTorch reference ops (NEARL_RT_BACKEND and model.backend overridden)."""
    saved_backend, saved_env = model.backend, os.environ.get("NEARL_RT_BACKEND")
    model.backend = "torch"
    os.environ["NEARL_RT_BACKEND"] = "torch"
    try:
        yield model
    finally:
        model.backend = saved_backend
        if saved_env is None:
            del os.environ["NEARL_RT_BACKEND"]
        else:
            os.environ["NEARL_RT_BACKEND"] = saved_env
