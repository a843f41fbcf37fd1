"""Fused Triton OCA (math: nearl_rt/kernels/oca.py), forward and backward, behind one autograd.Function.

Forward: one program per block of BLOCK_T token rows of one sequence; the sequence carries its group
index, so image rows, per-image text rows and cached-text rows (one shared Z) use the same kernel:
LN -> q -> scores over the M keys -> softmax -> .V -> .W_o -> fp32 parallel/orthogonal split ->
F + s * D_perp. The row block streams D in BLOCK_D-wide chunks (registers stay bounded at D = 768/1024):
pass 1 the LayerNorm statistics, pass 2 q = LN(F) W_q and, for the split, F W_o^T (<H, F> is
p.V . F W_o^T, so H is never held whole), pass 3 writes F + s * (H - c F) chunk by chunk. The block
(BLOCK_T x D) is read from HBM once; passes 2 and 3 re-read it from cache. The output is written once.
Pass 1 (statistics) is software-pipelined (3 chunks in flight: triton_common.ln_stats), pass 3 too (2).

Bytes and expected bandwidth (ViT-B/16 image rows at B = 64, 16-bit: 12,608 rows x 768): the minimum is
the rows once in and once out, 2 x 19.4 MB. The plan (_plan) takes 64-row blocks with 8 warps there:
256 programs at 124 registers and 56 KB of shared memory, 2 per SM on sm_90, 0.97 waves on 132 SMs
(python -m nearl_rt.kernels.resources). W_q and W_o in the activation dtype (98 KB) are re-read from L2 by every
program, ~1x the token bytes, and passes 2-3 re-read the block from L2 (2x): ~2.5x the HBM bytes through
L2, against ~6.7x for the 32-row fp32-weight blocks before. Expected (a design estimate, not measured on a
GPU): 60-75 % of the device-to-device copy bandwidth at B = 64; small batches take 32/16-row blocks so
that more SMs stream, and are latency-bound (a few microseconds).

Backward (no atomics, deterministic):
  _oca_bwd_rows   recomputes the forward per row block (same chunked passes; every full-row reduction
                  of the backward folds into r-wide products: <g, H> = p.V . g W_o^T,
                  sum_d dLN = dq . sum_d W_q, sum_d dLN * LN = dq . q) and writes dF, the per-token ds
                  terms, the small per-token factors (mean, rstd, dq, p.V, a) and per-block partial sums
                  of dk and dv;
  _oca_bwd_weights  D-chunked partial sums over token blocks of dW_q = LN(F)^T dq and
                  dW_o = (p.V)^T dH, with dH = s*g - a*F rebuilt from g and F (never stored);
  torch sums the partials in a fixed order (dk/dv per group through a one-hot matmul).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from nearl_rt.kernels.checks import check_fused_tensors, check_oca_inputs
from nearl_rt.kernels.derived import derived
from nearl_rt.kernels.oca import LN_EPS
from nearl_rt.kernels.triton_common import cdiv, compute_dtype, ln_stats, mm, multiprocessor_count, pow2, rmax, row_tile, rsum


@triton.jit
def _row_block(seq, tb, grp_ptr, N, D, BLOCK_T: tl.constexpr):
    """Row block `tb` of sequence `seq`: rows within the sequence (int32: in-block offsets stay 32-bit),
    their global token indices, row mask, the sequence's synergy group and its element offset."""
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    seq64 = seq.to(tl.int64)
    return rows, seq64 * N + rows, rows < N, tl.load(grp_ptr + seq).to(tl.int64), seq64 * N * D


@triton.jit
def _wq_tile(wq_ptr, cols, D, R_RANK, BLOCK_R: tl.constexpr):
    """W_q[cols, :], [BLOCK_D, BLOCK_R]."""
    rk = tl.arange(0, BLOCK_R)
    return tl.load(wq_ptr + cols[:, None] * R_RANK + rk[None, :],
                   mask=(cols < D)[:, None] & (rk < R_RANK)[None, :], other=0.0)


@triton.jit
def _wo_tile(wo_ptr, cols, D, R_RANK, BLOCK_R: tl.constexpr):
    """W_o[:, cols]^T, [BLOCK_D, BLOCK_R]."""
    rk = tl.arange(0, BLOCK_R)
    return tl.load(wo_ptr + rk[None, :] * D + cols[:, None],
                   mask=(cols < D)[:, None] & (rk < R_RANK)[None, :], other=0.0)


@triton.jit
def _attend(q, g, k_ptr, v_ptr, M, R_RANK, KV_G, KV_M, qk_scale, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
            CDT: tl.constexpr):
    """softmax(q k_g^T * scale) and p v_g for the M keys/values of group g (strides KV_G, KV_M, 1)."""
    mk = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_R)
    kv_offs = g * KV_G + mk[:, None] * KV_M + rk[None, :]
    kv_mask = (mk < M)[:, None] & (rk < R_RANK)[None, :]
    kk = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
    vv = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
    sc = mm(q, tl.trans(kk), CDT) * qk_scale
    sc = tl.where((mk < M)[None, :], sc, float("-inf"))
    e = tl.exp(sc - rmax(sc, 1)[:, None])
    p = e / rsum(e, 1)[:, None]
    return p, mm(p, vv, CDT), kk, vv


@triton.jit
def _oca_fwd(x_ptr, out_ptr, grp_ptr, k_ptr, v_ptr, wq_ptr, wo_ptr, s_ptr, N, D, M, R_RANK, KV_G, KV_M, qk_scale,
             ln_eps, eps,
             ORTHO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_R: tl.constexpr, CDT: tl.constexpr):
    rows, tok, rmask, g, base = _row_block(tl.program_id(0), tl.program_id(1), grp_ptr, N, D, BLOCK_T)
    x_ptr += base
    out_ptr += base
    mean, rstd = ln_stats(x_ptr, rows, rmask, D, ln_eps, BLOCK_T, BLOCK_D)
    # q = LN(F) W_q; <H, F> = p.V . (F W_o^T) and <F, F>, accumulated over D chunks
    q = tl.full((BLOCK_T, BLOCK_R), 0.0, dtype=tl.float32)
    x_wo = tl.full((BLOCK_T, BLOCK_R), 0.0, dtype=tl.float32)
    xx = tl.full((BLOCK_T,), 0.0, dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, offs, xm, cols = row_tile(x_ptr, rows, rmask, d0, D, BLOCK_D)
        q += mm(tl.where(xm, (x - mean[:, None]) * rstd[:, None], 0.0), _wq_tile(wq_ptr, cols, D, R_RANK, BLOCK_R), CDT)
        if ORTHO:
            x_wo += mm(x, _wo_tile(wo_ptr, cols, D, R_RANK, BLOCK_R), CDT)
            xx += rsum(x * x, 1)
    p, pv, kk, vv = _attend(q, g, k_ptr, v_ptr, M, R_RANK, KV_G, KV_M, qk_scale, BLOCK_M, BLOCK_R, CDT)
    coef = rsum(pv * x_wo, 1) / (xx + eps)  # zero unless ORTHO
    s = tl.load(s_ptr).to(tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=2):
        x, offs, xm, cols = row_tile(x_ptr, rows, rmask, d0, D, BLOCK_D)
        h = mm(pv, tl.trans(_wo_tile(wo_ptr, cols, D, R_RANK, BLOCK_R)), CDT)
        tl.store(out_ptr + offs, (x + s * (h - coef[:, None] * x)).to(out_ptr.dtype.element_ty), mask=xm)


@triton.jit
def _oca_bwd_rows(x_ptr, go_ptr, dx_ptr, grp_ptr, k_ptr, v_ptr, wq_ptr, wo_ptr, s_ptr,
                  mean_ptr, rstd_ptr, dq_ptr, pv_ptr, a_ptr, dstok_ptr, dk_ptr, dv_ptr,
                  N, D, M, R_RANK, KV_G, KV_M, qk_scale, ln_eps, eps, ORTHO: tl.constexpr, DS_FULL_H: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_R: tl.constexpr, CDT: tl.constexpr):
    seq, tb = tl.program_id(0), tl.program_id(1)
    rows, tok, rmask, g, base = _row_block(seq, tb, grp_ptr, N, D, BLOCK_T)
    x_ptr += base
    go_ptr += base
    dx_ptr += base
    mean, rstd = ln_stats(x_ptr, rows, rmask, D, ln_eps, BLOCK_T, BLOCK_D)
    # every full-row reduction the backward needs, in one pass over D:
    # q = LN W_q, sum_d W_q (for sum_d dLN), F W_o^T, g W_o^T, <g, F>, <F, F>
    q = tl.full((BLOCK_T, BLOCK_R), 0.0, dtype=tl.float32)
    x_wo = tl.full((BLOCK_T, BLOCK_R), 0.0, dtype=tl.float32)
    g_wo = tl.full((BLOCK_T, BLOCK_R), 0.0, dtype=tl.float32)
    wq_sum = tl.full((BLOCK_R,), 0.0, dtype=tl.float32)
    gx = tl.full((BLOCK_T,), 0.0, dtype=tl.float32)
    xx = tl.full((BLOCK_T,), 0.0, dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, offs, xm, cols = row_tile(x_ptr, rows, rmask, d0, D, BLOCK_D)
        go = tl.load(go_ptr + offs, mask=xm, other=0.0).to(tl.float32)
        wq = _wq_tile(wq_ptr, cols, D, R_RANK, BLOCK_R)
        wo_t = _wo_tile(wo_ptr, cols, D, R_RANK, BLOCK_R)
        q += mm(tl.where(xm, (x - mean[:, None]) * rstd[:, None], 0.0), wq, CDT)
        wq_sum += rsum(wq, 0)
        g_wo += mm(go, wo_t, CDT)
        if ORTHO:
            x_wo += mm(x, wo_t, CDT)
            gx += rsum(go * x, 1)
            xx += rsum(x * x, 1)
    p, pv, kk, vv = _attend(q, g, k_ptr, v_ptr, M, R_RANK, KV_G, KV_M, qk_scale, BLOCK_M, BLOCK_R, CDT)
    s = tl.load(s_ptr).to(tl.float32)
    g_h = rsum(pv * g_wo, 1)  # <g, H>
    coef = rsum(pv * x_wo, 1) / (xx + eps)  # <H, F> / (<F, F> + eps); zero unless ORTHO
    a = s * gx / (xx + eps)  # dH = s*g - a*F
    ds_tok = g_h if DS_FULL_H else g_h - coef * gx
    dpv = s * g_wo - a[:, None] * x_wo  # dH W_o^T
    dp = mm(dpv, tl.trans(vv), CDT)
    dsc = p * (dp - rsum(p * dp, 1)[:, None])
    dq = mm(dsc, kk, CDT) * qk_scale
    dln_sum = rsum(dq * wq_sum[None, :], 1)  # sum_d dLN_d
    dln_ln = rsum(dq * q, 1)  # sum_d dLN_d LN_d
    for d0 in range(0, D, BLOCK_D):
        x, offs, xm, cols = row_tile(x_ptr, rows, rmask, d0, D, BLOCK_D)
        go = tl.load(go_ptr + offs, mask=xm, other=0.0).to(tl.float32)
        ln = (x - mean[:, None]) * rstd[:, None]
        dln = mm(dq, tl.trans(_wq_tile(wq_ptr, cols, D, R_RANK, BLOCK_R)), CDT)
        dx = go + rstd[:, None] * (dln - (dln_sum / D)[:, None] - ln * (dln_ln / D)[:, None])
        if ORTHO:
            h = mm(pv, tl.trans(_wo_tile(wo_ptr, cols, D, R_RANK, BLOCK_R)), CDT)
            dx += -(s * coef)[:, None] * go - a[:, None] * (h - 2.0 * coef[:, None] * x)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=xm)
    # per-token factors for the weight-gradient kernel (fp32) and per-block partial sums of dk, dv
    rk = tl.arange(0, BLOCK_R)
    mk = tl.arange(0, BLOCK_M)
    r2 = rmask[:, None] & (rk < R_RANK)[None, :]
    tl.store(mean_ptr + tok, mean, mask=rmask)
    tl.store(rstd_ptr + tok, rstd, mask=rmask)
    tl.store(a_ptr + tok, a, mask=rmask)
    tl.store(dstok_ptr + tok, ds_tok, mask=rmask)
    tl.store(dq_ptr + tok[:, None] * R_RANK + rk[None, :], dq, mask=r2)
    tl.store(pv_ptr + tok[:, None] * R_RANK + rk[None, :], pv, mask=r2)
    part = (seq.to(tl.int64) * tl.num_programs(1) + tb) * M * R_RANK + mk[:, None] * R_RANK + rk[None, :]
    pmask = (mk < M)[:, None] & (rk < R_RANK)[None, :]
    dsc = tl.where(rmask[:, None], dsc, 0.0)  # rows past N carry no gradient
    pm = tl.where(rmask[:, None], p, 0.0)
    tl.store(dk_ptr + part, tl.dot(tl.trans(dsc), q, input_precision="ieee") * qk_scale, mask=pmask)
    tl.store(dv_ptr + part, tl.dot(tl.trans(pm), dpv, input_precision="ieee"), mask=pmask)


@triton.jit
def _oca_bwd_weights(x_ptr, go_ptr, s_ptr, mean_ptr, rstd_ptr, dq_ptr, pv_ptr, a_ptr, dwq_ptr, dwo_ptr,
                     T, D, R_RANK, BLOCK_T: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_R: tl.constexpr,
                     CDT: tl.constexpr):
    dc, split = tl.program_id(0), tl.program_id(1)
    nsplit = tl.num_programs(1)
    cols = dc * BLOCK_DC + tl.arange(0, BLOCK_DC)
    rk = tl.arange(0, BLOCK_R)
    cmask, kmask = cols < D, rk < R_RANK
    s = tl.load(s_ptr).to(tl.float32)
    acc_q = tl.full((BLOCK_DC, BLOCK_R), 0.0, dtype=tl.float32)
    acc_o = tl.full((BLOCK_R, BLOCK_DC), 0.0, dtype=tl.float32)
    for tb in range(split, (T + BLOCK_T - 1) // BLOCK_T, nsplit):
        rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        m2 = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
        r2 = rmask[:, None] & kmask[None, :]
        dq = tl.load(dq_ptr + rows[:, None] * R_RANK + rk[None, :], mask=r2, other=0.0)
        pv = tl.load(pv_ptr + rows[:, None] * R_RANK + rk[None, :], mask=r2, other=0.0)
        ln = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
        acc_q += mm(tl.trans(ln), dq, CDT)
        acc_o += mm(tl.trans(pv), s * go - a[:, None] * x, CDT)
    base = split.to(tl.int64) * D * R_RANK
    tl.store(dwq_ptr + base + cols[:, None] * R_RANK + rk[None, :], acc_q, mask=cmask[:, None] & kmask[None, :])
    tl.store(dwo_ptr + base + rk[:, None] * D + cols[None, :], acc_o, mask=kmask[:, None] & cmask[None, :])


@functools.lru_cache(maxsize=4096)
def _plan(R: int, N: int, D: int, M: int, r: int, dtype: torch.dtype, sms: int):
    """Forward and backward block sizes, warps and grids for R sequences of N rows of width D.

    Forward: the largest row block (64, 32, 16) whose grid still fills every SM once (B = 64 ViT-B/16
    image rows: 64-row blocks, 256 programs, 2 per SM: one wave); small batches take small blocks so that
    more SMs stream. Backward rows: at most 32 rows, 16 for fp32 (its live set is twice the forward's)."""
    fp32 = dtype == torch.float32
    block_t = next((bt for bt in ((32,) if fp32 else (64, 32)) if R * cdiv(N, bt) >= sms), 16)
    block_t = min(block_t, pow2(N))
    common = dict(BLOCK_M=pow2(M), BLOCK_R=pow2(r), CDT=compute_dtype(dtype))
    # Block shapes that compile without register spill for sm_90 and sm_80 with Triton 3.6 and 3.8
    # (python -m nearl_rt.kernels.resources; docs/kernels.md). fp32 runs IEEE dots on CUDA cores: 32-wide D
    # chunks for 32-row blocks and 16-wide for 16-row ones (4 warps: 32-wide spilled 4 B on sm_80 with 3.6),
    # 16-row backward blocks (32 rows spilled 16 B on sm_90 with 3.6) and 8 warps for the weight gradients
    # (4 spilled 4 B on sm_80 with 3.6).
    fwd_d = (32 if block_t >= 32 else 16) if fp32 else 64
    fwd = dict(common, BLOCK_T=block_t, BLOCK_D=min(fwd_d, pow2(D)),
               num_warps=8 if block_t >= (32 if fp32 else 64) else 4)
    bwd_t = min(block_t, 16 if fp32 else 32)
    bwd = dict(common, BLOCK_T=bwd_t, BLOCK_D=min(32 if fp32 else 64, pow2(D)), num_warps=8)
    block_dc, weights_t = min(32 if fp32 else 64, pow2(D)), 32
    d_chunks = cdiv(D, block_dc)
    splits = max(1, min(cdiv(R * N, weights_t), cdiv(2 * sms, d_chunks)))  # token splits of the weight grads
    return fwd, (R, cdiv(N, block_t)), bwd, (R, cdiv(N, bwd_t)), \
        dict(BLOCK_T=weights_t, BLOCK_DC=block_dc, BLOCK_R=pow2(r), CDT=compute_dtype(dtype),
             num_warps=8 if fp32 else 4), (d_chunks, splits)


def _weights_as(x, w_q, w_o):
    """W_q, W_o in the activation dtype (what the kernels' matmuls round them to anyway), cast once per
    weight version: half the cache traffic of fp32 weights re-read by every row block."""
    if w_q.dtype == x.dtype and w_o.dtype == x.dtype:
        return w_q, w_o
    return derived(("oca_weights", x.dtype), lambda a, b: (a.to(x.dtype).contiguous(), b.to(x.dtype).contiguous()),
                   w_q, w_o)


class OCAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, k, v, w_q, w_o, scale, eps, orthogonal, keep_parallel):
        R, N, D = x.shape
        M, r = k.shape[1], w_q.shape[1]
        plan = _plan(R, N, D, M, r, x.dtype, multiprocessor_count(x.device))
        out = torch.empty_like(x)
        _oca_fwd[plan[1]](x, out, group, k, v, *_weights_as(x, w_q, w_o), scale, N, D, M, r, k.stride(0),
                          k.stride(1), 1.0 / math.sqrt(r), LN_EPS, eps,
                          ORTHO=orthogonal and keep_parallel == "drop", **plan[0])
        ctx.save_for_backward(x, group, k, v, w_q, w_o, scale)
        ctx.opts = (eps, orthogonal, keep_parallel, plan)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, group, k, v, w_q, w_o, scale = ctx.saved_tensors
        eps, orthogonal, keep_parallel, (_, _, meta, grid, wmeta, wgrid) = ctx.opts
        grad_out = grad_out.contiguous()
        R, N, D = x.shape
        (G, M, r), T = k.shape, R * N
        f32 = dict(device=x.device, dtype=torch.float32)
        dx = torch.empty_like(x)
        mean, rstd, a, ds_tok = (torch.empty(T, **f32) for _ in range(4))
        dq, pv = torch.empty(T, r, **f32), torch.empty(T, r, **f32)
        dk_part = torch.empty(R, grid[1], M, r, **f32)
        dv_part = torch.empty_like(dk_part)
        _oca_bwd_rows[grid](x, grad_out, dx, group, k, v, *_weights_as(x, w_q, w_o), scale,
                            mean, rstd, dq, pv, a, ds_tok, dk_part, dv_part, N, D, M, r, k.stride(0), k.stride(1),
                            1.0 / math.sqrt(r), LN_EPS, eps, ORTHO=orthogonal,
                            DS_FULL_H=(not orthogonal) or keep_parallel == "stopgrad", **meta)
        splits = wgrid[1]
        dwq_part = torch.empty(splits, D, r, **f32)
        dwo_part = torch.empty(splits, r, D, **f32)
        _oca_bwd_weights[wgrid](x, grad_out, scale, mean, rstd, dq, pv, a, dwq_part, dwo_part, T, D, r, **wmeta)
        onehot = torch.nn.functional.one_hot(group.long(), G).to(torch.float32).t()  # [G, R]
        dk = (onehot @ dk_part.sum(1).view(R, M * r)).view(G, M, r)
        dv = (onehot @ dv_part.sum(1).view(R, M * r)).view(G, M, r)
        return (dx, None, dk.to(k.dtype), dv.to(v.dtype), dwq_part.sum(0).to(w_q.dtype),
                dwo_part.sum(0).to(w_o.dtype), ds_tok.sum().to(scale.dtype).view_as(scale), None, None, None)


def oca_triton(x, group, k, v, w_q, w_o, scale, *, eps: float = 1e-6, orthogonal: bool = True,
               keep_parallel: str = "drop") -> torch.Tensor:
    """Fused OCA with the signature and result of nearl_rt.kernels.oca.oca_reference (fp32 accumulation)."""
    check_oca_inputs(x, group, k, v, w_q, w_o, scale, keep_parallel=keep_parallel, need_contiguous=True)
    check_fused_tensors(x, k, v, w_q, w_o, scale)
    return OCAFunction.apply(x, group, k, v, w_q, w_o, scale, eps, orthogonal, keep_parallel)
