"""A forward captured in CUDA graphs, one per batch size: `model.cuda_graph(batch_sizes=(1, 8, 64))`.

Replaying a graph launches every kernel of the forward with one host call, so small batches are no
longer bound by Python and launch overhead. A call with B images replays the graph of the smallest
captured size >= B: the images are copied into that graph's static input (rows past B keep earlier
inputs; rows are independent) and the first B rows of its output are returned as a new tensor.

The graphs read the weights and class text where they lay at capture. Anything that changes them
(new adapter weights, `set_classes`, `.to(dtype or device)`, another `backend`) makes the callable
refuse to run, with the fix (capture again), instead of returning stale logits.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

WARMUP_CALLS = 3  # compile every Triton specialisation and fill the class-text cache before capture


class GraphStateError(RuntimeError):
    """The model changed after capture: its graphs would compute with the old weights or classes."""


def model_state(model) -> tuple:
    """What the captured graphs depend on: every parameter's storage and version, the class prompts, the backend."""
    return (model.backend, model.class_tokens.data_ptr(), tuple(model.class_tokens.shape),
            tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters()))


def batch_sizes_arg(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique batch sizes, or ValueError naming what is wrong."""
    if isinstance(batch_sizes, int) or not batch_sizes:
        raise ValueError(f"batch_sizes must be a non-empty sequence of ints, e.g. (1, 8, 64); got {batch_sizes!r}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be ints >= 1, got {tuple(batch_sizes)}")
    return tuple(sorted(set(batch_sizes)))


def padded_size(images, device: torch.device, item_shape: tuple, batch_sizes: tuple[int, ...]) -> int:
    """The captured batch size that serves `images`, or ValueError naming the problem and the fix."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor [B, {', '.join(map(str, item_shape))}], "
                         f"got {type(images).__name__}")
    if images.device != device:
        raise ValueError(f"images are on {images.device} but the graphs were captured on {device}; "
                         f"move them first: images.to('{device}')")
    if images.dim() != len(item_shape) + 1 or tuple(images.shape[1:]) != item_shape:
        raise ValueError(f"images have shape {tuple(images.shape)}; the graphs were captured for "
                         f"[B, {', '.join(map(str, item_shape))}]: resize the input, or capture again for this shape")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point (normalised pixels), got {images.dtype}")
    b = images.shape[0]
    for size in batch_sizes:
        if size >= b:
            return size
    raise ValueError(f"batch of {b} images is larger than the largest captured batch size ({batch_sizes[-1]}); "
                     f"split it, or capture with batch_sizes=(..., {b})")


class GraphedForward:
    """`fn(images)` captured once per batch size; call it like fn. Build it with `capture` or model.cuda_graph."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], item_shape: Sequence[int],
                 batch_sizes: Sequence[int], device: torch.device, state: Callable[[], tuple], what: str):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, this one is on {device}: "
                             f"model.to('cuda') first (on a CPU use the model itself)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.batch_sizes = batch_sizes_arg(batch_sizes)
        self.item_shape, self.device, self._state, self._what = tuple(item_shape), device, state, what
        self._captured_state = state()
        self._graphs = {}
        with torch.no_grad():
            for b in self.batch_sizes:  # each graph has its own memory pool: replays never share buffers
                self._graphs[b] = self._capture(fn, b)

    def _capture(self, fn, b: int):
        static = torch.randn(b, *self.item_shape, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):  # outside the capture: JIT compiles, allocator, cached text
                fn(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = fn(static)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"capturing {self._what} in a CUDA graph failed at batch size {b}: {first}") from e
        return graph, static, out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size = padded_size(images, self.device, self.item_shape, self.batch_sizes)
        if self._state() != self._captured_state:
            raise GraphStateError(f"the model's weights, classes, dtype or backend changed after {self._what} was "
                                  f"captured; capture again (model.cuda_graph(...)) to use the new ones")
        graph, static, out = self._graphs[size]
        b = images.shape[0]
        static[:b].copy_(images)
        graph.replay()
        return out[:b].clone()  # the graph's output buffer is overwritten by the next replay

    def __repr__(self) -> str:
        return f"GraphedForward({self._what}, batch_sizes={self.batch_sizes}, device={self.device})"


def capture_classify(model, batch_sizes: Sequence[int] = (1, 8, 64)) -> GraphedForward:
    """model.classify captured in one CUDA graph per batch size (see the module docstring)."""
    if not model.class_names:
        raise RuntimeError("no classes set: call model.set_classes([...]) before model.cuda_graph()")
    size = model.preprocess_cfg["size"]
    h, w = (size, size) if isinstance(size, int) else size
    was_training = model.training
    model.eval()
    try:
        return GraphedForward(model.classify, (3, h, w), batch_sizes, model.class_tokens.device,
                              lambda: model_state(model), "model.classify")
    finally:
        model.train(was_training)
