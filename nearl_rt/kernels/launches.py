"""What a forward launches: the fused ops' Triton launches (recorded, optionally not run) and the aten ops
that would be CUDA kernels. Used by the resource table (nearl_rt/kernels/resources.py: it compiles exactly the
launches the wrappers make) and by the launch-budget test (tests/test_kernels_launches.py).

    with recorded_launches(run=False) as launches:      # Triton kernels are recorded, not run
        with counted_kernels() as counts:                # aten ops that would be GPU kernels
            model.classify(images)
    len(launches) + sum(counts.values())
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import importlib
from dataclasses import dataclass

from torch.utils._python_dispatch import TorchDispatchMode

# every Triton kernel the wrappers launch, by module (the @triton.jit helpers they call are not launched)
LAUNCHED = {
    "nearl_rt.kernels.oca_triton": ("_oca_fwd", "_oca_bwd_rows", "_oca_bwd_weights"),
    "nearl_rt.kernels.ln_down_triton": ("_ln_down_fwd",),
    "nearl_rt.kernels.use_attention_triton": ("_use_fwd", "_use_combine", "_use_bwd"),
}

_PLANNING = contextvars.ContextVar("nearl_kernels_planning", default=False)

# aten ops that launch no GPU kernel: allocation, metadata, host scalars (views are recognised by schema)
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
              "_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
              "set_", "resize_", "_unsafe_view", "alias"}


@dataclass(frozen=True)
class Launch:
    kernel: object          # the @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


class _Recorder:
    def __init__(self, kernel, log: list, run: bool):
        self.kernel, self.log, self.run = kernel, log, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.kernel, tuple(grid), args, kwargs))
            if self.run:
                self.kernel[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def recorded_launches(*, run: bool):
    """Record every Triton launch of the fused ops; with run=False the kernels are not run (outputs stay
    uninitialised) and the ops accept "meta" tensors, so a launch plan for any shape costs no memory."""
    log: list[Launch] = []
    saved = []
    token = _PLANNING.set(not run)
    try:
        for module_name, names in LAUNCHED.items():
            module = importlib.import_module(module_name)
            for name in names:
                kernel = getattr(module, name)
                saved.append((module, name, kernel))
                setattr(module, name, _Recorder(kernel, log, run))
        yield log
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
        _PLANNING.reset(token)


def planning() -> bool:
    """True inside recorded_launches(run=False): the fused ops then also take "meta" tensors."""
    return _PLANNING.get()


class counted_kernels(TorchDispatchMode):
    """Counts, by name, the aten ops run inside it that would each launch a GPU kernel (views and
    allocations excluded). A context manager whose value is the Counter."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __enter__(self):
        super().__enter__()
        return self.counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _NO_KERNEL):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))
