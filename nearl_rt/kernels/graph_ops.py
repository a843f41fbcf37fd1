"""NEARL's two ops reformulated for graph runtimes (backend "graph"; the fused ONNX export traces them).

A runtime such as onnxruntime's CPU provider runs every ONNX node as its own pass over memory, and the
adapters' cost there is their node count more than their arithmetic. The same math in fewer, smaller passes:

OCA (nearl_rt.kernels.oca; s folded into the M values, so the N tokens see one product less):
    q   = LN(F) W_q                     the LN without affine is the one the USEformer's image keys read (below):
                                        onnxruntime's common-subexpression pass computes it once
    H'  = softmax(q k^T / sqrt(r)) (s v W_o)               = s H; s v W_o is [M, D], not [N, D]
    F'  = F (1 - <H', F> / (|F|^2 + eps)) + H'             = F + s (H - <H, F> / (<F, F> + eps) F)
    (orthogonal=False: F' = F + H'; keep_parallel="stopgrad" keeps the reference, whose gradient differs)
USEformer attention (nearl_rt.kernels.use_attention; the Triton kernel's fold, nearl_rt/kernels/use_attention_triton.py):
    keys  K = [LN(X) (W_dx diag(w_x))^T + W_dx b_x ; LN_t(T) W_dt]     LN_x's affine folded into the down-projection
    per head h: scores = (q_h W_k,h / sqrt(d_h)) K^T    q_h . b_k,h is the same for every key: the softmax drops it
                o_h    = (softmax(scores + mask) K) W_v,h^T + b_v,h     the probabilities sum to 1
    so the key/value projections act on the M queries, never on the N keys; padded text keys get -inf.

Both equal the references up to float rounding (tests/test_kernels_graph.py, fresh random inputs, fp32 and fp64).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from nearl_rt.kernels.checks import check_oca_inputs, check_use_inputs
from nearl_rt.kernels.oca import LN_EPS, oca_reference
from nearl_rt.kernels.use_attention import down_project


def _normalized(x: torch.Tensor) -> torch.Tensor:
    """LN(x) without affine: the one node the OCA's queries and the USEformer's image keys share."""
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS)


def oca_graph(x, group, k, v, w_q, w_o, scale, *, eps: float = 1e-6, orthogonal: bool = True,
              keep_parallel: str = "drop") -> torch.Tensor:
    """oca_reference (same arguments and result) in fewer passes over the tokens; see the module docstring."""
    if orthogonal and keep_parallel == "stopgrad":
        return oca_reference(x, group, k, v, w_q, w_o, scale, eps=eps, orthogonal=orthogonal,
                             keep_parallel=keep_parallel)
    check_oca_inputs(x, group, k, v, w_q, w_o, scale, keep_parallel=keep_parallel, need_contiguous=False)
    dt = x.dtype
    r = w_q.shape[1]
    q = _normalized(x) @ w_q.to(dt)                                        # [R, N, r]
    values = (v.to(dt) @ w_o.to(dt)) * scale.to(dt)                        # [G, M, D]: s v W_o
    attn = torch.softmax((q @ k.to(dt)[group].transpose(1, 2)) * (1.0 / math.sqrt(r)), dim=-1)
    h = (attn @ values[group]).float()                                     # [R, N, D]: s H
    xf = x.float()
    if not orthogonal:
        return (xf + h).to(dt)
    norm2 = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square()
    keep = 1.0 - (h * xf).sum(-1, keepdim=True) / (norm2 + eps)
    return (xf * keep + h).to(dt)


def _image_keys(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down_project(x, ln_w, ln_b, w_down) with the LN affine folded into the projection."""
    dt = x.dtype
    return _normalized(x) @ (w_down * ln_w).t().to(dt) + (w_down @ ln_b).to(dt)


def use_attention_graph(q, x: Optional[torch.Tensor], t, t_valid, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt,
                        w_k, b_k, w_v, b_v, heads: int) -> torch.Tensor:
    """use_attention_reference (same arguments and result) with the key/value projections folded into the
    queries; see the module docstring."""
    check_use_inputs(q, x, t, t_valid, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt, w_k, b_k, w_v, b_v,
                     heads, need_contiguous=False)
    G, M, ds = q.shape
    dh = ds // heads
    keys = down_project(t, ln_t_w, ln_t_b, w_dt).to(q.dtype)             # [Gt, Nt, d_s]
    valid = t_valid
    if t.shape[0] != G:
        keys, valid = keys.expand(G, -1, -1), valid.expand(G, -1)
    if x is not None:
        keys = torch.cat([_image_keys(x, ln_x_w, ln_x_b, w_dx).to(q.dtype), keys], dim=1)
        valid = torch.cat([valid.new_ones(G, x.shape[1]), valid], dim=1)
    w_k, w_v, b_v = (p.to(q.dtype) for p in (w_k, w_v, b_v))
    qh = q.view(G, M, heads, dh).transpose(1, 2)                           # [G, h, M, dh]
    q_keys = (qh @ w_k.view(heads, dh, ds)) * (1.0 / math.sqrt(dh))       # [G, h, M, d_s]
    mask = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, float("-inf"))
    attn = torch.softmax(q_keys @ keys.unsqueeze(1).transpose(-1, -2) + mask[:, None, None, :], dim=-1)
    ctx = attn @ keys.unsqueeze(1)                                         # [G, h, M, d_s]
    o = ctx @ w_v.view(heads, dh, ds).transpose(-1, -2) + b_v.view(heads, 1, dh)   # [G, h, M, dh]
    return o.transpose(1, 2).reshape(G, M, ds)
