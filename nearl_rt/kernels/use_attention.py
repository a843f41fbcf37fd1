"""USEformer cross-attention op: M synergy queries per group read the tokens of both modalities.

    K = [ LN_x(X) W_dx ; LN_t(T) W_dt ]          keys of both modalities, down-projected to d_s
    k = K W_k^T + b_k,  v = K W_v^T + b_v          per-head key/value projections in d_s
    o = concat_h softmax(q_h k_h^T / sqrt(d_h) + mask) v_h

Padded text positions are masked out of the keys. The query projection and the output
projection stay outside (they touch only G*M rows). `use_attention_reference` is the
PyTorch ground truth every fused implementation must match.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nearl_rt.kernels.checks import check_use_inputs

LN_EPS = 1e-5


def use_attention_reference(
    q: torch.Tensor,
    x: Optional[torch.Tensor],
    t: torch.Tensor,
    t_valid: torch.Tensor,
    ln_x_w: Optional[torch.Tensor],
    ln_x_b: Optional[torch.Tensor],
    w_dx: Optional[torch.Tensor],
    ln_t_w: torch.Tensor,
    ln_t_b: torch.Tensor,
    w_dt: torch.Tensor,
    w_k: torch.Tensor,
    b_k: torch.Tensor,
    w_v: torch.Tensor,
    b_v: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """Few-query cross-attention over image and text tokens.

    q:       [G, M, d_s]   projected queries (before the 1/sqrt(d_h) scaling)
    x:       [G, Nx, Dx]   image tokens of each group, or None (text-only synergy)
    t:       [Gt, Nt, Dt]  text tokens read by each group; Gt is G, or 1 (shared by all groups)
    t_valid: [Gt, Nt] bool True where the text token is real (not padding)
    ln_x_*:  [Dx], w_dx: [d_s, Dx]; ln_t_*: [Dt], w_dt: [d_s, Dt]  (Linear layout: out x in)
    w_k, w_v: [d_s, d_s]; b_k, b_v: [d_s]
    Returns o: [G, M, d_s] in q's dtype (heads concatenated, before the output projection).
    Token-side matmuls run in the tokens' dtype; the small key/value projections in q's dtype.
    """
    check_use_inputs(q, x, t, t_valid, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt, w_k, b_k, w_v, b_v,
                     heads, need_contiguous=False)
    G, M, ds = q.shape
    keys = down_project(t, ln_t_w, ln_t_b, w_dt).to(q.dtype)  # [Gt, Nt, d_s]
    valid = t_valid
    if t.shape[0] != G:
        keys = keys.expand(G, -1, -1)
        valid = valid.expand(G, -1)
    if x is not None:
        kx = down_project(x, ln_x_w, ln_x_b, w_dx).to(q.dtype)
        keys = torch.cat([kx, keys], dim=1)
        valid = torch.cat([valid.new_ones(G, x.shape[1]), valid], dim=1)
    w_k, b_k, w_v, b_v = (p.to(q.dtype) for p in (w_k, b_k, w_v, b_v))
    k = F.linear(keys, w_k, b_k).view(G, -1, heads, ds // heads).transpose(1, 2)
    v = F.linear(keys, w_v, b_v).view(G, -1, heads, ds // heads).transpose(1, 2)
    qh = q.view(G, M, heads, ds // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=valid[:, None, None, :])
    return o.transpose(1, 2).reshape(G, M, ds)


def down_project(tokens, ln_w, ln_b, w_down):
    """LN (with affine) then the down-projection to d_s, in the tokens' dtype."""
    dt = tokens.dtype
    return F.linear(F.layer_norm(tokens, (tokens.shape[-1],), ln_w.to(dt), ln_b.to(dt), LN_EPS), w_down.to(dt))
