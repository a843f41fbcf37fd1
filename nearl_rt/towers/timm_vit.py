"""A timm VisionTransformer inside open_clip's TimmModel (BiomedCLIP: vit_base_patch16_224, `head.proj`).

The per-layer loop replays timm's forward_features (patch_embed, _pos_embed, patch_drop, norm_pre,
blocks, norm) and TimmModel's head(trunk.forward_head(...)), so it equals `visual(images)` exactly.
"""
from __future__ import annotations

import torch
from torch import nn
from open_clip.timm_model import TimmModel
from timm.models.vision_transformer import VisionTransformer

from nearl_rt.core.errors import BackboneError


def accepts(backbone) -> bool:
    return isinstance(getattr(backbone, "visual", None), TimmModel)


def tower(backbone, name: str) -> "TimmVision":
    return TimmVision(backbone.visual, name)


class TimmVision:
    def __init__(self, visual: TimmModel, name: str):
        if not isinstance(visual.trunk, VisionTransformer):
            raise BackboneError(f"backbone {name}: timm image tower {type(visual.trunk).__name__} is not supported; "
                                f"NEARL-CLIP runs on timm VisionTransformer trunks")
        self.visual, self.trunk = visual, visual.trunk
        self.blocks = list(visual.trunk.blocks)
        self.width = visual.trunk.embed_dim
        self.patch_size = tuple(visual.trunk.patch_embed.patch_size)
        self.prefix_tokens = visual.trunk.num_prefix_tokens  # CLS and register tokens

    @property
    def dtype(self) -> torch.dtype:
        return self.trunk.patch_embed.proj.weight.dtype

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        return trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images.to(self.dtype)))))

    def block(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[layer](x)

    def input_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].norm1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(x)))
