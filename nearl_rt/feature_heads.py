"""Feature-level few-shot methods: heads on the frozen backbone's L2-normalised image features f [B, E] and the
zero-shot class text features W [C, E] (both from the frozen model; NEARL's adapters play no part).

- CLIP-Adapter (Gao et al., IJCV 2024): f' = ratio * A(f) + (1 - ratio) * f with A = ReLU(Linear(E/4 -> E)) after
  ReLU(Linear(E -> E/4)), no biases; logits = s * f' W^T (s: CLIP's logit scale). ratio 0 is zero-shot CLIP.
- Tip-Adapter (Zhang et al., ECCV 2022): a key-value cache of the N = K * C training features (keys [N, E]) and
  their one-hot labels (values [N, C]); logits = s * f W^T + alpha * exp(-beta * (1 - f keys^T)) @ values.
  alpha 0 is zero-shot CLIP. Tip-Adapter-F trains the keys (N * E parameters).
- LP++ (Huang et al., CVPR 2024): logits = f V^T + b + alpha ⊙ (f W^T), with class prototypes V [C, E], biases b
  [C] and per-class blending weights alpha [C] trained.

Each head is a fixed function of f once fitted: `state()` holds its tensors and settings (a checkpoint's
`extra["feature_head"]`), `head_from_state` rebuilds it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

ADAPTER_REDUCTION = 4  # CLIP-Adapter's bottleneck E -> E / 4


def zero_shot_logits(features: torch.Tensor, text: torch.Tensor, scale: float, bias: Optional[float]) -> torch.Tensor:
    """CLIP's logits s * f W^T (+ the logit bias of a SigLIP-style backbone)."""
    logits = scale * features @ text.t()
    return logits if bias is None else logits + bias


def cache_affinity(features: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """Tip-Adapter's affinity exp(-beta * (1 - f keys^T)) [B, N]."""
    return torch.exp(-beta * (1.0 - features @ keys.t()))


class _TextHead(nn.Module):
    """The frozen zero-shot classifier every head builds on: class text features W [C, E], logit scale (and bias)."""

    def __init__(self, text: torch.Tensor, scale: float, bias: Optional[float]):
        super().__init__()
        self.register_buffer("text", text.detach().float().clone())
        self.scale, self.bias = float(scale), None if bias is None else float(bias)

    def zero_shot(self, features: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(features, self.text, self.scale, self.bias)

    def base_state(self) -> dict:
        return {"text": self.text.detach().cpu(), "scale": self.scale, "bias": self.bias}


class ClipAdapterHead(_TextHead):
    kind = "clip_adapter"

    def __init__(self, text, scale, bias, ratio: float, reduction: int = ADAPTER_REDUCTION):
        super().__init__(text, scale, bias)
        dim = text.shape[1]
        if dim // reduction < 1:
            raise ValueError(f"CLIP-Adapter needs an embedding of at least {reduction} dimensions, got {dim}")
        self.ratio, self.reduction = float(ratio), int(reduction)
        self.adapter = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                                     nn.Linear(dim // reduction, dim, bias=False), nn.ReLU())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        blended = self.ratio * self.adapter(features) + (1.0 - self.ratio) * features
        return self.zero_shot(blended)

    def state(self) -> dict:
        return {**self.base_state(), "ratio": self.ratio, "reduction": self.reduction,
                "adapter": {k: v.detach().cpu() for k, v in self.adapter.state_dict().items()}}

    @classmethod
    def from_state(cls, s: dict) -> "ClipAdapterHead":
        head = cls(s["text"], s["scale"], s["bias"], s["ratio"], s["reduction"])
        head.adapter.load_state_dict(s["adapter"])
        return head


class TipAdapterHead(_TextHead):
    """Tip-Adapter (train_keys False: the cache is a buffer) or Tip-Adapter-F (the keys are a parameter)."""

    def __init__(self, text, scale, bias, keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float,
                 train_keys: bool = False):
        super().__init__(text, scale, bias)
        keys = keys.detach().float().clone()
        if train_keys:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        self.register_buffer("values", values.detach().float().clone())
        self.alpha, self.beta, self.train_keys = float(alpha), float(beta), bool(train_keys)

    @property
    def kind(self) -> str:
        return "tip_adapter_f" if self.train_keys else "tip_adapter"

    def cache_logits(self, features: torch.Tensor, beta: Optional[float] = None) -> torch.Tensor:
        return cache_affinity(features, self.keys, self.beta if beta is None else beta) @ self.values

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.zero_shot(features) + self.alpha * self.cache_logits(features)

    def state(self) -> dict:
        return {**self.base_state(), "keys": self.keys.detach().cpu(), "values": self.values.detach().cpu(),
                "alpha": self.alpha, "beta": self.beta, "train_keys": self.train_keys}

    @classmethod
    def from_state(cls, s: dict) -> "TipAdapterHead":
        return cls(s["text"], s["scale"], s["bias"], s["keys"], s["values"], s["alpha"], s["beta"], s["train_keys"])


class LPPlusPlusHead(_TextHead):
    kind = "lpplusplus"

    def __init__(self, text, scale, bias, prototypes: torch.Tensor, class_bias: torch.Tensor, alpha: torch.Tensor):
        super().__init__(text, scale, bias)
        self.prototypes = nn.Parameter(prototypes.detach().float().clone())
        self.class_bias = nn.Parameter(class_bias.detach().float().clone())
        self.alpha = nn.Parameter(alpha.detach().float().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.prototypes.t() + self.class_bias + self.alpha * (features @ self.text.t())

    def state(self) -> dict:
        return {**self.base_state(), "prototypes": self.prototypes.detach().cpu(),
                "class_bias": self.class_bias.detach().cpu(), "alpha": self.alpha.detach().cpu()}

    @classmethod
    def from_state(cls, s: dict) -> "LPPlusPlusHead":
        return cls(s["text"], s["scale"], s["bias"], s["prototypes"], s["class_bias"], s["alpha"])


HEADS = {"clip_adapter": ClipAdapterHead, "tip_adapter": TipAdapterHead, "tip_adapter_f": TipAdapterHead,
         "lpplusplus": LPPlusPlusHead}


def head_from_state(kind: str, state: dict) -> nn.Module:
    """The head a checkpoint's extra["feature_head"] = {"kind": ..., "state": ...} describes (KeyError/ValueError
    on a malformed state: the caller names the file)."""
    return HEADS[kind].from_state(state)
