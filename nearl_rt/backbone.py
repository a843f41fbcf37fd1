"""Frozen open_clip backbones, built from local files or random init; never downloaded.

`pretrained` is either a weights file (open_clip or OpenAI CLIP) or a download folder in the layout
the Hugging Face hub serves open_clip models in: `open_clip_config.json`, the weights
(`open_clip_pytorch_model.bin` or a .safetensors) and, for a Hugging Face text tower such as
BiomedCLIP's PubMedBERT, the tokenizer files. open_clip itself would fetch that text tower's BERT
`config.json` from the hub; nearl-rt ships it (nearl_rt/hf/), so building is offline.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import json
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

from nearl_rt.core.hashing import sha256_file
from nearl_rt.core.errors import BackboneError, RandomBackboneWarning

CONFIG_DIR = Path(__file__).parent / "model_configs"
HF_DIR = Path(__file__).parent / "hf"
TEST_VOCAB_DIR = HF_DIR / "test-vocab"  # generated vocabulary for random-weight HF text towers
# Hugging Face text models whose config.json ships with nearl-rt: hub id (as open_clip configs name
# it) -> folder in nearl_rt/hf.
HF_CONFIGS = {
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract": "biomedbert-base-uncased-abstract",
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract": "biomedbert-base-uncased-abstract",  # its old name
    "nearl-tiny-bert": "nearl-tiny-bert",
}
# Keys of older hub configs (open_clip 3.x rejects them; dropping them would select mean pooling).
OLD_TEXT_KEYS = {"proj": "hf_proj_type", "pooler_type": "hf_pooler_type"}
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")  # open_clip's preference order
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# Config entries that do not change the network (download switches, the tokenizer's source).
_NOT_ARCHITECTURE = {"vision_cfg": {"timm_model_pretrained"},
                     "text_cfg": {"hf_model_pretrained", "hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode"}}
_registered = False


def register_model_configs() -> None:
    """Make the configs shipped with nearl_rt (nearl-tiny, nearl-tiny-bert, BiomedCLIP) known to
    open_clip, and the tiny test ViT known to timm."""
    global _registered
    if not _registered:
        import nearl_rt.timm_models  # noqa: F401 - registers the tiny timm ViT
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class BackboneIdentity:
    """What a checkpoint records about its backbone, to rebuild it (and to notice a mismatch)."""

    name: str
    sha256: Optional[str] = None   # of the weights file; None for random init
    path: Optional[str] = None     # the weights file or download folder it was built from (a hint)
    quick_gelu: bool = False
    init_seed: Optional[int] = None  # random init only: the seed that rebuilds the same weights


# ------------------------------------------------------------------------------------- configs
def model_config(name: str) -> dict:
    """The open_clip model config `name` (open_clip's own or one nearl-rt ships), ready to build offline."""
    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise BackboneError(f"unknown open_clip model {name!r}; known models include ViT-B-16, ViT-B-32, "
                            f"BiomedCLIP-PubMedBERT_256-vit_base_patch16_224, nearl-tiny (see open_clip.list_models())")
    return offline_config(cfg, f"open_clip model {name}")


def has_hf_text(cfg: dict) -> bool:
    """Whether a model config's text tower is a Hugging Face model (its tokenizer is a file set)."""
    return bool(cfg["text_cfg"].get("hf_model_name"))


def offline_config(cfg, source: str) -> dict:
    """A copy of `cfg` with old key names renamed, the Hugging Face text tower pointed at a local
    config.json, and every pretrained-tower download switched off."""
    if not (isinstance(cfg, dict) and isinstance(cfg.get("vision_cfg"), dict) and isinstance(cfg.get("text_cfg"), dict)
            and "embed_dim" in cfg):
        raise BackboneError(f"{source}: the model config needs embed_dim, vision_cfg and text_cfg entries")
    cfg = copy.deepcopy(cfg)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    for old, new in OLD_TEXT_KEYS.items():
        if old in text:
            value = text.pop(old)
            if text.setdefault(new, value) != value:
                raise BackboneError(f"{source}: text_cfg has both {old}={value!r} and {new}={text[new]!r}; "
                                    f"keep only {new} (the current name of {old})")
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False
    if text.get("hf_model_name"):
        if importlib.util.find_spec("transformers") is None:
            raise BackboneError(f"{source} has a Hugging Face text tower, which needs the transformers package: "
                                f"pip install 'nearl-rt[hf]'")
        text["hf_model_name"] = str(_hf_config_dir(text["hf_model_name"], source))
        text["hf_model_pretrained"] = False
    return cfg


def _hf_config_dir(hf_name: str, source: str) -> Path:
    if hf_name in HF_CONFIGS:
        return HF_DIR / HF_CONFIGS[hf_name]
    if (Path(hf_name) / "config.json").is_file():  # already a local folder
        return Path(hf_name).resolve()
    known = sorted(set(HF_CONFIGS) - {"nearl-tiny-bert"})
    raise BackboneError(f"{source}: text tower {hf_name!r} needs its Hugging Face config.json, which nearl-rt "
                        f"ships only for {known}; put that model's config.json in a folder and set "
                        f"text_cfg.hf_model_name to the folder's path")


def _architecture(cfg: dict, source: str) -> dict:
    """The entries of an (offline) model config that shape the network, with open_clip's defaults filled in."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    out = {k: v for k, v in cfg.items() if k not in ("vision_cfg", "text_cfg", "custom_text")}
    for key, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        try:
            full = dataclasses.asdict(cls(**cfg[key]))
        except TypeError as e:
            raise BackboneError(f"{source}: {key} is not an open_clip {cls.__name__} ({e})") from None
        out[key] = {k: v for k, v in full.items() if k not in _NOT_ARCHITECTURE[key]}
    return out


def _check_same_architecture(folder_cfg: dict, preset_cfg: dict, folder: Path, name: str) -> None:
    got, want = _architecture(folder_cfg, str(folder / CONFIG_FILE)), _architecture(preset_cfg, name)
    for key in sorted(set(got) | set(want), key=str):
        a, b = got.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = [f"{key}.{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            diff = [] if a == b else [f"{key}: {a!r} vs {b!r}"]
        if diff:
            raise BackboneError(f"{folder / CONFIG_FILE} describes another architecture than the preset's backbone "
                                f"{name} ({diff[0]}, folder vs preset); build the preset made for that model")


# ------------------------------------------------------------------------------ download folder
@dataclass(frozen=True)
class DownloadFolder:
    """A model folder as the Hugging Face hub serves open_clip models, read and checked."""

    path: Path
    model_cfg: dict        # offline-ready (see offline_config)
    preprocess_cfg: dict   # the folder's image preprocessing (mean, std, size, ...)
    weights: Path


def read_download_folder(path) -> DownloadFolder:
    """Parse and check a download folder; a BackboneError names what is missing or broken."""
    path = Path(path)
    hint = (f"expected the files of an open_clip hub model, e.g. microsoft/BiomedCLIP-PubMedBERT_256-"
            f"vit_base_patch16_224: {CONFIG_FILE}, {WEIGHTS_FILES[2]} and the tokenizer files")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise BackboneError(f"{path} has no {CONFIG_FILE}; {hint}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BackboneError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_cfg"), dict):
        raise BackboneError(f"{cfg_path} has no 'model_cfg' entry; {hint}")
    model_cfg = offline_config(raw["model_cfg"], str(cfg_path))
    _architecture(model_cfg, str(cfg_path))  # unknown options fail here, in one line
    weights = next((path / f for f in WEIGHTS_FILES if (path / f).is_file()), None)
    if weights is None:
        raise BackboneError(f"{path} holds no weights file (looked for {', '.join(WEIGHTS_FILES)}); {hint}")
    if has_hf_text(model_cfg) and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise BackboneError(f"{path} holds no tokenizer files ({' or '.join(TOKENIZER_FILES)}, with "
                            f"tokenizer_config.json); {hint}")
    preprocess = raw.get("preprocess_cfg") or {}
    if not isinstance(preprocess, dict):
        raise BackboneError(f"{cfg_path}: preprocess_cfg must be an object (mean, std, ...)")
    return DownloadFolder(path=path.resolve(), model_cfg=model_cfg, preprocess_cfg=preprocess, weights=weights)


def weights_file(pretrained) -> str:
    """The weights file that `pretrained` (a weights file or a download folder) stands for."""
    pretrained = os.fspath(pretrained)
    return os.fspath(read_download_folder(pretrained).weights) if os.path.isdir(pretrained) else pretrained


# ------------------------------------------------------------------------------------- weights
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


def create_open_clip(name: str, cfg: dict, quick_gelu: bool, init_seed: int, preprocess: Optional[dict] = None,
            device: str = "cpu"):
    """open_clip's model `name` built from the offline config `cfg` (it overrides the registered one)."""
    arch = {k: v for k, v in cfg.items() if k != "custom_text"}
    arch["quick_gelu"] = quick_gelu
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(init_seed)
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, pretrained_text=False,
                                      pretrained_image=False, device=device, force_preprocess_cfg=preprocess,
                                      **arch)


def build_backbone(name: str, pretrained: Optional[str] = None, quick_gelu: bool = False,
                   init_seed: int = RANDOM_INIT_SEED):
    """Build the frozen open_clip model `name`.

    pretrained: a local open_clip / OpenAI CLIP weights file, or a download folder (see the module
    docstring; required for Hugging Face text towers, whose tokenizer lives there), or None for
    random init (with a RandomBackboneWarning) drawn from `init_seed` on a private RNG, so that a
    checkpoint trained on it rebuilds the same backbone. Returns (model, BackboneIdentity). OpenAI
    TorchScript files switch on QuickGELU, as OpenAI's weights were trained with it.
    """
    cfg = model_config(name)
    preprocess, state_dict, sha, weights = None, None, None, None
    if pretrained is not None:
        pretrained = os.path.abspath(os.fspath(pretrained))
        if os.path.isdir(pretrained):
            folder = read_download_folder(pretrained)
            _check_same_architecture(folder.model_cfg, cfg, folder.path, name)
            cfg, preprocess, weights = folder.model_cfg, folder.preprocess_cfg, os.fspath(folder.weights)
        elif os.path.isfile(pretrained):
            if has_hf_text(cfg):
                raise BackboneError(f"{name} has a Hugging Face text tower whose tokenizer comes with the weights: "
                                    f"pass pretrained= the download folder holding {os.path.basename(pretrained)}, "
                                    f"{CONFIG_FILE} and the tokenizer files, not the weights file alone")
            weights = pretrained
        else:
            raise BackboneError(f"backbone weights not found: {pretrained}. nearl-rt never downloads weights: pass "
                                f"the path of a local open_clip / OpenAI CLIP checkpoint or a model download folder")
        state_dict, is_openai = _read_state_dict(weights)
        quick_gelu = quick_gelu or is_openai
        sha = sha256_file(weights)
    else:
        warnings.warn(f"backbone {name} has random weights (pretrained=None): logits and accuracy are "
                      f"meaningless; pass pretrained=PATH to a local CLIP weights file for real use",
                      RandomBackboneWarning, stacklevel=3)
    quick_gelu = bool(quick_gelu or cfg.get("quick_gelu", False))
    model = create_open_clip(name, cfg, quick_gelu, init_seed, preprocess)
    if state_dict is not None:
        _load_weights(model, state_dict, weights, name)
    model.requires_grad_(False).eval()
    if pretrained is None:
        return model, BackboneIdentity(name=name, quick_gelu=quick_gelu, init_seed=init_seed)
    return model, BackboneIdentity(name=name, sha256=sha, path=pretrained, quick_gelu=quick_gelu)


@functools.lru_cache(maxsize=None)
def meta_backbone(name: str):
    """The architecture of open_clip model `name` on the meta device: every shape, no memory, no weights."""
    with torch.device("meta"):  # allocate nothing (create_model's own device= builds on the CPU first)
        return create_open_clip(name, model_config(name), False, RANDOM_INIT_SEED, device="meta")


def _load_weights(model, state_dict: dict, path: str, name: str) -> None:
    from open_clip.factory import convert_state_dict, resize_pos_embed, resize_text_pos_embed

    def misfit(detail: str) -> BackboneError:
        return BackboneError(f"{path} does not fit open_clip model {name}: {detail}. "
                             f"Check that the preset's backbone matches the weights file")
    try:
        state_dict = convert_state_dict(model, state_dict)
        # e.g. CLIP's attn_mask (saved by TorchScript archives), BERT's position_ids (saved by transformers < 4.31)
        buffers = {n for n, _ in model.named_buffers()}
        state_dict = {k: v for k, v in state_dict.items() if k not in buffers}
        own = set(model.state_dict())
        missing = sorted(own - set(state_dict) - {"logit_bias"})
        unexpected = sorted(set(state_dict) - own)
        if missing or unexpected:  # before the resizing helpers, which assume the model's own layout
            raise misfit(f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} "
                         f"unexpected keys (e.g. {unexpected[:3]})")
        if "logit_scale" in state_dict and model.logit_scale.ndim != state_dict["logit_scale"].ndim:
            state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
        resize_pos_embed(state_dict, model)
        resize_text_pos_embed(state_dict, model)
        model.load_state_dict(state_dict, strict=False)
    except (AssertionError, RuntimeError, KeyError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [e.__class__.__name__]
        shapes = [line for line in lines if line.startswith("size mismatch")]
        raise misfit(f"{len(shapes)} tensors of another shape (e.g. {shapes[0]})" if shapes else lines[0]) from None
    logging.getLogger(__name__).info("loaded backbone weights %s into %s", path, name)
