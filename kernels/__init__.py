"""Ops that NEARL adds to a frozen CLIP, with a backend switch.

Every op has a plain PyTorch reference (`*_reference`), the ground truth for tests. `oca` and
`use_attention` dispatch on `backend`: "torch" (reference), "triton" (fused kernels), or "auto"
(the fastest available on the input's device). The environment variable NEARL_RT_BACKEND
overrides the argument.
"""
from __future__ import annotations

import os

import torch

from kernels.checks import OpInputError
from kernels.oca import oca_reference
from kernels.use_attention import use_attention_reference

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return the concrete backend ("torch" or "triton") for tensors on `device`."""
    backend = os.environ.get("NEARL_RT_BACKEND", backend)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (from argument or NEARL_RT_BACKEND); use one of {BACKENDS}")
    if backend == "triton":
        raise NotImplementedError("the fused Triton backend is not available in this build; use backend='torch'")
    return "torch"


def oca(x, group, k, v, w_q, w_o, scale, *, backend: str = "auto", **options):
    """OCA update F -> F + s * D_perp; see kernels.oca for the math and shapes."""
    resolve_backend(backend, x.device)
    return oca_reference(x, group, k, v, w_q, w_o, scale, **options)


def use_attention(q, x, t, t_valid, *params, heads: int, backend: str = "auto"):
    """USEformer few-query cross-attention; see kernels.use_attention for the math and shapes."""
    resolve_backend(backend, q.device)
    return use_attention_reference(q, x, t, t_valid, *params, heads=heads)


__all__ = ["BACKENDS", "OpInputError", "oca", "oca_reference", "resolve_backend", "use_attention",
           "use_attention_reference"]
