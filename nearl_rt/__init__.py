"""nearl-rt: NEARL-CLIP (frozen CLIP + USEformer + OCA adapters), fast and deployable."""
from __future__ import annotations

from typing import Optional

from nearl_rt.backbone import build_backbone
from nearl_rt.checkpoint import load_checkpoint, save_checkpoint
from nearl_rt.config import PRESETS, NearlConfig, preset_config
from nearl_rt.errors import BackboneError, CheckpointError, NearlError, RandomBackboneWarning
from nearl_rt.model import NearlCLIP
from nearl_rt.tokenizer import tokenize

__version__ = "0.1.0"


def build_model(preset="vit_b16", *, interaction: str = "bidirectional", backend: str = "auto",
                pretrained: Optional[str] = None, backbone_init_seed: int = 0, **overrides) -> NearlCLIP:
    """Build NEARL-CLIP on a frozen open_clip backbone.

    preset: "vit_b16" (the paper's default), "vit_b32", "biomedclip", "tiny" / "tiny_bert" (CPU
    tests), or a NearlConfig.
    pretrained: a local open_clip / OpenAI CLIP weights file, or a model download folder (BiomedCLIP:
    open_clip_config.json + open_clip_pytorch_model.bin + tokenizer files); None = random backbone
    (warns: accuracy is then meaningless), drawn from `backbone_init_seed` on a private RNG so a
    checkpoint rebuilds it exactly. Nothing is ever downloaded.
    overrides: any NearlConfig field, e.g. oca_rank=16, orthogonal=False.
    """
    config = preset_config(preset, interaction=interaction, **overrides)
    backbone, identity = build_backbone(config.backbone, pretrained, quick_gelu=config.quick_gelu,
                                        init_seed=backbone_init_seed)
    config = config.replace(quick_gelu=identity.quick_gelu)
    return NearlCLIP(config, backbone, identity, backend=backend)


__all__ = ["BackboneError", "CheckpointError", "NearlCLIP", "NearlConfig", "NearlError", "PRESETS",
           "RandomBackboneWarning", "__version__", "build_model", "load_checkpoint", "preset_config",
           "save_checkpoint", "tokenize"]
