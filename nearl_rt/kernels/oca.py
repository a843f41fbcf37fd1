"""Orthogonal Cross-Attention Adapter (OCA) op.

    q   = LN(F) W_q                         LN without affine, D -> r
    H   = softmax(q k^T / sqrt(r)) v W_o    k, v: the M keys/values of the row's image, r -> D
    D_par  = (<H, F> / (<F, F> + eps)) F    per-token inner products in fp32
    D_perp = H - D_par
    F'  = F + s * D_perp

`oca_reference` is the plain PyTorch ground truth every fused implementation must match.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nearl_rt.kernels.checks import check_oca_inputs

PARALLEL_MODES = ("drop", "stopgrad")
LN_EPS = 1e-5


def oca_reference(
    x: torch.Tensor,
    group: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_q: torch.Tensor,
    w_o: torch.Tensor,
    scale: torch.Tensor,
    *,
    eps: float = 1e-6,
    orthogonal: bool = True,
    keep_parallel: str = "drop",
) -> torch.Tensor:
    """Apply OCA to every token of every sequence.

    x:      [R, N, D]  tokens of R sequences (images, prompts), dtype fp32/fp16/bf16
    group:  [R] int64  index into k/v of the synergy group each sequence reads
    k, v:   [G, M, r]  per-group keys/values (Z W_k, Z W_v)
    w_q:    [D, r]     w_o: [r, D]     scale: [] (the learnable s)
    Returns F' with the dtype and shape of x. The residual update is accumulated in fp32
    and rounded once.
    """
    check_oca_inputs(x, group, k, v, w_q, w_o, scale, keep_parallel=keep_parallel, need_contiguous=False)
    r = w_q.shape[1]
    dt = x.dtype  # matmuls run in the activation dtype, as eager PyTorch would
    q = F.layer_norm(x, (x.shape[-1],), eps=LN_EPS) @ w_q.to(dt)  # [R, N, r]
    kk, vv = k.to(dt)[group], v.to(dt)[group]  # [R, M, r]
    attn = torch.softmax((q @ kk.transpose(1, 2)) * (1.0 / math.sqrt(r)), dim=-1)
    h = ((attn @ vv) @ w_o.to(dt)).float()  # [R, N, D]
    xf = x.float()
    if orthogonal:
        coef = (h * xf).sum(-1, keepdim=True) / ((xf * xf).sum(-1, keepdim=True) + eps)
        parallel = coef * xf
        update = h - parallel
        if keep_parallel == "stopgrad":
            update = update + parallel.detach()
    else:
        update = h
    return (xf + scale.float() * update).to(x.dtype)
