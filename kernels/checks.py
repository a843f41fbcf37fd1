"""Input validation shared by the reference and fused ops: clear errors, never silent garbage."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: the test reference


class OpInputError(ValueError):
    """An op was called with tensors of the wrong shape, dtype, device or layout."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise OpInputError(msg)


def _check_tensor(name: str, t: torch.Tensor, ndim: int, device: torch.device, need_contiguous: bool,
                  dtypes=FLOAT_DTYPES) -> None:
    _require(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _require(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    _require(t.dtype in dtypes, f"{name} has dtype {t.dtype}; expected one of {dtypes}")
    _require(t.device == device, f"{name} is on {t.device} but the input is on {device}; move it with .to({device!s})")
    if need_contiguous:
        _require(t.is_contiguous(), f"{name} must be contiguous (shape {tuple(t.shape)}, "
                                    f"strides {t.stride()}); call .contiguous() first")


def check_oca_inputs(x, group, k, v, w_q, w_o, scale, *, keep_parallel: str, need_contiguous: bool) -> None:
    _check_tensor("x", x, 3, x.device, need_contiguous)
    dev = x.device
    _check_tensor("group", group, 1, dev, need_contiguous, dtypes=(torch.int64, torch.int32))
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, 3, dev, need_contiguous)
    _check_tensor("w_q", w_q, 2, dev, need_contiguous)
    _check_tensor("w_o", w_o, 2, dev, need_contiguous)
    _check_tensor("scale", scale, 0, dev, False)
    R, N, D = x.shape
    r = w_q.shape[1]
    _require(group.shape[0] == R, f"group has {group.shape[0]} entries but x has {R} sequences")
    _require(w_q.shape[0] == D, f"w_q is {tuple(w_q.shape)}; expected [{D}, r] for token width {D}")
    _require(tuple(w_o.shape) == (r, D), f"w_o is {tuple(w_o.shape)}; expected [{r}, {D}]")
    _require(k.shape == v.shape and k.shape[2] == r,
             f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [G, M, {r}]")
    _require(k.shape[1] >= 1, "k and v need at least one synergy query (M >= 1)")
    _require(keep_parallel in ("drop", "stopgrad"), f"keep_parallel={keep_parallel!r}; use 'drop' or 'stopgrad'")


def check_use_inputs(q, x, t, t_valid, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt, w_k, b_k, w_v, b_v,
                     heads: int, *, need_contiguous: bool) -> None:
    _check_tensor("q", q, 3, q.device, need_contiguous)
    dev = q.device
    G, M, ds = q.shape
    _require(heads >= 1 and ds % heads == 0, f"d_s={ds} is not divisible by heads={heads}")
    _check_tensor("t", t, 3, dev, need_contiguous)
    _check_tensor("t_valid", t_valid, 2, dev, need_contiguous, dtypes=(torch.bool,))
    _require(t.shape[0] in (1, G), f"t has {t.shape[0]} groups; expected 1 (shared) or {G}")
    _require(tuple(t_valid.shape) == tuple(t.shape[:2]),
             f"t_valid is {tuple(t_valid.shape)}; expected {tuple(t.shape[:2])}")
    Dt = t.shape[2]
    for name, p, shape in (("ln_t_w", ln_t_w, (Dt,)), ("ln_t_b", ln_t_b, (Dt,)), ("w_dt", w_dt, (ds, Dt)),
                           ("w_k", w_k, (ds, ds)), ("b_k", b_k, (ds,)), ("w_v", w_v, (ds, ds)), ("b_v", b_v, (ds,))):
        _check_tensor(name, p, len(shape), dev, need_contiguous)
        _require(tuple(p.shape) == shape, f"{name} is {tuple(p.shape)}; expected {shape}")
    if x is not None:
        _check_tensor("x", x, 3, dev, need_contiguous)
        _require(x.shape[0] == G, f"x has {x.shape[0]} groups but q has {G}")
        Dx = x.shape[2]
        for name, p, shape in (("ln_x_w", ln_x_w, (Dx,)), ("ln_x_b", ln_x_b, (Dx,)), ("w_dx", w_dx, (ds, Dx))):
            _require(p is not None, f"{name} is required when image tokens x are given")
            _check_tensor(name, p, len(shape), dev, need_contiguous)
            _require(tuple(p.shape) == shape, f"{name} is {tuple(p.shape)}; expected {shape}")


def check_fused_tensors(*tensors) -> None:
    """The fused Triton ops take fp32/fp16/bf16 tensors on CUDA, or on CPU under TRITON_INTERPRET=1."""
    for t in tensors:
        if t is None or not torch.is_floating_point(t):
            continue
        _require(t.dtype != torch.float64, "the fused Triton ops take float32, float16 or bfloat16 tensors, got "
                                           "float64; use backend='torch' for float64 (the test reference)")
        _require(t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1",
                 f"the fused Triton ops run on CUDA tensors, got tensors on {t.device}; use backend='torch' or "
                 "'auto' there (or set TRITON_INTERPRET=1 before importing triton for the slow interpreter)")
