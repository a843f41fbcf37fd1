"""A trained run's classifier, whatever the method: NEARL adapters, zero-shot CLIP, CoOp's learned prompt
context, or a linear probe on frozen image features. Shared by training (validation), evaluation and
prediction."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nearl_rt.calibration import Calibration
from nearl_rt.checkpoint import load_checkpoint, read_checkpoint
from nearl_rt.coop import attach_context, coop_template
from nearl_rt.data import DataError, Preprocess, Split, load_images
from nearl_rt.core.errors import CheckpointError
from nearl_rt.methods import METHODS, REGISTRY


def resolve_device(arg: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; otherwise a cpu or an existing cuda device (clear errors)."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise ValueError(f"--device {arg!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {arg!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {arg}: CUDA is not available on this machine; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {arg}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def frozen_image_features(model, images: torch.Tensor) -> torch.Tensor:
    """The frozen backbone's L2-normalised image features [B, E] (what a linear probe reads)."""
    return F.normalize(model.backbone.encode_image(images.to(model.dtype)), dim=-1)


class Classifier:
    """logits(images) for a NEARL-CLIP model and a registered method (nearl_rt.methods): `head` = (weight [C, E],
    bias [C]) makes it a linear probe, a feature head module (nearl_rt.feature_heads) a feature-level method; a
    model with a `prompt_context` (nearl_rt.coop, nearl_rt.prompt_learners) is a prompt learner. `calibration`
    (the checkpoint's, nearl_rt.calibration) makes its probabilities: softmax(logits / temperature)."""

    def __init__(self, model, method: str = "nearl", head=None, calibration: Optional[Calibration] = None):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
        kind = REGISTRY[method].kind
        if (kind in ("probe", "features")) != (head is not None):
            raise ValueError(f"a {method} classifier {'needs its head' if head is None else 'takes no head'}")
        if (kind == "prompt") != (model.prompt_context is not None):
            raise ValueError(f"a {method} classifier {'needs' if kind == 'prompt' else 'has no'} prompt_context "
                             f"(nearl_rt.coop.attach_context)")
        self.model, self.method, self.head = model, method, head
        # a multi-label model's probabilities are per finding: sigmoid (nearl_rt.multilabel)
        self.calibration = replace(calibration or Calibration(), multi_label=bool(model.multi_label))

    @property
    def multi_label(self) -> bool:
        return bool(self.model.multi_label)

    @property
    def random_backbone(self) -> bool:
        """Whether the frozen backbone has random weights (its outputs are a pipeline check, nothing more)."""
        return self.model.backbone_identity.sha256 is None

    @property
    def class_names(self) -> list:
        return self.model.class_names

    @property
    def device(self) -> torch.device:
        return self.model.class_tokens.device

    @property
    def preprocess_cfg(self) -> dict:
        return self.model.preprocess_cfg

    def set_classes(self, class_names: Sequence[str]) -> None:
        """Score another class set (base/novel, cross-dataset) with the run's prompts or CoOp context."""
        names = list(class_names)
        if names == self.class_names:
            return
        if self.multi_label:
            raise DataError(f"a multi-label model scores the findings it was trained on {self.class_names}, not "
                            f"{names}")
        if self.head is not None:
            raise DataError(f"a {self.method} head scores only the classes it was fitted on {self.class_names}; "
                            f"it cannot score {names}")
        context = self.model.prompt_context
        self.model.set_classes(names, self.model.templates if context is None else coop_template(context.length))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        if self.head is None:
            context = self.model.prompt_context
            if context is not None and context.conditional:  # CoCoOp: prompts conditioned on each image
                return context.classify(self.model, frozen_image_features(self.model, images))
            return self.model.classify(images)
        if isinstance(self.head, torch.nn.Module):
            return self.head(frozen_image_features(self.model, images).float())
        weight, bias = self.head
        return frozen_image_features(self.model, images).to(weight.dtype) @ weight.t() + bias

    @torch.no_grad()
    def split_logits(self, split: Split, preprocess: Preprocess, batch_size: int = 64,
                     skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
        """Raw logits [N, C] (float32) for a split's images (see score_split)."""
        self.model.eval()
        return score_split(lambda x: self.logits(x).float().cpu().numpy(), split, preprocess, batch_size, skip_bad)

    def probabilities(self, split: Split, preprocess: Preprocess, batch_size: int = 64,
                      skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
        """Calibrated class probabilities [N, C] for a split's images (see score_split)."""
        return calibrated(self, split, preprocess, batch_size, skip_bad)

    def checkpoint_extra(self) -> dict:
        extra = {"method": self.method}
        if self.head is not None and not isinstance(self.head, torch.nn.Module):
            extra["linear_head"] = {"weight": self.head[0].detach().cpu(), "bias": self.head[1].detach().cpu()}
        if isinstance(self.head, torch.nn.Module):
            extra["feature_head"] = {"kind": self.method, "state": self.head.state()}
        if self.model.prompt_context is not None:
            extra.update(self.model.prompt_context.checkpoint_entries())
        return extra


class OnnxClassifier:
    """An exported model file (fp32, fp16 or int8 .onnx) scored through nearl_rt.NearlSession, the
    way it is served, so its metrics compare with its checkpoint's on the same images. Its calibration is the
    one the file carries (its graph's probs are softmax(logits / temperature))."""

    def __init__(self, path):
        from nearl_rt.core.session import NearlSession
        self.session = NearlSession(path)
        self.method = f"onnx ({self.session.metadata.get('precision', 'fp32')})"
        self.calibration = Calibration(self.session.temperature, self.session.operating_point,
                                       dict(self.session.thresholds), multi_label=self.session.multi_label)

    @property
    def multi_label(self) -> bool:
        return self.session.multi_label

    @property
    def random_backbone(self) -> bool:
        return not self.session.metadata.get("backbone_sha256")

    @property
    def class_names(self) -> list:
        return self.session.class_names

    @property
    def preprocess_cfg(self) -> dict:
        meta = self.session.metadata
        return {"size": self.session.input_size[0], "mean": meta["mean"], "std": meta["std"],
                "interpolation": meta.get("interpolation", "bicubic")}

    def set_classes(self, class_names: Sequence[str]) -> None:
        """An exported file scores the class set its graph was exported with, and only that one."""
        if list(class_names) != self.class_names:
            raise DataError(f"an exported .onnx file scores only the classes it was exported with "
                            f"{self.class_names}, not {list(class_names)}: score its checkpoint with --classes")

    def split_logits(self, split: Split, preprocess: Preprocess, batch_size: int = 64,
                     skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
        return score_split(lambda x: self.session.run(x.numpy())[0], split, preprocess, batch_size, skip_bad)

    def probabilities(self, split: Split, preprocess: Preprocess, batch_size: int = 64,
                      skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
        return calibrated(self, split, preprocess, batch_size, skip_bad)


def calibrated(classifier, split: Split, preprocess: Preprocess, batch_size: int,
               skip_bad: bool) -> tuple[np.ndarray, np.ndarray, list]:
    """(softmax(logits / the classifier's temperature) [N, C] in float64, kept indices, skipped images)."""
    logits, kept, skipped = classifier.split_logits(split, preprocess, batch_size, skip_bad)
    return classifier.calibration.probabilities(logits), kept, skipped


def score_split(probs_of, split: Split, preprocess: Preprocess, batch_size: int,
                skip_bad: bool) -> tuple[np.ndarray, np.ndarray, list]:
    """`probs_of(preprocessed float32 batch) -> [b, C]` (logits or probabilities) over a split's images, read a
    batch at a time. Returns (scores [N, C], kept indices, skipped image descriptions)."""
    probs, kept, skipped = [], [], []
    for start in range(0, len(split), batch_size):
        idx = list(range(start, min(start + batch_size, len(split))))
        images, ok, bad = load_images(split.subset(idx), skip_bad, preprocess.intensity)
        skipped += bad
        if images:
            probs.append(probs_of(preprocess.eval(images)))
            kept.append(np.asarray(idx)[ok])
    if not probs:
        raise DataError(f"no readable images to score ({len(skipped)} skipped)")
    return np.concatenate(probs), np.concatenate(kept), skipped


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, a save-pretrained folder, or a run directory (its best.pt)."""
    from nearl_rt.pretrained import is_pretrained_folder
    path = Path(path)
    if path.is_dir() and not is_pretrained_folder(path):
        best = path / "best.pt"
        if not best.is_file():
            raise CheckpointError(f"run directory {path} has no best.pt (training not finished an epoch yet?)")
        return best
    return path


def load_classifier(path, *, pretrained=None, backend: str = "auto",
                    device: Optional[torch.device] = None) -> tuple[Classifier, dict]:
    """Rebuild the classifier a checkpoint (or run directory) holds, or open an exported .onnx file (scored
    with onnxruntime; pretrained/backend/device do not apply). Returns (classifier, checkpoint extra)."""
    if Path(path).suffix == ".onnx" and not Path(path).is_dir():
        onnx_classifier = OnnxClassifier(path)
        return onnx_classifier, {"method": onnx_classifier.method,
                                 "intensity": onnx_classifier.session.metadata.get("intensity")}
    path = resolve_checkpoint(path)
    extra = read_checkpoint(path).get("extra") or {}
    method = extra.get("method", "nearl")
    if method not in METHODS:
        raise CheckpointError(f"{path} records an unknown method {method!r}; expected one of {', '.join(METHODS)}")
    model = load_checkpoint(path, pretrained=pretrained, backend=backend)
    if device is not None:
        model = model.to(device)
    head = None
    if method == "linear_probe":
        h = extra.get("linear_head")
        if not (isinstance(h, dict) and isinstance(h.get("weight"), torch.Tensor)
                and isinstance(h.get("bias"), torch.Tensor)
                and h["weight"].shape[0] == h["bias"].shape[0] == len(model.class_names)):
            raise CheckpointError(f"{path} is a linear_probe checkpoint without a valid linear_head "
                                  f"(weight [C, E], bias [C] for its {len(model.class_names)} classes)")
        head = (h["weight"].to(model.class_tokens.device), h["bias"].to(model.class_tokens.device))
    calibration = Calibration.from_dict(extra.get("calibration"), str(path))
    if REGISTRY[method].kind == "features":
        head = feature_head_of(extra, method, path, model)
    if REGISTRY[method].prompt_learner:
        ctx = extra.get("coop_context")
        width = model.text_tower.width
        if not (isinstance(ctx, torch.Tensor) and ctx.dim() == 2 and ctx.shape[1] == width):
            raise CheckpointError(f"{path} is a {method} checkpoint without valid context vectors "
                                  f"(extra['coop_context'] [n, {width}])")
        from nearl_rt.prompt_learners import context_from_checkpoint
        try:
            context = context_from_checkpoint(method, ctx, extra, model)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is a {method} checkpoint with a damaged context ({e})") from None
        attach_context(model, context)
    return Classifier(model, method, head, calibration), extra


def feature_head_of(extra: dict, method: str, path, model) -> torch.nn.Module:
    """The feature head a checkpoint stores (extra["feature_head"]), on the model's device; CheckpointError if
    it is missing or does not fit the model's classes."""
    from nearl_rt.feature_heads import head_from_state
    stored = extra.get("feature_head")
    try:
        if not isinstance(stored, dict) or stored.get("kind") != method:
            raise ValueError("no feature_head of this method")
        head = head_from_state(method, stored["state"])
        if head.text.shape[0] != len(model.class_names):
            raise ValueError(f"{head.text.shape[0]} classes, the model has {len(model.class_names)}")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is a {method} checkpoint without a valid feature head ({e})") from None
    return head.to(model.class_tokens.device).eval()

