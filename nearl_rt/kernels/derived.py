"""Tensors derived from weights (casts, folds, concatenations), computed once per weight version.

The USEformer's weights are shared by all layers and the OCA weights change only when trained, yet the
fused ops need them cast to the activation dtype or folded (LayerNorm affine into the down-projection).
`derived(name, fn, *sources)` returns fn(*sources), recomputed only when a source changes: one entry per
name and source identity remembers each source's storage address, in-place version counter, dtype and
shape (the way the model's class-text cache keys on parameter versions); a new version replaces the
entry, and an entry dies with its sources (weak references).

Autograd: while gradients are recorded and a source requires grad, fn runs every call (a cached result
would tie the graph of one forward to the next); inference and frozen tensors use the cache. Under
torch.export / torch.compile (the ONNX export traces the model) fn is traced into the graph, uncached.
"""
from __future__ import annotations

import weakref

import torch

_CACHE: dict = {}


def _state(t: torch.Tensor):
    return t.data_ptr(), t._version, t.dtype, t.device, t.shape


def derived(name, fn, *sources: torch.Tensor):
    """fn(*sources), cached on `name` (any hashable) and the sources' versions (see the module docstring)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
        return fn(*sources)  # tracing (torch.export / compile): fake tensors have no storage to key on
    key = (name, torch.is_inference_mode_enabled(), *map(id, sources))
    state = tuple(map(_state, sources))
    hit = _CACHE.get(key)
    if hit is not None and hit[1] == state and all(r() is t for r, t in zip(hit[0], sources)):
        return hit[2]
    value = fn(*sources)
    drop = lambda _ref, key=key: _CACHE.pop(key, None)  # noqa: E731
    _CACHE[key] = (tuple(weakref.ref(t, drop) for t in sources), state, value)
    return value


def cache_size() -> int:
    """Number of live cached entries (for tests)."""
    return len(_CACHE)
