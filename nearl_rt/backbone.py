"""Frozen open_clip backbones, built from a local weights file or random init; never downloaded."""
from __future__ import annotations

import logging
import os
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import open_clip
import torch

from export.hashing import sha256_file  # noqa: F401 - nearl_rt.backbone.sha256_file is used across the project
from nearl_rt.errors import BackboneError, RandomBackboneWarning

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make the configs shipped with nearl_rt (e.g. `nearl-tiny`) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class BackboneIdentity:
    """What a checkpoint records about its backbone, to rebuild it (and to notice a mismatch)."""

    name: str
    sha256: Optional[str] = None   # of the weights file; None for random init
    path: Optional[str] = None     # where the weights file was when the model was built (a hint)
    quick_gelu: bool = False
    init_seed: Optional[int] = None  # random init only: the seed that rebuilds the same weights


def _is_torchscript_archive(path: str) -> bool:
    """OpenAI's CLIP releases are TorchScript archives (a zip holding `constants.pkl`/`code/`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _read_state_dict(path: str) -> tuple[dict, bool]:
    """Load a weights file without unpickling arbitrary objects. Returns (state_dict, is_openai)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu"), False
    if _is_torchscript_archive(path):
        # TorchScript's loader only rebuilds TorchScript modules and tensors (no arbitrary Python).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(key, None)
        return sd, True
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means "not a weights file"
        raise BackboneError(f"cannot read backbone weights {path}: {e.__class__.__name__}: {e}. Expected an "
                            f"open_clip checkpoint (.pt/.bin/.safetensors) or an OpenAI CLIP .pt file") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise BackboneError(f"{path} holds no state dict of tensors")
    if next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, False


RANDOM_INIT_SEED = 0


@contextmanager
def _quiet_open_clip():
    """Drop open_clip's "No pretrained weights loaded" log line: nearl-rt loads the weights itself
    (the line would be wrong) or has already warned about random weights."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")
    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def build_backbone(name: str, pretrained: Optional[str] = None, quick_gelu: bool = False,
                   init_seed: int = RANDOM_INIT_SEED):
    """Build the frozen open_clip model `name`.

    pretrained: path to a local open_clip or OpenAI CLIP weights file, or None for random init
    (with a RandomBackboneWarning) drawn from `init_seed` on a private RNG, so that a checkpoint
    trained on it rebuilds the same backbone. Returns (model, BackboneIdentity). OpenAI
    TorchScript files switch on QuickGELU, as OpenAI's weights were trained with it.
    """
    register_model_configs()
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown open_clip model {name!r}; known models include "
                            f"ViT-B-16, ViT-B-32, nearl-tiny (see open_clip.list_models())")
    state_dict, sha = None, None
    if pretrained is not None:
        pretrained = os.fspath(pretrained)
        if not os.path.isfile(pretrained):
            raise BackboneError(f"backbone weights file not found: {pretrained}. nearl-rt never downloads "
                                f"weights: pass the path of a local open_clip or OpenAI CLIP checkpoint")
        state_dict, is_openai = _read_state_dict(pretrained)
        quick_gelu = quick_gelu or is_openai
        sha = sha256_file(pretrained)
    else:
        warnings.warn(f"backbone {name} has random weights (pretrained=None): logits and accuracy are "
                      f"meaningless; pass pretrained=PATH to a local CLIP weights file for real use",
                      RandomBackboneWarning, stacklevel=3)
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(init_seed)
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu,
                                       pretrained_text=False, pretrained_image=False, device="cpu")
    if state_dict is not None:
        _load_weights(model, state_dict, pretrained, name)
    model.requires_grad_(False).eval()
    if pretrained is None:
        return model, BackboneIdentity(name=name, quick_gelu=quick_gelu, init_seed=init_seed)
    return model, BackboneIdentity(name=name, sha256=sha, path=os.path.abspath(pretrained), quick_gelu=quick_gelu)


def _load_weights(model, state_dict: dict, path: str, name: str) -> None:
    from open_clip.factory import convert_state_dict, resize_pos_embed, resize_text_pos_embed

    def misfit(detail: str) -> BackboneError:
        return BackboneError(f"{path} does not fit open_clip model {name}: {detail}. "
                             f"Check that the preset's backbone matches the weights file")
    try:
        state_dict = convert_state_dict(model, state_dict)
        if "logit_scale" in state_dict and model.logit_scale.ndim != state_dict["logit_scale"].ndim:
            state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
        resize_pos_embed(state_dict, model)
        resize_text_pos_embed(state_dict, model)
        buffers = {n for n, _ in model.named_buffers()}  # e.g. attn_mask, saved by TorchScript archives
        result = model.load_state_dict({k: v for k, v in state_dict.items() if k not in buffers}, strict=False)
    except (AssertionError, RuntimeError, KeyError, ValueError) as e:
        raise misfit(str(e).splitlines()[0] if str(e) else e.__class__.__name__) from None
    missing = [k for k in result.missing_keys if k != "logit_bias"]
    if missing or result.unexpected_keys:
        raise misfit(f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(result.unexpected_keys)} "
                     f"unexpected keys (e.g. {result.unexpected_keys[:3]})")
    logging.getLogger(__name__).info("loaded backbone weights %s into %s", path, name)
