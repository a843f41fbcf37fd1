"""The backends `bench/latency.py` compares: each a small class with `available(ctx) -> (ok, reason)`.

A backend is set up once per interaction mode (`setup`), then `runner(batch_size)` returns the callable
that is timed: images (float32 on the run's device) -> logits. Every backend gets the same inputs.
Both are called under torch.no_grad() (inference tensors would break the class-text cache).

Each NEARL backend names its `baseline`: the frozen CLIP run the same way (eager, CUDA graphs,
onnxruntime on the CPU or CUDA), so that `xCLIP` compares runtime with runtime.

Adding a runtime is two classes and one line of BACKENDS: the NEARL backend (its `baseline` names the
twin) and its frozen-CLIP twin; an onnxruntime one on a new kind of file also adds its ONNX_PRECISIONS
entry, e.g. an int8 file quantised from the fp32 one (docs/gpu-suite.md#adding-a-backend-to-benchlatencypy).
"""
from __future__ import annotations

import copy
import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from nearl_rt import kernels
from nearl_rt.bench.frozen_clip import FrozenClip as FrozenClipModule
from nearl_rt.bench.frozen_clip import export_frozen_clip
from nearl_rt.core.atomic import atomic_output
from nearl_rt.cuda_graph import GraphedForward
from nearl_rt.model import NearlCLIP

Runner = Callable[[torch.Tensor], object]
ROOT = Path(__file__).resolve().parents[1]
# the code an exported file depends on: a change to any of these makes the cached exports stale
EXPORT_SOURCES = ("nearl_rt/export/onnx.py", "nearl_rt/export/graph.py", "nearl_rt/export/quantize.py", "nearl_rt/bench/frozen_clip.py",
                  "nearl_rt/model.py", "nearl_rt/adapters.py", "nearl_rt/kernels/oca.py", "nearl_rt/kernels/use_attention.py")


@dataclass
class BenchContext:
    """What every backend of one interaction mode shares."""

    master: NearlCLIP              # float32 on the CPU, classes set: each backend copies it
    device: torch.device
    dtype: torch.dtype             # of the PyTorch backends (ONNX backends carry their own precision)
    workdir: Path                  # ONNX files when not cached, TensorRT engines
    quick: bool = False
    explicit: frozenset = frozenset()  # backends named on the command line
    checkpoint_sha256: Optional[str] = None
    cache_dir: Optional[Path] = None   # ONNX exports kept across runs (None: exported into workdir)
    _onnx: dict = field(default_factory=dict)
    _keys: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.master.interaction

    def model_copy(self, backend: str) -> NearlCLIP:
        model = copy.deepcopy(self.master).to(self.device, self.dtype)
        model.backend = backend
        return model

    def _onnx_path(self, kind: str, precision: str) -> Path:
        """Where the `kind` ("nearl" or "frozen_clip") export lives; cached files are named by what they contain."""
        if self.cache_dir is None:
            return self.workdir / f"{kind}-{self.mode}-{precision}.onnx"
        if kind not in self._keys:
            self._keys[kind] = _content_key(self.master, kind)
        return self.cache_dir / f"{kind}-{'' if kind == 'frozen_clip' else self.mode + '-'}{precision}-" \
                                f"{self._keys[kind]}.onnx"

    def onnx_cached(self, kind: str, precision: str) -> bool:
        return self.cache_dir is not None and self._onnx_path(kind, precision).is_file()

    def onnx_file(self, kind: str, precision: str) -> Path:
        """The master (kind "nearl") or its frozen CLIP as ONNX in `precision` (a key of ONNX_PRECISIONS),
        written once and cached."""
        if (kind, precision) not in self._onnx:
            path = self._onnx_path(kind, precision)
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                ONNX_PRECISIONS[precision](self, kind, path)
            self._onnx[(kind, precision)] = path
        return self._onnx[(kind, precision)]


def _export(ctx: BenchContext, kind: str, path: Path, *, fp16: bool) -> None:
    """The NEARL file as `export.onnx` writes it, or its frozen CLIP written the same way."""
    if kind == "frozen_clip":
        export_frozen_clip(ctx.master, path, fp16=fp16)
    else:
        from nearl_rt.export.onnx import export_model
        export_model(ctx.master, path, fp16=fp16, batch_size="dynamic", verify=False,
                     checkpoint_sha256=ctx.checkpoint_sha256)


# How each ONNX precision is written (ctx, kind, path): one entry per precision, shared by a NEARL backend
# and its frozen-CLIP twin. A precision derived from another reads it with ctx.onnx_file(kind, "fp32").
def _quantize(ctx: BenchContext, kind: str, path: Path) -> None:
    """The fp32 file in dynamic int8, as `export.onnx --int8` quantises it (nearl_rt.export.quantize.quantize_graph:
    the same nodes for NEARL and its frozen CLIP; the export's verification is nearl_rt.export.quantize's test)."""
    from nearl_rt.export.quantize import quantize_graph
    with atomic_output(path) as tmp:
        quantize_graph(ctx.onnx_file(kind, "fp32"), tmp)


ONNX_PRECISIONS: dict[str, Callable[[BenchContext, str, Path], None]] = {
    "fp32": lambda ctx, kind, path: _export(ctx, kind, path, fp16=False),
    "fp16": lambda ctx, kind, path: _export(ctx, kind, path, fp16=True),
    "int8": _quantize,
}


def _content_key(model: NearlCLIP, kind: str) -> str:
    """sha256 (16 hex digits) of everything an export depends on: weights, classes, mode, code and versions."""
    import onnx
    h = hashlib.sha256()
    module = model.backbone if kind == "frozen_clip" else model
    h.update(repr((kind, torch.__version__, onnx.__version__, model.class_names, model.template,
                   None if kind == "frozen_clip" else model.interaction)).encode())
    for rel in EXPORT_SOURCES:
        path = ROOT / rel
        h.update(path.read_bytes() if path.is_file() else b"")
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    h.update(model.class_tokens.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Backend:
    name = ""
    description = ""
    precision: Optional[str] = None  # None: the run's --dtype
    compares_to_eager = True         # its logits should equal the fp32 eager reference
    torch_allocated = True           # its working memory comes and goes with torch's (peak is measurable)
    baseline: Optional[str] = None   # the frozen-CLIP backend of the same runtime (None: it is one)

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
    description = "open_clip without adapters (image tower; class text features computed once): the eager floor"
    compares_to_eager = False

    def setup(self, ctx):
        super().setup(ctx)
        self.model = FrozenClipModule(ctx.model_copy("torch"))

    def runner(self, batch_size):
        return self.model


class FrozenClipGraphs(FrozenClip):
    name = "frozen_clip_graphs"
    description = "frozen CLIP captured in one CUDA graph per batch size (nearl_rt.cuda_graph): the graphs' floor"

    def available(self, ctx):
        return _needs_cuda(ctx)

    def runner(self, batch_size):
        model = self.model.model
        return GraphedForward(self.model, (3, *_image_size(model)), (batch_size,), self.ctx.device,
                              state=tuple, what="frozen CLIP")


class Eager(Backend):
    name = "eager"
    description = "NEARL reference ops in PyTorch (backend='torch')"
    kernel_backend = "torch"
    baseline = "frozen_clip"

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
        if self.name in ctx.explicit:
            return True, ""
        if ctx.quick:
            return False, "skipped by --quick (compiling takes minutes on a CPU); name it in --backends to time it"
        if ctx.device.type == "cpu":
            return False, "skipped on a CPU unless asked (compiling takes minutes): name it in --backends"
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
    description = "NEARL (backend='auto') as model.cuda_graph(): one CUDA graph per batch size, input copied in"
    kernel_backend = "auto"
    baseline = "frozen_clip_graphs"

    def available(self, ctx):
        return _needs_cuda(ctx)

    def runner(self, batch_size):
        return self.model.cuda_graph(batch_sizes=(batch_size,))


class _Ort(Backend):
    """onnxruntime on the ONNX file that export.onnx.export_model (or nearl_rt.bench.frozen_clip) writes from the master."""

    provider = ""
    onnx_precision = "fp32"  # a key of ONNX_PRECISIONS
    io_binding = False
    onnx_kind = "nearl"
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
            import nearl_rt.export.onnx  # noqa: F401
        except ImportError as e:
            if isinstance(e, ModuleNotFoundError) and e.name in ("nearl_rt.export.onnx", "export"):
                return False, "export.onnx not available"
            return False, f"export.onnx cannot be imported: {e}"
        if not (ctx.quick or self.name in ctx.explicit or ctx.onnx_cached(self.onnx_kind, self.onnx_precision)):
            return False, ("its ONNX export is not cached and takes minutes on a CPU: name it in --backends to "
                           "export it once" + (f" (kept in {ctx.cache_dir})" if ctx.cache_dir else ""))
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
        path = ctx.onnx_file(self.onnx_kind, self.onnx_precision)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
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
    baseline = "frozen_clip_ort_cpu"

    def available(self, ctx):
        if ctx.device.type != "cpu":
            return False, "runs with --device cpu (this run's device is a GPU)"
        return super().available(ctx)


class OrtCpuInt8(OrtCpu):
    name = "ort_cpu_int8"
    description = "onnxruntime CPUExecutionProvider, dynamic int8 ONNX (export.onnx --int8)"
    precision = "int8"
    onnx_precision = "int8"
    baseline = "frozen_clip_ort_cpu_int8"


class OrtCudaFp32(_Ort):
    name = "ort_cuda_fp32"
    description = "onnxruntime CUDAExecutionProvider, fp32 ONNX, IO binding on device tensors"
    provider = "CUDAExecutionProvider"
    precision = "float32"
    io_binding = True
    baseline = "frozen_clip_ort_cuda_fp32"


class OrtCudaFp16(OrtCudaFp32):
    name = "ort_cuda_fp16"
    description = "onnxruntime CUDAExecutionProvider, fp16 ONNX (float32 inputs/outputs), IO binding"
    precision = "float16"
    onnx_precision = "fp16"
    baseline = "frozen_clip_ort_cuda"


class OrtTensorRT(OrtCudaFp32):
    name = "ort_tensorrt"
    description = "onnxruntime TensorrtExecutionProvider (fp16 engines when --dtype float16), IO binding"
    provider = "TensorrtExecutionProvider"
    precision = None
    baseline = "frozen_clip_ort_cuda"

    def provider_options(self):
        engines = Path(tempfile.mkdtemp(prefix="trt-", dir=self.ctx.workdir))
        return {**super().provider_options(), "trt_fp16_enable": self.ctx.dtype == torch.float16,
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines)}


class _FrozenOrt:
    """The frozen-CLIP twin of an onnxruntime backend: the same session settings on nearl_rt.bench.frozen_clip's export."""

    onnx_kind = "frozen_clip"
    compares_to_eager = False
    baseline = None


class FrozenClipOrtCpu(_FrozenOrt, OrtCpu):
    name = "frozen_clip_ort_cpu"
    description = "frozen CLIP exported the same way, onnxruntime CPU, fp32: the ort_cpu floor"


class FrozenClipOrtCpuInt8(_FrozenOrt, OrtCpuInt8):
    name = "frozen_clip_ort_cpu_int8"
    description = "frozen CLIP exported the same way, quantised the same way (dynamic int8): the ort_cpu_int8 floor"


class FrozenClipOrtCudaFp32(_FrozenOrt, OrtCudaFp32):
    name = "frozen_clip_ort_cuda_fp32"
    description = "frozen CLIP exported the same way, onnxruntime CUDA, fp32: the ort_cuda_fp32 floor"


class FrozenClipOrtCuda(_FrozenOrt, OrtCudaFp16):
    name = "frozen_clip_ort_cuda"
    description = "frozen CLIP exported the same way, onnxruntime CUDA, fp16: the ort_cuda_fp16/ort_tensorrt floor"


def _image_size(model: NearlCLIP) -> tuple[int, int]:
    size = model.preprocess_cfg["size"]
    return (size, size) if isinstance(size, int) else tuple(size)


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (
    FrozenClip, Eager, Triton, TorchCompile, FrozenClipGraphs, CudaGraphs, FrozenClipOrtCpu, OrtCpu,
    FrozenClipOrtCpuInt8, OrtCpuInt8, FrozenClipOrtCudaFp32, OrtCudaFp32, FrozenClipOrtCuda, OrtCudaFp16,
    OrtTensorRT)}
