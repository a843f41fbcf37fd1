"""Tower adapters: the per-layer view of a frozen CLIP tower that NEARL's lock-step forward drives.

NearlCLIP runs one loop whatever the towers are:
    x = vision.embed(images);              p = text.prompts(tokens, trim);  t, mask = text.embed(p, dtype, context)
    per layer l:  x = vision.block(l, x);  t = text.block(l, t, mask)      (+ USEformer and OCAs)
    image = vision.features(x);            text = text.features(t, p.pool)
Each kind of tower is one small module behind these two protocols:
    vision: openclip_vit (open_clip VisionTransformer) | timm_vit (timm ViT in open_clip's TimmModel)
    text:   clip_text (open_clip's causal text transformer) | hf_bert (HF BERT in open_clip's HFTextEncoder)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from nearl_rt.core.errors import BackboneError


@dataclass
class PromptBatch:
    tokens: torch.Tensor    # [C, n] prompt tokens, trimmed to the longest real prompt
    pool: torch.Tensor      # [C] position each prompt's feature is read from (CLIP: EOT, BERT: CLS = 0)
    valid: torch.Tensor     # [C, n] bool, False at padding


class VisionTower(Protocol):
    blocks: Sequence[nn.Module]
    width: int
    patch_size: tuple     # (height, width) of a patch in pixels
    prefix_tokens: int    # tokens before the patch tokens (CLS, registers)

    @property
    def dtype(self) -> torch.dtype: ...
    def embed(self, images: torch.Tensor) -> torch.Tensor: ...               # [B, 3, H, W] -> [B, N, D]
    def block(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...
    def input_norm(self, layer: int) -> nn.Module: ...                       # block's first LayerNorm: what its attention reads
    def features(self, x: torch.Tensor) -> torch.Tensor: ...                 # pooled + projected [B, E]


class TextTower(Protocol):
    blocks: Sequence[nn.Module]
    width: int
    output_dim: int       # E, the joint embedding width
    vocab_size: int
    context_length: int   # the longest token sequence the tower takes
    token_embedding: nn.Embedding  # token id -> [width], before positions are added

    def prompts(self, tokens: torch.Tensor, trim: bool) -> PromptBatch: ...
    # (t, mask); `context` (CoOp's nearl_rt.coop.PromptContext) rewrites the token embeddings before positions
    def embed(self, p: PromptBatch, dtype: torch.dtype,
              context: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]: ...
    def repeat_mask(self, mask: torch.Tensor, times: int) -> torch.Tensor: ...  # mask for rows b*C + c
    def block(self, layer: int, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...
    def features(self, t: torch.Tensor, pool: torch.Tensor) -> torch.Tensor: ...  # pooled + projected


def build_towers(backbone: nn.Module, name: str) -> tuple[VisionTower, TextTower]:
    """The adapters for an open_clip model's two towers; a BackboneError for any other kind of tower."""
    from nearl_rt.towers import clip_text, hf_bert, openclip_vit, timm_vit
    vision = next((kind.tower(backbone, name) for kind in (openclip_vit, timm_vit) if kind.accepts(backbone)), None)
    if vision is None:
        raise BackboneError(f"backbone {name}: image tower {type(getattr(backbone, 'visual', None)).__name__} is not "
                            f"supported; NEARL-CLIP runs on open_clip VisionTransformer and timm ViT (TimmModel) towers")
    text = next((kind.tower(backbone, name) for kind in (clip_text, hf_bert) if kind.accepts(backbone)), None)
    if text is None:
        tower = getattr(backbone, "text", backbone)
        raise BackboneError(f"backbone {name}: text tower {type(tower).__name__} is not supported; NEARL-CLIP runs on "
                            f"open_clip CLIP text transformers and Hugging Face BERT (HFTextEncoder) towers")
    if len(vision.blocks) != len(text.blocks):
        raise BackboneError(f"{name} has {len(vision.blocks)} vision and {len(text.blocks)} text layers; NEARL-CLIP's "
                            f"lock-step forward needs the same depth")
    return vision, text


__all__ = ["PromptBatch", "TextTower", "VisionTower", "build_towers"]
