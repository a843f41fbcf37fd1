"""Helpers shared by the fused Triton ops: dtype mapping, block sizes, the matmul precision rule, reductions."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_COMPUTE_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def compute_dtype(dtype: torch.dtype):
    """The Triton dtype the fused ops feed to tl.dot for activations of `dtype` (fp32 accumulation)."""
    return _COMPUTE_DTYPES[dtype]


def pow2(n: int, lo: int = 16) -> int:
    """Block size for a dimension of n: a power of two, at least `lo` (tl.dot needs 16)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def mm(a, b, CDT: tl.constexpr):
    """a @ b with operands rounded to CDT (the activation dtype) and fp32 accumulation; fp32 stays IEEE."""
    return tl.dot(a.to(CDT), b.to(CDT), input_precision="ieee")


# tl.sum, tl.max, tl.zeros and tl.cdiv are @triton.jit functions of triton.language itself. When triton was
# imported before TRITON_INTERPRET=1 was set (e.g. a script that imports open_clip -> torch._dynamo ->
# triton first; pytest once did so through a filterwarnings class), they stay compile-only and the
# interpreter refuses to call them. The kernels therefore use tl.full and these two reductions: tl.reduce
# with triton's own combine functions is the same reduction and works whatever the import order.
@triton.jit
def rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def row_tile(ptr, rows, rmask, d0, D, BLOCK_D: tl.constexpr):
    """Columns [d0, d0 + BLOCK_D) of `rows` of the sequence at `ptr`, as fp32, zero outside; offsets, mask."""
    cols = d0 + tl.arange(0, BLOCK_D)
    m2 = rmask[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    return tl.load(ptr + offs, mask=m2, other=0.0).to(tl.float32), offs, m2, cols


@triton.jit
def ln_stats(x_ptr, rows, rmask, D, ln_eps, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-row mean and 1/std over D in chunks (Chan's pairwise update: no E[x^2] - E[x]^2 cancellation)."""
    mean = tl.full((BLOCK_T,), 0.0, dtype=tl.float32)
    m2 = tl.full((BLOCK_T,), 0.0, dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, offs, xm, cols = row_tile(x_ptr, rows, rmask, d0, D, BLOCK_D)
        n_c = tl.minimum(D - d0, BLOCK_D).to(tl.float32)
        n_a = d0 * 1.0
        mean_c = rsum(x, 1) / n_c
        xc = tl.where(xm, x - mean_c[:, None], 0.0)
        delta = mean_c - mean
        mean += delta * (n_c / (n_a + n_c))
        m2 += rsum(xc * xc, 1) + delta * delta * (n_a * n_c / (n_a + n_c))
    return mean, 1.0 / tl.sqrt(m2 / D + ln_eps)
