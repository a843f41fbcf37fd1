"""Adapter checkpoints: adapter weights + config + classes + backbone identity + format version.

A checkpoint is a torch zip file holding only tensors and plain Python values, read back with
`torch.load(weights_only=True)`: nothing else is ever unpickled. Writes are atomic.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from pathlib import Path
from typing import Optional

import torch

from nearl_rt.adapters import expected_adapter_shapes, state_mismatch
from nearl_rt.core.atomic import atomic_output
from nearl_rt.backbone import weights_file
from nearl_rt.core.hashing import sha256_file
from nearl_rt.config import NearlConfig
from nearl_rt.core.errors import CheckpointError

FORMAT = "nearl-rt-checkpoint"
FORMAT_VERSION = 1


def non_finite_tensor(tensors: dict) -> Optional[str]:
    """'name (n of N values)' of the first floating tensor holding NaN or Inf, or None when all are finite."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return f"{name} ({bad} of {t.numel()} values)"
    return None


def checkpoint_payload(model, extra: Optional[dict] = None) -> dict:
    """Everything a checkpoint (or a save-pretrained folder) stores about `model`: plain values and the adapter
    tensors. Non-finite (NaN/Inf) adapter weights are refused: what is written is always loadable."""
    from nearl_rt import __version__
    bad = non_finite_tensor(model.adapter_state_dict())
    if bad:
        raise CheckpointError(f"adapter tensor {bad} is NaN or Inf (the model diverged); nothing was written")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nearl_rt_version": __version__,
        "config": model.config.to_dict(),
        "class_names": list(model.class_names),
        "template": model.template,
        "templates": model.templates,  # a template, an ensemble list or per-class prompts (plain values)
        "multi_label": bool(model.multi_label),  # findings: templates = {"positive": ..., "negative": ...}
        "backbone": dataclasses.asdict(model.backbone_identity),
        "adapter": {k: v.detach().cpu().clone() for k, v in model.adapter_state_dict().items()},
        "extra": dict(extra or {}),
    }


def save_checkpoint(model, path, extra: Optional[dict] = None) -> Path:
    """Write `model`'s adapter weights and everything needed to rebuild it to `path` (atomically).
    Non-finite (NaN/Inf) adapter weights are refused: a checkpoint is always loadable."""
    try:
        payload = checkpoint_payload(model, extra)
    except CheckpointError as e:
        raise CheckpointError(f"not writing {path}: {e}") from None
    path = Path(path)
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


def is_onnx_file(path) -> bool:
    """Whether `path` is an ONNX model: named .onnx, or (a checkpoint is a zip file) a protobuf that parses as an
    ONNX model with a graph. False for a folder or a missing path (read_checkpoint says what they are)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    if not path.is_file() or zipfile.is_zipfile(path):
        return False
    with open(path, "rb") as f:
        if f.read(1) != b"\x08":  # ModelProto's first field, ir_version (field 1, varint)
            return False
    import onnx
    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others on arbitrary bytes
        return False


def read_checkpoint(path) -> dict:
    """Read and validate a checkpoint file's contents (or a save-pretrained folder's, nearl_rt.pretrained)
    without building a model."""
    path = Path(path)
    if path.is_dir():
        from nearl_rt.pretrained import read_pretrained
        return read_pretrained(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_onnx_file(path):
        raise CheckpointError(f"{path} is an exported ONNX model, not a nearl-rt checkpoint: serve it with "
                              f"nearl_rt.NearlSession (evaluate and predict take it as it is); load_checkpoint needs "
                              f"the .pt checkpoint it was exported from")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"{path} holds Python objects other than tensors and plain values; nearl-rt "
                                  f"refuses to unpickle them (unsafe). It is not a nearl-rt checkpoint") from None
        raise CheckpointError(f"{path} is not a nearl-rt checkpoint (unreadable: {e})") from None
    # IndexError / KeyError: torch's legacy unpickler on bytes that are no pickle (an empty stack, an unknown memo)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path} is damaged or truncated, or not a nearl-rt checkpoint "
                              f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nearl-rt checkpoint (no '{FORMAT}' format marker); "
                              f"write checkpoints with nearl_rt.save_checkpoint")
    return validate_payload(payload, path)


def validate_payload(payload: dict, path) -> dict:
    """Check a checkpoint's contents (format version, entries, adapter shapes against the config, finite values);
    returns it with its config as a NearlConfig."""
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        hint = "upgrade nearl-rt" if isinstance(version, int) and version > FORMAT_VERSION else "re-save it"
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this nearl-rt reads version "
                              f"{FORMAT_VERSION} ({hint})")
    for key, typ in (("config", dict), ("adapter", dict), ("backbone", dict), ("class_names", list)):
        if not isinstance(payload.get(key), typ):
            raise CheckpointError(f"{path} is missing its '{key}' entry (damaged checkpoint)")
    try:
        payload["config"] = NearlConfig.from_dict(payload["config"])
        problem = state_mismatch(expected_adapter_shapes(payload["config"]), payload["adapter"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid config: {e}") from None
    if problem:
        raise CheckpointError(f"{path}: {problem}. The checkpoint's weights are for a different preset or config")
    head = (payload.get("extra") or {}).get("linear_head")
    bad = non_finite_tensor({**payload["adapter"], **({f"linear_head.{k}": v for k, v in head.items()}
                                                         if isinstance(head, dict) else {})})
    if bad:
        raise CheckpointError(f"{path}: tensor {bad} is NaN or Inf, so every prediction would be; the training "
                              f"that wrote it diverged. Use an earlier checkpoint or retrain with a lower --lr")
    return payload


def checkpoint_sha256(path) -> str:
    """What identifies a checkpoint (recorded in exports): its file's sha256, or a save-pretrained folder's
    adapter.safetensors'."""
    from nearl_rt.pretrained import ADAPTER_FILE
    path = Path(path)
    return sha256_file(path / ADAPTER_FILE if path.is_dir() else path)


def update_extra(path, entries: dict) -> Path:
    """Rewrite checkpoint `path` (validated first) with `entries` merged into its `extra`, atomically; everything
    else stays as it was."""
    read_checkpoint(path)
    if Path(path).is_dir():
        raise CheckpointError(f"{path} is a save-pretrained folder, written once with its model card: change the "
                              f"checkpoint it came from (e.g. calibrate it), then save-pretrained it again")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["extra"] = {**(payload.get("extra") or {}), **entries}
    with atomic_output(Path(path)) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _resolve_pretrained(path, backbone: dict, pretrained) -> Optional[str]:
    want = backbone.get("sha256")
    if want is None:
        return None  # trained on a random-init backbone: rebuild it the same way
    candidates = [pretrained] if pretrained is not None else [backbone.get("path")]
    for cand in candidates:  # a weights file, or a download folder holding one
        if cand is not None and os.path.exists(cand):
            got = sha256_file(weights_file(cand))
            if got != want:
                raise CheckpointError(f"backbone weights {cand} (sha256 {got[:12]}…) are not the ones {path} was "
                                      f"trained on (sha256 {want[:12]}…); pass pretrained= the original file")
            return os.fspath(cand)
        if cand is not None and pretrained is not None:
            raise CheckpointError(f"backbone weights file or folder not found: {cand}")
    raise CheckpointError(f"{path} was trained on {backbone.get('name')} weights with sha256 {want[:12]}… "
                          f"(originally {backbone.get('path')}); pass pretrained=PATH to that file (or download folder) "
                          f"on this machine")


def load_checkpoint(path, *, pretrained=None, backend: str = "auto", interaction: Optional[str] = None):
    """Rebuild the model a checkpoint was saved from: backbone, adapter weights, classes.

    pretrained: the backbone weights file on this machine (checked against the stored sha256);
    defaults to the path recorded at training time. interaction: override the stored mode.
    """
    from nearl_rt.model import build_model
    payload = read_checkpoint(path)
    config: NearlConfig = payload["config"]
    if interaction is not None:
        config = config.replace(interaction=interaction)
    weights = _resolve_pretrained(path, payload["backbone"], pretrained)
    seed = payload["backbone"].get("init_seed")
    model = build_model(config, interaction=config.interaction, backend=backend, pretrained=weights,
                        **({} if weights is not None or seed is None else {"backbone_init_seed": seed}))
    try:
        model.load_adapter_state_dict(payload["adapter"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}. The checkpoint's weights are for a different preset or config") from None
    if payload["class_names"] and payload.get("multi_label"):
        model.set_findings(payload["class_names"], **payload["templates"])
    elif payload["class_names"]:
        model.set_classes(payload["class_names"], payload.get("templates") or payload["template"] or "a photo of {}.")
    return model


def load_adapter_weights(model, path) -> dict:
    """Load a checkpoint's adapter weights into an existing model of the same config. Returns the payload."""
    payload = read_checkpoint(path)
    stored, own = payload["config"].to_dict(), model.config.to_dict()
    differ = [k for k in own if k != "interaction" and stored.get(k) != own[k]]
    if differ:
        detail = ", ".join(f"{k}: checkpoint {stored.get(k)!r} vs model {own[k]!r}" for k in differ)
        raise CheckpointError(f"{path} holds weights for a different preset/config ({detail})")
    try:
        model.load_adapter_state_dict(payload["adapter"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return payload
