"""open_clip's own VisionTransformer image tower (OpenAI / LAION CLIP): CLS pooling after ln_post, `proj`."""
from __future__ import annotations

import torch
from torch import nn
from open_clip.transformer import VisionTransformer

from nearl_rt.core.errors import BackboneError


def accepts(backbone) -> bool:
    return isinstance(getattr(backbone, "visual", None), VisionTransformer)


def tower(backbone, name: str) -> "OpenClipVision":
    return OpenClipVision(backbone.visual, name)


class OpenClipVision:
    def __init__(self, visual: VisionTransformer, name: str):
        if not visual.transformer.batch_first:
            raise BackboneError(f"backbone {name}: open_clip's vision transformer must run batch_first")
        self.visual = visual
        self.blocks = list(visual.transformer.resblocks)
        self.width = visual.transformer.width
        self.patch_size = tuple(visual.patch_size)
        self.prefix_tokens = 1  # the class embedding

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(images.to(self.dtype))

    def block(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[layer](x)

    def input_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].ln_1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(x)
        return pooled if self.visual.proj is None else pooled @ self.visual.proj
