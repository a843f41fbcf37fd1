"""Fused Triton USEformer attention (math: nearl_rt/kernels/use_attention.py), forward and backward.

The key/value projections are folded into the few queries, so k and v are never built:
    q_h . (W_k,h K_j + b_k,h) = (W_k,h^T q_h) . K_j + q_h . b_k,h
    sum_j p_j (W_v,h K_j + b_v,h) = W_v,h (sum_j p_j K_j) + b_v,h        (softmax rows sum to 1)
so every (query, head) pair becomes one query row q~ of width d_s, and all rows attend over the
down-projected tokens K itself: o~ = softmax(q~ K^T / sqrt(d_h)) K. The offset beta = q_h . b_k,h shifts
every score of a row equally, so softmax ignores it and its gradient is exactly zero; it still enters the
autograd Function so that b_k (and q through it) get that exact zero gradient, as in the reference.

All products keep fp32 accuracy (IEEE for fp32 keys; tf32x3 on tensor cores for fp16/bf16 keys, which
tf32 holds exactly). The backward computes delta = rowsum(dO * o~) with the same dot as dp = dO K^T, so
that dp - delta is exactly zero where it must be (a softmax over one valid key, whose o~ is that key);
computed apart (torch's sum against the kernel's dot) the two differ by fp32 rounding, which is noise there.

Kernels (Flash-Decoding style, no atomics):
  _use_fwd      grid (G, splits, query blocks): the W_k fold of the block's queries, an online softmax
                over the concatenated key list [image keys ; text keys], and, when there is one split,
                the W_v fold and the output (and, for training, o~ and the log-sum-exp). Splits over the
                key length are used only when G x query blocks would leave more than half of the SMs
                idle (B = 1, 8); each then writes partial (max, sum, acc) and
  _use_combine  merges the splits in a fixed order and finishes as above (one launch, not ~10 aten ops).
  _use_bwd      grid (G, splits, query blocks) per key source: recomputes p from the saved log-sum-exp,
                writes dK per key (one slice per reading group and query block) and per-split partial
                sums of dq~; torch sums them in a fixed order.
The keys K = LN(X) W_dx^T, LN(T) W_dt^T come from nearl_rt/kernels/ln_down_triton.py (fused forward: the tokens
are read once, only d_s-wide keys are written; backward recomputed with PyTorch). Constant text keys
(the cached class prompts of text_cacheable) are projected once per weight version (nearl_rt/kernels/derived.py).

Bytes (ViT-B/16 at B = 64, 16-bit, own text of C = 2 prompts x 16 tokens): the keys, 64 x (197 + 32) x 128
x 2 B = 3.8 MB, read once from HBM (the four 16-row query blocks of a group read them from L2, and each
reads W_k and W_v, 64 KB each in fp32, from L2), the queries and outputs (0.5 MB). 256 programs, 2 per SM
(about 240 registers, 40 KB of shared memory, no spill with Triton 3.6 or 3.8): 0.97 waves. The op is
latency-bound (expected a few microseconds; not measured on a GPU), so the design goal is one launch per
layer and no split combine at B = 64, not a bandwidth fraction.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from nearl_rt.kernels.checks import check_fused_tensors, check_use_inputs
from nearl_rt.kernels.derived import derived
from nearl_rt.kernels.ln_down_triton import ln_down_triton
from nearl_rt.kernels.triton_common import cdiv, multiprocessor_count, no_autocast, pow2, rmax, rsum

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
def _online(m_i, l_i, acc, keys, kmask, sc, PREC: tl.constexpr):
    """One key block of the online softmax: running max, sum and p-weighted sum of keys."""
    sc = tl.where(kmask[None, :], sc, float("-inf"))
    m_new = tl.maximum(m_i, rmax(sc, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(sc - m_new[:, None])
    return m_new, l_i * alpha + rsum(p, 1), acc * alpha[:, None] + tl.dot(p, keys, input_precision=PREC)


@triton.jit
def _head_cols(hh, DH, BLOCK_H: tl.constexpr):
    """Columns of head hh within d_s, and which of the BLOCK_H lanes are real."""
    j = tl.arange(0, BLOCK_H)
    return hh * DH + j, j < DH


@triton.jit
def _fold_queries(q_ptr, wk_ptr, g, qi, qmask, M, DS, DH, HEADS, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """q~ rows (m, h) = W_k,h^T q_h of the block's query rows qi (row = m * HEADS + h), fp32 [BLOCK_Q, BLOCK_S]."""
    m_i, h_i = qi // HEADS, qi % HEADS
    cs = tl.arange(0, BLOCK_S)
    qt = tl.full((BLOCK_Q, BLOCK_S), 0.0, dtype=tl.float32)
    for hh in range(0, HEADS):
        dcol, jm = _head_cols(hh, DH, BLOCK_H)
        qh = tl.load(q_ptr + g * M * DS + m_i[:, None] * DS + dcol[None, :],
                     mask=(qmask & (h_i == hh))[:, None] & jm[None, :], other=0.0).to(tl.float32)
        wk = tl.load(wk_ptr + dcol[:, None] * DS + cs[None, :], mask=jm[:, None] & (cs < DS)[None, :], other=0.0)
        qt += tl.dot(qh, wk, input_precision="ieee")
    return qt


@triton.jit
def _finish(m_i, l_i, acc, g, qi, qmask, wv_ptr, bv_ptr, out_ptr, accn_ptr, lse_ptr, M, NQ, DS, DH, HEADS,
            SAVE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """Normalise o~ = acc / l and fold the value projection: o[m, head h] = W_v,h o~(m, h) + b_v,h, stored
    in o's dtype; with SAVE also o~ and the log-sum-exp (fp32) for the backward."""
    l_i = tl.where(qmask, l_i, 1.0)  # padding rows past NQ saw no key
    accn = acc / l_i[:, None]
    cs = tl.arange(0, BLOCK_S)
    if SAVE:
        q2 = qmask[:, None] & (cs < DS)[None, :]
        tl.store(accn_ptr + g * NQ * DS + qi[:, None] * DS + cs[None, :], accn, mask=q2)
        tl.store(lse_ptr + g * NQ + qi, m_i + tl.log(l_i), mask=qmask)
    m_i, h_i = qi // HEADS, qi % HEADS
    for hh in range(0, HEADS):
        dcol, jm = _head_cols(hh, DH, BLOCK_H)
        wv_t = tl.load(wv_ptr + dcol[None, :] * DS + cs[:, None], mask=(cs < DS)[:, None] & jm[None, :], other=0.0)
        o = tl.dot(accn, wv_t, input_precision="ieee") + tl.load(bv_ptr + dcol, mask=jm, other=0.0)[None, :]
        tl.store(out_ptr + g * M * DS + m_i[:, None] * DS + dcol[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=(qmask & (h_i == hh))[:, None] & jm[None, :])


@triton.jit
def _use_fwd(q_ptr, wk_ptr, kx_ptr, kt_ptr, valid_ptr, wv_ptr, bv_ptr, out_ptr, accn_ptr, lse_ptr,
             m_ptr, l_ptr, part_ptr, M, NQ, DS, DH, HEADS, NX, NT, KT_GROUP_STRIDE, blocks_per_split, scale,
             HAS_X: tl.constexpr, FINAL: tl.constexpr, SAVE: tl.constexpr, BLOCK_Q: tl.constexpr,
             BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr):
    g, split, qb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    qi = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = qi < NQ
    qs = _fold_queries(q_ptr, wk_ptr, g, qi, qmask, M, DS, DH, HEADS, BLOCK_Q, BLOCK_S, BLOCK_H)
    m_i = tl.full((BLOCK_Q,), -1e30, dtype=tl.float32)
    l_i = tl.full((BLOCK_Q,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_Q, BLOCK_S), 0.0, dtype=tl.float32)
    # this split's blocks of the concatenated key list [image blocks ; text blocks]
    nbx = (NX + BLOCK_K - 1) // BLOCK_K if HAS_X else 0
    lo, hi = _split_blocks(split, blocks_per_split, nbx * BLOCK_K + NT, BLOCK_K)
    if HAS_X:
        for kb in range(lo, tl.minimum(hi, nbx)):
            keys, kmask, sc = _key_scores(kx_ptr, valid_ptr, g, kb, NX, DS, qs, scale, False, BLOCK_K, BLOCK_S, PREC)
            m_i, l_i, acc = _online(m_i, l_i, acc, keys, kmask, sc, PREC)
    for kb in range(tl.maximum(lo, nbx) - nbx, hi - nbx):
        keys, kmask, sc = _key_scores(kt_ptr, valid_ptr, g * KT_GROUP_STRIDE, kb, NT, DS, qs, scale, True, BLOCK_K,
                                      BLOCK_S, PREC)
        m_i, l_i, acc = _online(m_i, l_i, acc, keys, kmask, sc, PREC)
    if FINAL:
        _finish(m_i, l_i, acc, g, qi, qmask, wv_ptr, bv_ptr, out_ptr, accn_ptr, lse_ptr, M, NQ, DS, DH, HEADS,
                SAVE, BLOCK_S, BLOCK_H)
    else:  # partial (max, sum, acc) of this split; _use_combine merges the splits
        cs = tl.arange(0, BLOCK_S)
        part = (g * tl.num_programs(1) + split) * NQ
        tl.store(m_ptr + part + qi, m_i, mask=qmask)
        tl.store(l_ptr + part + qi, l_i, mask=qmask)
        tl.store(part_ptr + (part + qi)[:, None] * DS + cs[None, :], acc, mask=qmask[:, None] & (cs < DS)[None, :])


@triton.jit
def _use_combine(wv_ptr, bv_ptr, out_ptr, accn_ptr, lse_ptr, m_ptr, l_ptr, part_ptr, M, NQ, DS, DH, HEADS, SPLITS,
                 SAVE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """Merge the splits' partials in a fixed order (a split that saw no valid key has m = -1e30, l = 0)."""
    g, qb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    qi = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = qi < NQ
    cs = tl.arange(0, BLOCK_S)
    q2 = qmask[:, None] & (cs < DS)[None, :]
    m_i = tl.full((BLOCK_Q,), -1e30, dtype=tl.float32)
    l_i = tl.full((BLOCK_Q,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_Q, BLOCK_S), 0.0, dtype=tl.float32)
    for s in range(0, SPLITS):
        part = (g * SPLITS + s) * NQ + qi
        m_s = tl.load(m_ptr + part, mask=qmask, other=-1e30)
        m_new = tl.maximum(m_i, m_s)
        a_old, a_s = tl.exp(m_i - m_new), tl.exp(m_s - m_new)
        l_i = l_i * a_old + tl.load(l_ptr + part, mask=qmask, other=0.0) * a_s
        acc = acc * a_old[:, None] + tl.load(part_ptr + part[:, None] * DS + cs[None, :], mask=q2, other=0.0) * \
            a_s[:, None]
        m_i = m_new
    _finish(m_i, l_i, acc, g, qi, qmask, wv_ptr, bv_ptr, out_ptr, accn_ptr, lse_ptr, M, NQ, DS, DH, HEADS, SAVE,
            BLOCK_S, BLOCK_H)


@triton.jit
def _use_bwd(q_ptr, k_ptr, valid_ptr, lse_ptr, do_ptr, accn_ptr, dk_ptr, dq_ptr,
             NQ, NK, DS, K_GROUP_STRIDE, blocks_per_split, split_offset, total_splits, scale,
             HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
             PREC: tl.constexpr):
    g, split, qb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    kg = g * K_GROUP_STRIDE
    qi, qmask, qoffs, q2, qs = _load_queries(q_ptr, g, qb, NQ, DS, BLOCK_Q, BLOCK_S)
    do = tl.load(do_ptr + g * NQ * DS + qoffs, mask=q2, other=0.0)
    lse = tl.load(lse_ptr + g * NQ + qi, mask=qmask, other=0.0)
    # delta = rowsum(dO * o~) by the same product as dp = dO K^T below (BLOCK_Q == BLOCK_K: one dot shape),
    # so that dp - delta is exactly zero where it must be (a softmax over one valid key: o~ is that key)
    accn = tl.load(accn_ptr + g * NQ * DS + qoffs, mask=q2, other=0.0)
    rows = tl.arange(0, BLOCK_Q)
    delta = rsum(tl.where(rows[:, None] == rows[None, :], tl.dot(do, tl.trans(accn), input_precision=PREC), 0.0), 1)
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


@functools.lru_cache(maxsize=1024)
def _fwd_plan(G: int, NQ: int, DS: int, DH: int, NX: int, NT: int, fp32_keys: bool, sms: int):
    """Forward block sizes, grid and splits: 16 keys per block; 32 query rows x 8 warps for fp32 keys (IEEE
    dots), 16 query rows x 4 warps for 16-bit keys (tf32x3 dots: 32 rows spilled 32-48 B with Triton 3.6 and
    sat at 255 registers with 3.8; 16 rows take 180-245, 2 blocks per SM, no spill for sm_90 and sm_80 at
    d_s = 128 with either: python -m nearl_rt.kernels.resources). maxnreg: without it ptxas caps the 16-bit split
    kernels at 168 registers (3 blocks per SM) and spills 8 B on sm_80 with Triton 3.8; splits run only when
    the grid leaves SMs idle, where resident blocks per SM do not matter. Splits over the key length only when
    the G x query-block programs would leave more than half the SMs idle (ViT-B/16 images: none from B = 17
    with 16-bit keys, 33 with fp32)."""
    meta = dict(BLOCK_Q=min(32 if fp32_keys else 16, pow2(NQ)), BLOCK_K=16, BLOCK_S=pow2(DS), BLOCK_H=pow2(DH),
                num_warps=8 if fp32_keys else 4, PREC="ieee" if fp32_keys else "tf32x3",
                **({} if fp32_keys else dict(maxnreg=255)))
    nqb = cdiv(NQ, meta["BLOCK_Q"])
    nblocks = cdiv(NX, meta["BLOCK_K"]) + cdiv(NT, meta["BLOCK_K"])
    splits = 1 if 2 * G * nqb >= sms else min(nblocks, cdiv(sms, G * nqb))
    per = cdiv(nblocks, splits)
    return meta, per, (G, cdiv(nblocks, per), nqb)


@functools.lru_cache(maxsize=1024)
def _bwd_plan(G: int, NQ: int, DS: int, key_lengths: tuple, fp32_keys: bool, sms: int):
    """Backward block sizes and, per key source, (blocks per split, splits). 16 query rows, 16 keys and 8
    warps: the three tf32x3 / IEEE products of a key block stay within shared memory and registers without
    spill (python -m nearl_rt.kernels.resources; 32-key blocks spill 8 B for 16-bit keys, and the 64-row blocks used
    before needed 304 KB of shared memory). BLOCK_Q == BLOCK_K: _use_bwd's delta and dp are one dot shape."""
    meta = dict(BLOCK_Q=16, BLOCK_K=16, BLOCK_S=pow2(DS), num_warps=8,
                PREC="ieee" if fp32_keys else "tf32x3")
    plan = []
    for nk in key_lengths:
        nblocks = cdiv(nk, meta["BLOCK_K"])
        per = cdiv(nblocks, max(1, min(nblocks, cdiv(2 * sms, G))))
        plan.append((per, cdiv(nblocks, per)))
    return meta, cdiv(NQ, meta["BLOCK_Q"]), plan


def _fp32_projections(w_k, w_v, b_v):
    """W_k, W_v, b_v in fp32 (the folded projections keep fp32 accuracy), cast once per weight version."""
    return derived("use_fp32", lambda *w: tuple(p.float().contiguous() for p in w), w_k, w_v, b_v)


def _fold_queries_torch(q, w_k, heads):
    """q~ [G, M*heads, d_s], rows (m, h): the kernels' query fold (_fold_queries), for the backward."""
    G, M, ds = q.shape
    return torch.einsum("gmhd,hde->gmhe", q.view(G, M, heads, ds // heads), w_k.view(heads, ds // heads, ds)) \
        .reshape(G, M * heads, ds)


class USEAttentionFunction(torch.autograd.Function):
    """o = W_v-fold of softmax(q~ K^T * scale) K over image keys kx (may be None) and masked text keys kt,
    with q~ the W_k-fold of q (module docstring); every product in fp32 accuracy."""

    @staticmethod
    def forward(ctx, q, kx, kt, t_valid, w_k, b_k, w_v, b_v, heads):
        G, M, DS = q.shape
        DH, NQ = DS // heads, M * heads
        NX = 0 if kx is None else kx.shape[1]
        NT = kt.shape[1]
        fp32_keys = kt.dtype == torch.float32
        meta, per, grid = _fwd_plan(G, NQ, DS, DH, NX, NT, fp32_keys, multiprocessor_count(q.device))
        wk, wv, bv = _fp32_projections(w_k, w_v, b_v)
        out = torch.empty_like(q)
        save = any(ctx.needs_input_grad)
        f32 = dict(device=q.device, dtype=torch.float32)
        accn, lse = (torch.empty(G, NQ, DS, **f32), torch.empty(G, NQ, **f32)) if save else (out, out)
        splits = grid[1]
        parts = (torch.empty(G, splits, NQ, **f32), torch.empty(G, splits, NQ, **f32),
                 torch.empty(G, splits, NQ, DS, **f32)) if splits > 1 else (out, out, out)
        _use_fwd[grid](q, wk, kt if kx is None else kx, kt, t_valid, wv, bv, out, accn, lse, *parts, M, NQ, DS, DH,
                       heads, NX, NT, 1 if kt.shape[0] > 1 else 0, per, 1.0 / math.sqrt(DH), HAS_X=kx is not None,
                       FINAL=splits == 1, SAVE=save, **meta)
        if splits > 1:
            _use_combine[(G, grid[2])](wv, bv, out, accn, lse, *parts, M, NQ, DS, DH, heads, splits, SAVE=save,
                                       BLOCK_Q=meta["BLOCK_Q"], BLOCK_S=meta["BLOCK_S"], BLOCK_H=meta["BLOCK_H"],
                                       num_warps=meta["num_warps"])
        if save:
            ctx.save_for_backward(q, kx, kt, t_valid, w_k, b_k, w_v, accn, lse)
            ctx.heads = heads
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, kx, kt, t_valid, w_k, b_k, w_v, accn, lse = ctx.saved_tensors
        heads = ctx.heads
        G, M, DS = q.shape
        DH, NQ = DS // heads, M * heads
        wk, wv = w_k.float(), w_v.float()
        go = grad_out.float().view(G, M, heads, DH)
        acc4 = accn.view(G, M, heads, DS)
        dacc = torch.einsum("gmhd,hde->gmhe", go, wv.view(heads, DH, DS)).reshape(G, NQ, DS).contiguous()
        d_wv = torch.einsum("gmhd,gmhe->hde", go, acc4).reshape(DS, DS)
        d_bv = go.sum((0, 1)).reshape(DS)
        qt = _fold_queries_torch(q.float(), wk, heads).contiguous()
        sources = _sources(kx, kt, t_valid)
        meta, nqb, plan = _bwd_plan(G, NQ, DS, tuple(k.shape[1] for k, _, _ in sources), kt.dtype == torch.float32,
                                    multiprocessor_count(q.device))
        total = sum(n for _, n in plan)
        f32 = dict(device=q.device, dtype=torch.float32)
        dq_part = torch.empty(G, total, NQ, DS, **f32)
        dkeys, offset = [], 0
        for (keys, valid, stride), (per, n) in zip(sources, plan):
            dk = torch.empty(G, nqb, keys.shape[1], DS, **f32)  # per reading group and query block
            _use_bwd[(G, n, nqb)](qt, keys, valid if valid is not None else keys, lse, dacc, accn, dk, dq_part, NQ,
                                  keys.shape[1], DS, stride, per, offset, total, 1.0 / math.sqrt(DH),
                                  HAS_MASK=valid is not None, **meta)
            offset += n
            dk = dk.sum(1)
            dkeys.append((dk if stride else dk.sum(0, keepdim=True)).to(keys.dtype))
        dqt = dq_part.sum(1).view(G, M, heads, DS)
        dq = torch.einsum("gmhe,hde->gmhd", dqt, wk.view(heads, DH, DS)).reshape(G, M, DS)
        d_wk = torch.einsum("gmhd,gmhe->hde", q.float().view(G, M, heads, DH), dqt).reshape(DS, DS)
        dkx = dkeys[0] if kx is not None else None
        # b_k shifts every score of a query row equally: softmax ignores it, its gradient is exactly zero
        return (dq.to(q.dtype), dkx, dkeys[-1], None, d_wk.to(w_k.dtype), torch.zeros_like(b_k), d_wv.to(w_v.dtype),
                d_bv.to(w_v.dtype), None)


def _text_keys(t, ln_t_w, ln_t_b, w_dt, dtype):
    """Down-projected text keys; constant text tokens (cached class prompts, no gradient) are projected
    once per tensor and weight version (nearl_rt/kernels/derived.py), not at every layer of every forward."""
    return derived(("use_text_keys", dtype), lambda *a: ln_down_triton(*a, out_dtype=dtype), t, ln_t_w, ln_t_b, w_dt)


def use_attention_triton(q, x, t, t_valid, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt, w_k, b_k, w_v, b_v,
                         heads: int) -> torch.Tensor:
    """Fused USEformer attention with the signature and result of use_attention_reference."""
    check_use_inputs(q, x, t, t_valid, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt, w_k, b_k, w_v, b_v,
                     heads, need_contiguous=True)
    check_fused_tensors(q, x, t, ln_x_w, ln_x_b, w_dx, ln_t_w, ln_t_b, w_dt, w_k, b_k, w_v, b_v)
    kt = _text_keys(t, ln_t_w, ln_t_b, w_dt, q.dtype)
    kx = None if x is None else ln_down_triton(x, ln_x_w, ln_x_b, w_dx, out_dtype=q.dtype)
    with no_autocast(q.device):  # the folded projections stay fp32 under autocast
        return USEAttentionFunction.apply(q, kx, kt, t_valid, w_k, b_k, w_v, b_v, heads)
