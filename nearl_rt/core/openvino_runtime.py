"""An exported classifier on OpenVINO's CPU plugin (NearlSession(path, runtime="openvino")).

OpenVINO reads the .onnx file itself (no conversion step); the plain export and the fused one (its onnxruntime
contrib ops included) run. One compiled model per session, one infer request per calling thread (a request
holds its input and output buffers and is reused call after call; requests are not thread-safe, so each thread
gets its own). Inference precision:
- "f32" (default): float32 throughout; the logits equal onnxruntime's to float32 rounding (tests/test_openvino.py).
- "bf16": OpenVINO's bfloat16 inference (native on CPUs with AVX512-BF16 or AMX, emulated and slow elsewhere);
  a reduced precision like int8, so only for a file whose metadata records that it passed the int8 gates under
  it (nearl.runtime_precisions, written by `python -m export.onnx ... --openvino-bf16`).
An int8 file runs in f32 inference precision with its quantised ops as OpenVINO maps them: its own int8 kernels for
a static (QDQ) file; a dynamic int8 file (DynamicQuantizeLinear / MatMulInteger, QAttention) is slow or unreadable.
"""
from __future__ import annotations

import threading
from typing import Optional

import numpy as np

PRECISIONS = {"f32": "f32", "bf16": "bf16"}  # NearlSession precision -> OpenVINO INFERENCE_PRECISION_HINT


def openvino_version() -> Optional[str]:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


class OpenVinoRunner:
    """path -> (logits, probs) on OpenVINO's CPU plugin; `fixed_batch` as the file's input declares it."""

    def __init__(self, path: str, precision: str, threads: int):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} for OpenVINO: use one of {sorted(PRECISIONS)}")
        try:
            import openvino as ov
        except ImportError:
            raise ValueError("runtime='openvino' needs the openvino package: pip install 'nearl-rt[openvino]'") from None
        core = ov.Core()
        try:
            model = core.read_model(path)
            self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": PRECISIONS[precision],
                                                              "PERFORMANCE_HINT": "LATENCY",
                                                              "INFERENCE_NUM_THREADS": int(threads)})
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise ValueError(f"OpenVINO cannot load {path}: {lines[-1] if lines else type(e).__name__}") from None
        batch = model.input("images").get_partial_shape()[0]
        self.fixed_batch: Optional[int] = batch.get_length() if batch.is_static else None
        self.outputs = (self.compiled.output("logits"), self.compiled.output("probs"))
        self._local = threading.local()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({"images": batch}, share_inputs=True)
        # the request's output buffers are reused by its next call: hand out copies
        return np.array(result[self.outputs[0]]), np.array(result[self.outputs[1]])
