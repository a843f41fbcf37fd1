"""The backends `bench/latency.py` compares: each a small class with `available(ctx) -> (ok, reason)`.

A backend is set up once per interaction mode (`setup`), then `runner(batch_size)` returns the callable
that is timed: images (float32 on the run's device) -> logits. Every backend gets the same inputs.
Both are called under torch.no_grad() (inference tensors would break the class-text cache).
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import kernels
from nearl_rt.model import NearlCLIP

Runner = Callable[[torch.Tensor], object]


@dataclass
class BenchContext:
    """What every backend of one interaction mode shares."""

    master: NearlCLIP              # float32 on the CPU, classes set: each backend copies it
    device: torch.device
    dtype: torch.dtype             # of the PyTorch backends (ONNX backends carry their own precision)
    workdir: Path                  # ONNX files and TensorRT engines
    quick: bool = False
    explicit: frozenset = frozenset()  # backends named on the command line
    checkpoint_sha256: Optional[str] = None
    _onnx: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.master.interaction

    def model_copy(self, backend: str) -> NearlCLIP:
        model = copy.deepcopy(self.master).to(self.device, self.dtype)
        model.backend = backend
        return model

    def onnx_file(self, fp16: bool) -> Path:
        """The master exported once per precision (`export.onnx.export_model`), shared by the ORT backends."""
        if fp16 not in self._onnx:
            from export.onnx import export_model
            path = self.workdir / f"nearl-{self.mode}-{'fp16' if fp16 else 'fp32'}.onnx"
            self._onnx[fp16] = export_model(self.master, path, fp16=fp16, batch_size="dynamic", verify=False,
                                            checkpoint_sha256=self.checkpoint_sha256)
        return self._onnx[fp16]


class Backend:
    name = ""
    description = ""
    precision: Optional[str] = None  # None: the run's --dtype
    compares_to_eager = True         # its logits should equal the fp32 eager reference
    torch_allocated = True           # its working memory comes and goes with torch's (peak is measurable)

    def available(self, ctx: BenchContext) -> tuple[bool, str]:
        return True, ""

    def setup(self, ctx: BenchContext) -> None:
        self.ctx = ctx

    def runner(self, batch_size: int) -> Runner:
        raise NotImplementedError


def _needs_cuda(ctx: BenchContext) -> tuple[bool, str]:
    if ctx.device.type != "cuda":
        return False, "needs CUDA (run with --device cuda on a GPU machine)"
    return True, ""


class FrozenClip(Backend):
    name = "frozen_clip"
    description = "open_clip without adapters (image tower; class text features computed once): the floor"
    compares_to_eager = False

    def setup(self, ctx):
        super().setup(ctx)
        self.model = ctx.model_copy("torch")
        self.text = F.normalize(self.model.backbone.encode_text(self.model.class_tokens), dim=-1)

    def runner(self, batch_size):
        bb, model = self.model.backbone, self.model
        return lambda images: model._logits(F.normalize(bb.encode_image(images.to(model.dtype)), dim=-1), self.text)


class Eager(Backend):
    name = "eager"
    description = "NEARL reference ops in PyTorch (backend='torch')"
    kernel_backend = "torch"

    def setup(self, ctx):
        super().setup(ctx)
        self.model = ctx.model_copy(self.kernel_backend)

    def runner(self, batch_size):
        return self.model.classify


class Triton(Eager):
    name = "triton"
    description = "NEARL with the fused Triton kernels (backend='triton')"
    kernel_backend = "triton"

    def available(self, ctx):
        ok, reason = _needs_cuda(ctx)
        if not ok:
            return ok, reason
        try:
            kernels.resolve_backend("triton", ctx.device)
        except (NotImplementedError, RuntimeError, ValueError) as e:
            return False, str(e)
        return True, ""


class TorchCompile(Eager):
    name = "torch_compile"
    description = "torch.compile of the reference model's classify (inductor, one graph per batch size)"

    def available(self, ctx):
        if ctx.quick and self.name not in ctx.explicit:
            return False, "skipped by --quick (compiling takes minutes on a CPU); name it in --backends to time it"
        return True, ""

    def setup(self, ctx):
        super().setup(ctx)
        # Trim and cache the class prompts eagerly: trimming reads the EOT positions back to the host,
        # which would otherwise split the compiled graph.
        self.model.classify(torch.zeros(1, 3, *_image_size(self.model), device=ctx.device))
        self.compiled = torch.compile(self.model.classify, dynamic=False)

    def runner(self, batch_size):
        return self.compiled


class CudaGraphs(Eager):
    name = "cuda_graphs"
    description = "NEARL (backend='auto') captured in one CUDA graph per batch size; replay copies the input in"
    kernel_backend = "auto"

    def available(self, ctx):
        return _needs_cuda(ctx)

    def runner(self, batch_size):
        model = self.model
        static = torch.zeros(batch_size, 3, *_image_size(model), device=self.ctx.device)
        side = torch.cuda.Stream(self.ctx.device)
        side.wait_stream(torch.cuda.current_stream(self.ctx.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # allocator warm-up and the text_cacheable class cache, outside the capture
                model.classify(static)
        torch.cuda.current_stream(self.ctx.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model.classify(static)

        def run(images):
            static.copy_(images)
            graph.replay()
            return out
        self.graph = graph  # keep the graph (and its memory pool) alive while the runner is in use
        return run


class _Ort(Backend):
    """onnxruntime on the ONNX file that export.onnx.export_model writes from the same model."""

    provider = ""
    fp16 = False
    io_binding = False
    # onnxruntime's arenas keep their memory across calls: invisible to torch.cuda.max_memory_allocated,
    # and no RSS growth during the timed calls on the CPU
    torch_allocated = False

    def available(self, ctx):
        if self.provider != "CPUExecutionProvider":
            ok, reason = _needs_cuda(ctx)
            if not ok:
                return ok, reason
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime not installed (pip install 'nearl-rt[cpu]', or '[gpu]' on a GPU machine)"
        if self.provider not in ort.get_available_providers():
            return False, (f"onnxruntime {ort.__version__} has no {self.provider} (available: "
                           f"{', '.join(ort.get_available_providers())})")
        try:
            import export.onnx  # noqa: F401
        except ImportError as e:
            if isinstance(e, ModuleNotFoundError) and e.name in ("export.onnx", "export"):
                return False, "export.onnx not available"
            return False, f"export.onnx cannot be imported: {e}"
        return True, ""

    def provider_options(self) -> dict:
        return {} if self.provider == "CPUExecutionProvider" else {"device_id": self.ctx.device.index or 0}

    def setup(self, ctx):
        super().setup(ctx)
        import onnxruntime as ort
        providers = [(self.provider, self.provider_options())]
        providers += [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                      if p != self.provider and p in ort.get_available_providers()]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(ctx.onnx_file(self.fp16)), options, providers=providers)
        if self.session.get_providers()[0] != self.provider:
            raise RuntimeError(f"onnxruntime fell back to {self.session.get_providers()[0]} instead of {self.provider}")
        self.input = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = "logits" if "logits" in outputs else outputs[0]

    def runner(self, batch_size):
        if not self.io_binding:
            return lambda images: self.session.run([self.output], {self.input: images.cpu().numpy()})[0]
        import numpy as np
        device_id = self.ctx.device.index or 0
        logits = torch.empty(batch_size, len(self.ctx.master.class_names), dtype=torch.float32, device=self.ctx.device)
        binding = self.session.io_binding()
        binding.bind_output(self.output, "cuda", device_id, np.float32, tuple(logits.shape), logits.data_ptr())

        def run(images):
            binding.bind_input(self.input, "cuda", device_id, np.float32, tuple(images.shape), images.data_ptr())
            self.session.run_with_iobinding(binding)
            return logits
        return run


class OrtCpu(_Ort):
    name = "ort_cpu"
    description = "onnxruntime CPUExecutionProvider, fp32 ONNX"
    provider = "CPUExecutionProvider"
    precision = "float32"

    def available(self, ctx):
        if ctx.device.type != "cpu":
            return False, "runs with --device cpu (this run's device is a GPU)"
        return super().available(ctx)


class OrtCudaFp32(_Ort):
    name = "ort_cuda_fp32"
    description = "onnxruntime CUDAExecutionProvider, fp32 ONNX, IO binding on device tensors"
    provider = "CUDAExecutionProvider"
    precision = "float32"
    io_binding = True


class OrtCudaFp16(OrtCudaFp32):
    name = "ort_cuda_fp16"
    description = "onnxruntime CUDAExecutionProvider, fp16 ONNX (float32 inputs/outputs), IO binding"
    precision = "float16"
    fp16 = True


class OrtTensorRT(OrtCudaFp32):
    name = "ort_tensorrt"
    description = "onnxruntime TensorrtExecutionProvider (fp16 engines when --dtype float16), IO binding"
    provider = "TensorrtExecutionProvider"
    precision = None

    def provider_options(self):
        engines = Path(tempfile.mkdtemp(prefix="trt-", dir=self.ctx.workdir))
        return {**super().provider_options(), "trt_fp16_enable": self.ctx.dtype == torch.float16,
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines)}


def _image_size(model: NearlCLIP) -> tuple[int, int]:
    size = model.preprocess_cfg["size"]
    return (size, size) if isinstance(size, int) else tuple(size)


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (FrozenClip, Eager, Triton, TorchCompile, CudaGraphs, OrtCpu,
                                                          OrtCudaFp32, OrtCudaFp16, OrtTensorRT)}
