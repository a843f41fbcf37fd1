"""Fused LayerNorm (with affine) + down-projection of the USEformer's key tokens: K = LN(X) W_down^T.

Forward: one Triton program per block of BLOCK_T token rows streams D in chunks, reads the tokens once
from HBM and writes only the d_s-wide keys, with the affine folded into the weights:
    LN(x) W^T = xhat (W * ln_w)^T + W ln_b,   xhat = (x - mean) * rstd.
Backward: recomputes the same math with PyTorch (kernels.use_attention.down_project) under autograd and
differentiates it; the issue allows the USE backward to fuse less, and this part is a plain LN + GEMM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import compute_dtype, ln_stats, mm, pow2, row_tile
from kernels.use_attention import LN_EPS, down_project


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
    for d0 in range(0, D, BLOCK_D):
        x, offs, xm, cols = row_tile(x_ptr, rows, rmask, d0, D, BLOCK_D)
        w_t = tl.load(w_ptr + cs[None, :] * D + cols[:, None], mask=(cols < D)[:, None] & (cs < DS)[None, :],
                      other=0.0)  # (W * ln_w)[:, cols]^T
        acc += mm(tl.where(xm, (x - mean[:, None]) * rstd[:, None], 0.0), w_t, CDT)
    acc += tl.load(c_ptr + cs, mask=cs < DS, other=0.0)[None, :]
    tl.store(k_ptr + rows[:, None] * DS + cs[None, :], acc.to(k_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cs < DS)[None, :])


class LNDownFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, ln_w, ln_b, w_down):
        D, DS = tokens.shape[-1], w_down.shape[0]
        T = tokens.numel() // D
        w_folded = (w_down.float() * ln_w.float()).to(tokens.dtype).contiguous()
        bias = (w_down.float() @ ln_b.float()).contiguous()
        keys = torch.empty(*tokens.shape[:-1], DS, device=tokens.device, dtype=tokens.dtype)
        block_t = 32
        _ln_down_fwd[(triton.cdiv(T, block_t),)](tokens, w_folded, bias, keys, T, D, DS, LN_EPS, BLOCK_T=block_t,
                                                 BLOCK_D=min(64, pow2(D)), BLOCK_S=pow2(DS),
                                                 CDT=compute_dtype(tokens.dtype), num_warps=8)
        ctx.save_for_backward(tokens, ln_w, ln_b, w_down)
        return keys

    @staticmethod
    def backward(ctx, grad_keys):
        inputs = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, ctx.needs_input_grad)]
            keys = down_project(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(keys, wanted, grad_keys))
        return tuple(next(grads) if t.requires_grad else None for t in leaves)


def ln_down_triton(tokens, ln_w, ln_b, w_down) -> torch.Tensor:
    """down_project(tokens, ln_w, ln_b, w_down) with a fused forward; tokens [..., D] contiguous."""
    return LNDownFunction.apply(tokens, ln_w, ln_b, w_down)
