"""Fused LayerNorm (with affine) + down-projection of the USEformer's key tokens: K = LN(X) W_down^T.

Forward: one Triton program per block of BLOCK_T token rows streams D in chunks, reads the tokens once
from HBM and writes only the d_s-wide keys (in the dtype the attention wants), with the affine folded
into the weights once per weight version (nearl_rt/kernels/derived.py):
    LN(x) W^T = xhat (W * ln_w)^T + W ln_b,   xhat = (x - mean) * rstd.
Pass 1 (statistics) is software-pipelined (3 chunks in flight); pass 2 re-reads the block from L2.

Bytes and expected bandwidth (ViT-B/16 image tokens at B = 64, fp16: T = 12,608 tokens x 768): the
minimum is the tokens once (19.4 MB) plus the keys (3.2 MB). The folded weight (d_s x D = 192 KB in
16 bit) is re-read from L2 by every program; 64-token blocks at B = 64 (197 programs) halve that L2
traffic against 32-token blocks, to ~2x the token bytes. Expected ~60-70 % of copy bandwidth at B = 64
(the two passes over each block and the 1.5 waves of one-CTA-per-SM programs are the loss); at B = 1
and 8 the op is latency-bound (a few microseconds).

Backward: recomputes the same math with PyTorch (nearl_rt.kernels.use_attention.down_project) under autograd and
differentiates it; the issue allows the USE backward to fuse less, and this part is a plain LN + GEMM.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nearl_rt.kernels.derived import derived
from nearl_rt.kernels.triton_common import cdiv, compute_dtype, ln_stats, mm, multiprocessor_count, no_autocast, pow2, row_tile
from nearl_rt.kernels.use_attention import LN_EPS, down_project


@triton.jit
def _ln_down_fwd(x_ptr, w_ptr, c_ptr, k_ptr, T, D, DS, ln_eps, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_S: tl.constexpr, CDT: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK_T
    x_ptr += start * D  # in-block offsets stay 32-bit
    k_ptr += start * DS
    rows = tl.arange(0, BLOCK_T)
    rmask = start + rows < T
    cs = tl.arange(0, BLOCK_S)
    mean, rstd = ln_stats(x_ptr, rows, rmask, D, ln_eps, BLOCK_T, BLOCK_D)
    acc = tl.full((BLOCK_T, BLOCK_S), 0.0, dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=2):
        x, offs, xm, cols = row_tile(x_ptr, rows, rmask, d0, D, BLOCK_D)
        w_t = tl.load(w_ptr + cs[None, :] * D + cols[:, None], mask=(cols < D)[:, None] & (cs < DS)[None, :],
                      other=0.0)  # (W * ln_w)[:, cols]^T
        acc += mm(tl.where(xm, (x - mean[:, None]) * rstd[:, None], 0.0), w_t, CDT)
    acc += tl.load(c_ptr + cs, mask=cs < DS, other=0.0)[None, :]
    tl.store(k_ptr + rows[:, None] * DS + cs[None, :], acc.to(k_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cs < DS)[None, :])


@functools.lru_cache(maxsize=1024)
def _plan(T: int, D: int, DS: int, dtype: torch.dtype, sms: int):
    """Token blocks: 64 when that still fills every SM once (amortises the weight re-reads), else 32 or 16.
    fp32 takes 32-wide D chunks: 64-wide ones spill on sm_80 (python -m nearl_rt.kernels.resources --arch sm_80)."""
    block_t = next((bt for bt in (64, 32) if cdiv(T, bt) >= sms), 16)
    block_d = min(32 if dtype == torch.float32 else 64, pow2(D))
    return (cdiv(T, block_t),), dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_S=pow2(DS),
                                     CDT=compute_dtype(dtype), num_warps=8)


def _fold(ln_w, ln_b, w_down, dtype):
    """(W * ln_w) in the tokens' dtype and the fp32 bias W ln_b (fp32 even under autocast)."""
    with no_autocast(w_down.device):
        return (w_down.float() * ln_w.float()).to(dtype).contiguous(), torch.mv(w_down.float(), ln_b.float())


class LNDownFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, ln_w, ln_b, w_down, out_dtype):
        D, DS = tokens.shape[-1], w_down.shape[0]
        T = tokens.numel() // D
        w_folded, bias = derived(("ln_down", tokens.dtype), lambda *w: _fold(*w, tokens.dtype), ln_w, ln_b, w_down)
        keys = torch.empty(*tokens.shape[:-1], DS, device=tokens.device, dtype=out_dtype)
        grid, meta = _plan(T, D, DS, tokens.dtype, multiprocessor_count(tokens.device))
        _ln_down_fwd[grid](tokens, w_folded, bias, keys, T, D, DS, LN_EPS, **meta)
        ctx.save_for_backward(tokens, ln_w, ln_b, w_down)
        return keys

    @staticmethod
    def backward(ctx, grad_keys):
        inputs = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, ctx.needs_input_grad)]
            keys = down_project(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(keys, wanted, grad_keys.to(keys.dtype)))
        return (*(next(grads) if t.requires_grad else None for t in leaves), None)


def ln_down_triton(tokens, ln_w, ln_b, w_down, out_dtype=None) -> torch.Tensor:
    """down_project(tokens, ln_w, ln_b, w_down).to(out_dtype) with a fused forward (one rounding of the
    fp32 accumulator to out_dtype, default the tokens' dtype); tokens [..., D] contiguous."""
    return LNDownFunction.apply(tokens, ln_w, ln_b, w_down, out_dtype or tokens.dtype)
