"""Helpers shared by the fused Triton ops: dtype mapping, block sizes, SM count, the matmul precision rule,
reductions."""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

_COMPUTE_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def _backport_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar kernel argument into a Python int (a loop bound:
    `range(0, D, BLOCK_D)`, `tl.range(...)`) by int() of a 1-element array, which NumPy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"): every kernel with a loop over a
    runtime bound failed in the interpreter. Triton 3.7 fixed it (triton-lang/triton#9171: squeeze first);
    this applies the same one-line fix to 3.6's interpreter. Compiled kernels never take this path."""
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if triton_version() < (3, 7):
    _backport_interpreter_index()


def compute_dtype(dtype: torch.dtype):
    """The Triton dtype the fused ops feed to tl.dot for activations of `dtype` (fp32 accumulation)."""
    return _COMPUTE_DTYPES[dtype]


def pow2(n: int, lo: int = 16) -> int:
    """Block size for a dimension of n: a power of two, at least `lo` (tl.dot needs 16). Plain integer
    math: triton.next_power_of_2 is a ConstexprFunction that costs microseconds per host call."""
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def no_autocast(device: torch.device):
    """Autocast off for fp32 folds (a no-op context for "meta" tensors, which autocast does not know)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


# SMs the launch plans assume off-GPU: the interpreter (small, so tests exercise split paths) and
# nearl_rt/kernels/resources.py, which plans for the target architecture's SM count (set_planned_sms)
_PLANNED_SMS = [4]


def set_planned_sms(sms: int) -> None:
    _PLANNED_SMS[0] = int(sms)


def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (cached: the lookup runs for every launch plan), else the planned count."""
    if device.type != "cuda":
        return _PLANNED_SMS[0]
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


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
    for d0 in tl.range(0, D, BLOCK_D, num_stages=3):  # pipelined: cp.async keeps 3 chunks in flight
        x, offs, xm, cols = row_tile(x_ptr, rows, rmask, d0, D, BLOCK_D)
        n_c = tl.minimum(D - d0, BLOCK_D).to(tl.float32)
        n_a = d0 * 1.0
        mean_c = rsum(x, 1) / n_c
        xc = tl.where(xm, x - mean_c[:, None], 0.0)
        delta = mean_c - mean
        mean += delta * (n_c / (n_a + n_c))
        m2 += rsum(xc * xc, 1) + delta * delta * (n_a * n_c / (n_a + n_c))
    return mean, 1.0 / tl.sqrt(m2 / D + ln_eps)
