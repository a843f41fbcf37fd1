"""Ops that NEARL adds to a frozen CLIP, with a backend switch.

Every op has a plain PyTorch reference (`*_reference`), the ground truth for tests. `oca` and
`use_attention` dispatch on `backend`: "torch" (reference), "triton" (the fused kernels in
nearl_rt/kernels/oca_triton.py and nearl_rt/kernels/use_attention_triton.py), or "auto" (triton for CUDA tensors of
fp32/fp16/bf16, torch otherwise). The environment variable NEARL_RT_BACKEND overrides the argument.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from nearl_rt.kernels.checks import OpInputError
from nearl_rt.kernels.derived import derived
from nearl_rt.kernels.oca import oca_reference
from nearl_rt.kernels.use_attention import use_attention_reference

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Return the concrete backend ("torch" or "triton") for tensors on `device` of `dtype`.

    "auto" is "triton" for CUDA tensors and "torch" elsewhere or for float64 (the test reference).
    "triton" is returned as asked; the fused ops themselves refuse what they cannot run (float64, CPU
    tensors outside the Triton interpreter) with a clear OpInputError.
    """
    backend = os.environ.get("NEARL_RT_BACKEND") or backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (from argument or NEARL_RT_BACKEND); use one of {BACKENDS}")
    if backend == "auto":
        fused = device.type == "cuda" and dtype != torch.float64 and _triton_importable()
        return "triton" if fused else "torch"
    if backend == "triton" and not _triton_importable():
        raise OpInputError("backend='triton' needs the triton package (pip install triton); use backend='torch'")
    return backend


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    # cached: resolve_backend runs for every op of every layer, and find_spec walks sys.path
    return importlib.util.find_spec("triton") is not None


def oca(x, group, k, v, w_q, w_o, scale, *, backend: str = "auto", **options):
    """OCA update F -> F + s * D_perp; see nearl_rt.kernels.oca for the math and shapes."""
    if resolve_backend(backend, x.device, x.dtype) == "triton":
        from nearl_rt.kernels.oca_triton import oca_triton
        return oca_triton(x, group, k, v, w_q, w_o, scale, **options)
    return oca_reference(x, group, k, v, w_q, w_o, scale, **options)


def use_attention(q, x, t, t_valid, *params, heads: int, backend: str = "auto"):
    """USEformer few-query cross-attention; see nearl_rt.kernels.use_attention for the math and shapes."""
    if resolve_backend(backend, q.device, q.dtype) == "triton":
        from nearl_rt.kernels.use_attention_triton import use_attention_triton
        return use_attention_triton(q, x, t, t_valid, *params, heads=heads)
    return use_attention_reference(q, x, t, t_valid, *params, heads=heads)


__all__ = ["BACKENDS", "OpInputError", "derived", "oca", "oca_reference", "resolve_backend", "use_attention",
           "use_attention_reference"]
