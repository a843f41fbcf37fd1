"""timm architectures nearl-rt ships: the tiny ViT image tower of the `tiny_bert` test preset.

timm builds towers by registered name only (open_clip's TimmModel passes no widths), so the tiny
tower is a registered timm model, like timm's own `vit_base_patch16_224` that BiomedCLIP uses.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

TINY_VIT = "nearl_vit_tiny_patch8_32"

# No pretrained weights exist (nearl-rt never downloads any): the cfg only names the input size.
default_cfgs = generate_default_cfgs({TINY_VIT: {"input_size": (3, 32, 32), "num_classes": 0}})


@register_model
def nearl_vit_tiny_patch8_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT with 2 blocks, width 64, 2 heads, 8x8 patches of a 32x32 image (CPU tests)."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    return build_model_with_cfg(VisionTransformer, TINY_VIT, pretrained=pretrained, **{**args, **kwargs})
