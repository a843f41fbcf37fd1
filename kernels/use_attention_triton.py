"""Fused Triton USEformer attention (math: kernels/use_attention.py), forward and backward.

The key/value projections are folded into the few queries, so k and v are never built:
    q_h . (W_k,h K_j + b_k,h) = (W_k,h^T q_h) . K_j + q_h . b_k,h
    sum_j p_j (W_v,h K_j + b_v,h) = W_v,h (sum_j p_j K_j) + b_v,h        (softmax rows sum to 1)
so every (query, head) pair becomes one query row q~ of width d_s, and all rows attend over the
down-projected tokens K itself: o~ = softmax(q~ K^T / sqrt(d_h)) K. The offset beta = q_h . b_k,h shifts
every score of a row equally, so softmax ignores it and its gradient is exactly zero; it still enters the
autograd Function so that b_k (and q through it) get that exact zero gradient, as in the reference.

All products keep fp32 accuracy (IEEE for fp32 keys; tf32x3 on tensor cores for fp16/bf16 keys, which
tf32 holds exactly): the backward's dp = dO K^T must agree with delta = rowsum(dO * O) to fp32 rounding,
else a softmax over one valid key, or the exactly-zero gradient of b_k, picks up noise.

Kernels (Flash-Decoding style, split over the key length, no atomics):
  _use_fwd   grid (G, splits, query blocks) per key source (image keys, text keys): online softmax over
             the split's key blocks, writes partial (max, sum, acc); torch combines all partials of
             both sources in a fixed order.
  _use_bwd   same grid: recomputes p from the saved log-sum-exp, writes dK per key (one slice per
             reading group and query block) and per-split partial sums of dq~; torch sums them.
The keys K = LN(X) W_dx^T, LN(T) W_dt^T come from kernels/ln_down_triton.py (fused forward: the tokens
are read once, only d_s-wide keys are written; backward recomputed with PyTorch).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.checks import check_fused_tensors, check_use_inputs
from kernels.triton_common import pow2, rmax, rsum
from kernels.ln_down_triton import ln_down_triton

BLOCK_K = 32


@triton.jit
def _key_scores(k_ptr, valid_ptr, grp, kb, NK, DS, qs, scale, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_S: tl.constexpr, PREC: tl.constexpr):
    """Key block kb of group grp (zero-padded, fp32), which of its keys are real (in range and not
    padding), and the scaled scores of the query block `qs` against it."""
    keys_i = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    cs = tl.arange(0, BLOCK_S)
    kmask = keys_i < NK
    if HAS_MASK:
        kmask = kmask & (tl.load(valid_ptr + grp * NK + keys_i, mask=keys_i < NK, other=0) != 0)
    offs = grp * NK * DS + keys_i[:, None] * DS + cs[None, :]
    keys = tl.load(k_ptr + offs, mask=(keys_i < NK)[:, None] & (cs < DS)[None, :], other=0.0).to(tl.float32)
    return keys, kmask, tl.dot(qs, tl.trans(keys), input_precision=PREC) * scale


@triton.jit
def _split_blocks(split, blocks_per_split, NK, BLOCK_K: tl.constexpr):
    """The key blocks [lo, hi) of split `split` over the key length."""
    lo = split * blocks_per_split
    return lo, tl.minimum(lo + blocks_per_split, (NK + BLOCK_K - 1) // BLOCK_K)


@triton.jit
def _load_queries(q_ptr, g, qb, NQ, DS, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    """Query rows of block qb of group g: indices, mask, in-group offsets, 2-D mask, values (fp32)."""
    qi = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cs = tl.arange(0, BLOCK_S)
    qmask = qi < NQ
    qoffs = qi[:, None] * DS + cs[None, :]
    q2 = qmask[:, None] & (cs < DS)[None, :]
    return qi, qmask, qoffs, q2, tl.load(q_ptr + g * NQ * DS + qoffs, mask=q2, other=0.0)


@triton.jit
def _use_fwd(q_ptr, k_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr, NQ, NK, DS, K_GROUP_STRIDE,
             blocks_per_split, split_offset, total_splits, scale, HAS_MASK: tl.constexpr,
             BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, PREC: tl.constexpr):
    g, split, qb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    kg = g * K_GROUP_STRIDE  # 0 when every group reads the same (shared) text keys
    qi, qmask, qoffs, q2, qs = _load_queries(q_ptr, g, qb, NQ, DS, BLOCK_Q, BLOCK_S)
    m_i = tl.full((BLOCK_Q,), -1e30, dtype=tl.float32)
    l_i = tl.full((BLOCK_Q,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_Q, BLOCK_S), 0.0, dtype=tl.float32)
    lo, hi = _split_blocks(split, blocks_per_split, NK, BLOCK_K)
    for kb in range(lo, hi):
        keys, kmask, sc = _key_scores(k_ptr, valid_ptr, kg, kb, NK, DS, qs, scale, HAS_MASK, BLOCK_K, BLOCK_S, PREC)
        sc = tl.where(kmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, rmax(sc, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + rsum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, keys, input_precision=PREC)
        m_i = m_new
    part = (g * total_splits + split_offset + split) * NQ
    tl.store(m_ptr + part + qi, m_i, mask=qmask)
    tl.store(l_ptr + part + qi, l_i, mask=qmask)
    tl.store(acc_ptr + part * DS + qoffs, acc, mask=q2)


@triton.jit
def _use_bwd(q_ptr, k_ptr, valid_ptr, lse_ptr, do_ptr, delta_ptr, dk_ptr, dq_ptr,
             NQ, NK, DS, K_GROUP_STRIDE, blocks_per_split, split_offset, total_splits, scale,
             HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
             PREC: tl.constexpr):
    g, split, qb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    kg = g * K_GROUP_STRIDE
    qi, qmask, qoffs, q2, qs = _load_queries(q_ptr, g, qb, NQ, DS, BLOCK_Q, BLOCK_S)
    do = tl.load(do_ptr + g * NQ * DS + qoffs, mask=q2, other=0.0)
    lse = tl.load(lse_ptr + g * NQ + qi, mask=qmask, other=0.0)
    delta = tl.load(delta_ptr + g * NQ + qi, mask=qmask, other=0.0)
    dq = tl.full((BLOCK_Q, BLOCK_S), 0.0, dtype=tl.float32)
    dk_ptr += (g * tl.num_programs(2) + qb) * NK * DS  # one dK slice per (reading group, query block)
    lo, hi = _split_blocks(split, blocks_per_split, NK, BLOCK_K)
    for kb in range(lo, hi):
        keys, kmask, sc = _key_scores(k_ptr, valid_ptr, kg, kb, NK, DS, qs, scale, HAS_MASK, BLOCK_K, BLOCK_S, PREC)
        p = tl.where(kmask[None, :] & qmask[:, None], tl.exp(sc - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(keys), input_precision=PREC)
        dsc = p * (dp - delta[:, None])
        dkeys = tl.dot(tl.trans(dsc), qs, input_precision=PREC) * scale + \
            tl.dot(tl.trans(p), do, input_precision=PREC)
        keys_i = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        cs = tl.arange(0, BLOCK_S)
        tl.store(dk_ptr + keys_i[:, None] * DS + cs[None, :], dkeys,
                 mask=(keys_i < NK)[:, None] & (cs < DS)[None, :])
        dq += tl.dot(dsc, keys, input_precision=PREC) * scale
    part = (g * total_splits + split_offset + split) * NQ
    tl.store(dq_ptr + part * DS + qoffs, dq, mask=q2)


def _sources(kx, kt, t_valid):
    """(keys, valid or None, group stride) per key source: image keys (if any), then text keys."""
    out = [] if kx is None else [(kx, None, 1)]
    out.append((kt, t_valid, 1 if kt.shape[0] > 1 else 0))
    return out


def _meta(NQ: int, DS: int, key_dtype: torch.dtype) -> dict:
    """Block sizes and matmul precision: fp32 keys multiply in IEEE fp32; fp16/bf16 keys (exact in tf32)
    on tensor cores with tf32x3, which keeps fp32-level accuracy for the fp32 queries and probabilities.
    Untuned (no GPU at hand); by ptxas -v for sm_90 at d_s = 128, 64 query rows spill ~0.5 KB with tf32x3,
    and IEEE fp32 needs 32-row query blocks to stay near 1 KB."""
    fp32 = key_dtype == torch.float32
    return dict(BLOCK_Q=min(32 if fp32 else 64, pow2(NQ)), BLOCK_K=BLOCK_K, BLOCK_S=pow2(DS), num_warps=8,
                PREC="ieee" if fp32 else "tf32x3")


def _split_plan(G: int, sources, device: torch.device):
    """Blocks per split for each source: split the key length only when G alone cannot fill the device."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    plan = []
    for keys, _, _ in sources:
        nblocks = triton.cdiv(keys.shape[1], BLOCK_K)
        splits = max(1, min(nblocks, triton.cdiv(2 * sms, G)))
        per = triton.cdiv(nblocks, splits)
        plan.append((per, triton.cdiv(nblocks, per)))
    return plan


class USEAttentionFunction(torch.autograd.Function):
    """o~ = softmax(q~ K^T * scale + beta) K over image keys kx (may be None) and masked text keys kt.

    beta [G, NQ] is a per-row score offset: it does not change the result and gets a zero gradient.
    """

    @staticmethod
    def forward(ctx, qt, beta, kx, kt, t_valid, scale):
        G, NQ, DS = qt.shape
        sources = _sources(kx, kt, t_valid)
        plan = _split_plan(G, sources, qt.device)
        total = sum(n for _, n in plan)
        f32 = dict(device=qt.device, dtype=torch.float32)
        m, l = torch.empty(G, total, NQ, **f32), torch.empty(G, total, NQ, **f32)
        acc = torch.empty(G, total, NQ, DS, **f32)
        meta = _meta(NQ, DS, kt.dtype)
        offset = 0
        for (keys, valid, stride), (per, n) in zip(sources, plan):
            _use_fwd[(G, n, triton.cdiv(NQ, meta["BLOCK_Q"]))](
                qt, keys, valid if valid is not None else keys, m, l, acc, NQ, keys.shape[1], DS, stride, per,
                offset, total, scale, HAS_MASK=valid is not None, **meta)
            offset += n
        # combine the splits (fixed order): a split that saw no valid key has m = -1e30 and weight 0
        m_max = m.amax(1, keepdim=True)
        w = torch.exp(m - m_max)
        l_sum = (w * l).sum(1)
        out = (w.unsqueeze(-1) * acc).sum(1) / l_sum.unsqueeze(-1)
        lse = m_max.squeeze(1) + torch.log(l_sum)
        ctx.save_for_backward(qt, beta, kx, kt, t_valid, out, lse)
        ctx.scale, ctx.plan, ctx.meta = scale, plan, meta
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qt, beta, kx, kt, t_valid, out, lse = ctx.saved_tensors
        G, NQ, DS = qt.shape
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1)
        sources = _sources(kx, kt, t_valid)
        total = sum(n for _, n in ctx.plan)
        f32 = dict(device=qt.device, dtype=torch.float32)
        dq_part = torch.empty(G, total, NQ, DS, **f32)
        dkeys, offset = [], 0
        for (keys, valid, stride), (per, n) in zip(sources, ctx.plan):
            nqb = triton.cdiv(NQ, ctx.meta["BLOCK_Q"])
            dk = torch.empty(G, nqb, keys.shape[1], DS, **f32)  # per reading group and query block
            _use_bwd[(G, n, nqb)](qt, keys, valid if valid is not None else keys, lse, grad_out, delta, dk, dq_part, NQ,
                             keys.shape[1], DS, stride, per, offset, total, ctx.scale,
                             HAS_MASK=valid is not None, **ctx.meta)
            offset += n
            dk = dk.sum(1)
            dkeys.append((dk if stride else dk.sum(0, keepdim=True)).to(keys.dtype))
        dkx = dkeys[0] if kx is not None else None
        return dq_part.sum(1), torch.zeros_like(beta), dkx, dkeys[-1], None, None


def use_attention_triton(q, x, t, t_valid, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt, w_k, b_k, w_v, b_v,
                         heads: int) -> torch.Tensor:
    """Fused USEformer attention with the signature and result of use_attention_reference."""
    check_use_inputs(q, x, t, t_valid, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt, w_k, b_k, w_v, b_v,
                     heads, need_contiguous=True)
    check_fused_tensors(q, x, t, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt, w_k, b_k, w_v, b_v)
    G, M, ds = q.shape
    dh = ds // heads
    kt = ln_down_triton(t, ln_t_w, ln_t_b, w_dt).to(q.dtype).contiguous()
    kx = None if x is None else ln_down_triton(x, ln_x_w, ln_x_b, w_dx).to(q.dtype).contiguous()
    with torch.autocast(q.device.type, enabled=False):  # the folded projections stay fp32 under autocast
        qh = q.float().view(G, M, heads, dh)
        qt = torch.einsum("gmhd,hde->ghme", qh, w_k.float().view(heads, dh, ds)).reshape(G, heads * M, ds)
        beta = torch.einsum("gmhd,hd->ghm", qh, b_k.float().view(heads, dh)).reshape(G, heads * M)
        acc = USEAttentionFunction.apply(qt.contiguous(), beta.contiguous(), kx, kt, t_valid, 1.0 / math.sqrt(dh))
        o = torch.einsum("ghme,hde->gmhd", acc.view(G, heads, M, ds), w_v.float().view(heads, dh, ds))
        return (o + b_v.float().view(heads, dh)).reshape(G, M, ds).to(q.dtype)
