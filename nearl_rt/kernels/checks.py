"""Input validation shared by the reference and fused ops: clear errors, never silent garbage.

The checks run for every op of every layer, so the success path only compares: a message is formatted
only when a check fails.
"""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: the test reference
INDEX_DTYPES = (torch.int64, torch.int32)


class OpInputError(ValueError):
    """An op was called with tensors of the wrong shape, dtype, device or layout."""


def _check_tensor(name: str, t, ndim: int, device: torch.device, need_contiguous: bool,
                  dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise OpInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise OpInputError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise OpInputError(f"{name} has dtype {t.dtype}; expected one of {dtypes}")
    if t.device != device:
        raise OpInputError(f"{name} is on {t.device} but the input is on {device}; move it with .to({device!s})")
    if need_contiguous and not t.is_contiguous():
        raise OpInputError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                           "call .contiguous() first")


def _check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != shape:
        raise OpInputError(f"{name} is {tuple(t.shape)}; expected {shape}")


def check_oca_inputs(x, group, k, v, w_q, w_o, scale, *, keep_parallel: str, need_contiguous: bool) -> None:
    """k and v may be column slices of one [G, M, 2r] projection (rows contiguous, equal strides)."""
    _check_tensor("x", x, 3, x.device, need_contiguous)
    dev = x.device
    _check_tensor("group", group, 1, dev, need_contiguous, dtypes=INDEX_DTYPES)
    _check_tensor("k", k, 3, dev, False)
    _check_tensor("v", v, 3, dev, False)
    if need_contiguous and not (k.stride(2) == 1 and k.stride() == v.stride()):
        raise OpInputError(f"k and v need unit stride in the last dim and equal strides, got {k.stride()} and "
                           f"{v.stride()}; call .contiguous() first")
    _check_tensor("w_q", w_q, 2, dev, need_contiguous)
    _check_tensor("w_o", w_o, 2, dev, need_contiguous)
    _check_tensor("scale", scale, 0, dev, False)
    R, N, D = x.shape
    r = w_q.shape[1]
    if group.shape[0] != R:
        raise OpInputError(f"group has {group.shape[0]} entries but x has {R} sequences")
    if w_q.shape[0] != D:
        raise OpInputError(f"w_q is {tuple(w_q.shape)}; expected [{D}, r] for token width {D}")
    _check_shape("w_o", w_o, (r, D))
    if not (k.shape == v.shape and k.shape[2] == r):
        raise OpInputError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [G, M, {r}]")
    if k.shape[1] < 1:
        raise OpInputError("k and v need at least one synergy query (M >= 1)")
    if keep_parallel not in ("drop", "stopgrad"):
        raise OpInputError(f"keep_parallel={keep_parallel!r}; use 'drop' or 'stopgrad'")


def check_use_inputs(q, x, t, t_valid, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt, w_k, b_k, w_v, b_v,
                     heads: int, *, need_contiguous: bool) -> None:
    _check_tensor("q", q, 3, q.device, need_contiguous)
    dev = q.device
    G, M, ds = q.shape
    if not (heads >= 1 and ds % heads == 0):
        raise OpInputError(f"d_s={ds} is not divisible by heads={heads}")
    _check_tensor("t", t, 3, dev, need_contiguous)
    _check_tensor("t_valid", t_valid, 2, dev, need_contiguous, dtypes=(torch.bool,))
    if t.shape[0] != 1 and t.shape[0] != G:
        raise OpInputError(f"t has {t.shape[0]} groups; expected 1 (shared) or {G}")
    if t_valid.shape != t.shape[:2]:
        raise OpInputError(f"t_valid is {tuple(t_valid.shape)}; expected {tuple(t.shape[:2])}")
    Dt = t.shape[2]
    for name, p, shape in (("ln_t_w", ln_t_w, (Dt,)), ("ln_t_b", ln_t_b, (Dt,)), ("w_dt", w_dt, (ds, Dt)),
                           ("w_k", w_k, (ds, ds)), ("b_k", b_k, (ds,)), ("w_v", w_v, (ds, ds)), ("b_v", b_v, (ds,))):
        _check_tensor(name, p, len(shape), dev, need_contiguous)
        _check_shape(name, p, shape)
    if x is not None:
        _check_tensor("x", x, 3, dev, need_contiguous)
        if x.shape[0] != G:
            raise OpInputError(f"x has {x.shape[0]} groups but q has {G}")
        Dx = x.shape[2]
        for name, p, shape in (("ln_x_w", ln_x_w, (Dx,)), ("ln_x_b", ln_x_b, (Dx,)), ("w_dx", w_dx, (ds, Dx))):
            if p is None:
                raise OpInputError(f"{name} is required when image tokens x are given")
            _check_tensor(name, p, len(shape), dev, need_contiguous)
            _check_shape(name, p, shape)


def check_fused_tensors(*tensors) -> None:
    """The fused Triton ops take fp32/fp16/bf16 tensors on CUDA, or on CPU under TRITON_INTERPRET=1
    ("meta" tensors while nearl_rt/kernels/launches.py plans launches without running them)."""
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        if t.dtype == torch.float64:
            raise OpInputError("the fused Triton ops take float32, float16 or bfloat16 tensors, got float64; "
                               "use backend='torch' for float64 (the test reference)")
        if t.device.type != "cuda" and not _runs_off_gpu(t.device):
            raise OpInputError(f"the fused Triton ops run on CUDA tensors, got tensors on {t.device}; use "
                               "backend='torch' or 'auto' there (or set TRITON_INTERPRET=1 before importing "
                               "triton for the slow interpreter)")


def _runs_off_gpu(device: torch.device) -> bool:
    if device.type == "meta":
        from nearl_rt.kernels.launches import planning
        return planning()
    return os.environ.get("TRITON_INTERPRET") == "1"
