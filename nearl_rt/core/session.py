"""Serve an exported NEARL-CLIP with onnxruntime alone (NumPy + Pillow + onnxruntime; no PyTorch).

    session = NearlSession("model.onnx")             # CUDA when available, else CPU
    session.predict(["a.png", "b.dcm", pil_image, uint16_array], top_k=2)
    # -> [[("pneumonia", 0.91), ("normal", 0.09)], ...]
    session.predict(["a.png"], decision=True)         # binary: + the class decided at the stored threshold
    # -> [("pneumonia", [("pneumonia", 0.91), ("normal", 0.09)])]
    session.predict(["a.png"], decision=True)         # multi-label: + the findings at or above their thresholds
    # -> [(["effusion"], [("effusion", 0.83), ("cardiomegaly", 0.31), ...])]

A multi-label model (`session.multi_label`) has findings for classes and per-finding probabilities, each on its
own (sigmoid of positive minus negative prompt logit), and one threshold per finding.

The probabilities are the model's calibrated ones (its graph divides the logits by the temperature it was
calibrated with, `session.temperature`); `logits` stay raw. `session.thresholds` and `session.operating_point`
are the decision thresholds stored with it (nearl_rt.calibration).

Images are decoded and preprocessed exactly as training did (nearl_rt.core.imaging + nearl_rt.core.preprocess, with
the intensity policy, input size, mean, std and interpolation stored in the model's metadata);
`preprocess="onnx"` runs the resize / crop / normalise of the model's preprocessing graph
(`python -m export.onnx CKPT --preprocess`) instead, the graph the C++ library runs (decoding stays
nearl_rt.core.imaging's).

`runtime="openvino"` runs the same file on OpenVINO's CPU plugin instead of onnxruntime (same preprocessing,
outputs and metadata; nearl_rt.core.openvino_runtime); `threads` is the intra-op thread count of either runtime on
the CPU, by default one per physical core (nearl_rt.core.cpu).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import onnxruntime as ort

from nearl_rt.core.cpu import physical_cores
from nearl_rt.core.hashing import sha256_file
from nearl_rt.core.imaging import IntensityPolicy, load_image, resolve_policy
from nearl_rt.core.metadata import (GRAPH_FUSED, PREPROCESS_KIND, classifier_metadata, is_multi_label,
                                    preprocess_graph_path, read_calibration, read_metadata, verified_precision)
from nearl_rt.core.preprocess import ImageLike, image_list, preprocess_batch


RUNTIMES = ("onnxruntime", "openvino")


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build and machine have it, else CPU."""
    available = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
        else ["CPUExecutionProvider"]


class NearlSession:
    """An exported NEARL-CLIP classifier (from `python -m export.onnx`) in an onnxruntime session.

    intensity: how >8-bit images map to 0..255; default (and the right choice) the policy stored in the
    model (models exported before policies were recorded: the default policy); another one warns."""

    def __init__(self, path, providers: Optional[Sequence] = None,
                 session_options: Optional[ort.SessionOptions] = None, intensity: Optional[IntensityPolicy] = None,
                 preprocess: str = "pillow", runtime: str = "onnxruntime", precision: Optional[str] = None,
                 threads: Optional[int] = None):
        """preprocess: "pillow" (nearl_rt.core.preprocess) or "onnx" (the preprocessing graph next to the model,
        run on the CPU provider: its CUDA antialias kernel is unverified, see docs/cpp.md). runtime: "onnxruntime"
        (providers and session_options apply) or "openvino" (its CPU plugin; precision "f32", the default, or
        "bf16" for a file whose metadata records that bf16 passed the int8 gates). threads: intra-op threads on
        the CPU (default: physical cores; a session_options with intra_op_num_threads set keeps its own)."""
        if preprocess not in ("pillow", "onnx"):
            raise ValueError(f"preprocess={preprocess!r}: use 'pillow' or 'onnx'")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r}: use one of {RUNTIMES}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads={threads!r}: use a positive int (default: the physical cores)")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model not found: {path} (export one with `python -m export.onnx CKPT`)")
        self.runtime = runtime
        self.threads = threads or physical_cores()
        if runtime == "openvino":
            self.precision, self.metadata, self.session = self._open_openvino(path, providers, session_options,
                                                                              precision)
            self.fixed_batch: Optional[int] = self.session.fixed_batch
            self.providers = ["OpenVINO CPU"]
        else:
            if precision not in (None, "f32"):
                raise ValueError(f"precision={precision!r} is OpenVINO's (runtime='openvino'); onnxruntime runs the "
                                 f"file's own precision")
            self.precision = "f32"
            options = session_options or ort.SessionOptions()
            if not options.intra_op_num_threads:
                options.intra_op_num_threads = self.threads
            self.threads = options.intra_op_num_threads
            try:
                self.session = ort.InferenceSession(path, options, providers=list(providers or default_providers()))
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise ValueError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0]}") from None
            self.metadata = classifier_metadata(self.session, path)
            shape = self.session.get_inputs()[0].shape
            self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
            self.providers = self.session.get_providers()
        self.class_names: list[str] = self.metadata["class_names"]
        self.input_size: tuple[int, int] = tuple(self.metadata["input_size"])
        self.intensity: IntensityPolicy = resolve_policy(self.metadata.get("intensity"), intensity, path)
        self.temperature, self.operating_point, self.thresholds = read_calibration(self.metadata)
        self.multi_label: bool = is_multi_label(self.metadata)
        self._cuda = self.providers[0] == "CUDAExecutionProvider"
        self._graph = _open_preprocess_graph(path, self.metadata, session_options) if preprocess == "onnx" else None

    def preprocess(self, images: Sequence[ImageLike]) -> np.ndarray:
        """File paths (images, DICOM), Frames, PIL images or arrays -> float32 [B, 3, H, W], as training
        preprocessed them."""
        images = image_list(images)
        h, w = self.input_size
        if h != w:
            raise ValueError(f"non-square input size {self.input_size} is not supported by nearl_rt.core.preprocess")
        if self._graph is not None:
            pixels = [np.asarray(load_image(im, self.intensity)) for im in images]
            if not pixels:
                raise ValueError("no images given")
            return np.concatenate([self._graph.run(["images"], {"image": p[None]})[0] for p in pixels])
        return preprocess_batch(images, h, self.metadata["mean"], self.metadata["std"],
                                self.metadata.get("interpolation", "bicubic"), self.intensity)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed float32 [B, 3, H, W] -> (logits, probs), float32 [B, C]."""
        self._check_batch(batch)
        if self.fixed_batch is None:
            return self._run(batch)
        outs = [self._run_padded(batch[i:i + self.fixed_batch]) for i in range(0, len(batch), self.fixed_batch)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def predict(self, images: Sequence[ImageLike], top_k: Optional[int] = None, batch_size: int = 32,
                decision: bool = False) -> list:
        """Per image, (class name, probability) pairs, most probable first (all classes, or top_k).

        decision=True (binary models with a stored threshold): per image (decided class, pairs), the decided
        class being the positive class (index 1) when its probability is >= the threshold, else the other;
        multi-label models: per image ([findings whose probability is >= their threshold (0.5 without one)], pairs)."""
        k = len(self.class_names) if top_k is None else int(top_k)
        if not 1 <= k <= len(self.class_names):
            raise ValueError(f"top_k={top_k} must be between 1 and the number of classes ({len(self.class_names)})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        threshold = self.decision_threshold() if decision and not self.multi_label else None
        x = self.preprocess(images)
        probs = np.concatenate([self.run(x[i:i + batch_size])[1] for i in range(0, len(x), batch_size)])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        ranked = [[(self.class_names[c], float(p[c])) for c in row] for p, row in zip(probs, order)]
        if decision and self.multi_label:
            t = np.asarray([self.thresholds.get(c, 0.5) for c in self.class_names])
            return [([c for c, pc, tc in zip(self.class_names, p, t) if pc >= tc], pairs) for p, pairs in zip(probs, ranked)]
        if threshold is None:
            return ranked
        return [(self.class_names[int(p[1] >= threshold)], pairs) for p, pairs in zip(probs, ranked)]

    def decision_threshold(self) -> float:
        """The stored threshold on the positive class's (index 1) probability of a binary model."""
        return binary_threshold(self.class_names, self.thresholds)

    def _check_batch(self, batch) -> None:
        h, w = self.input_size
        want = f"float32 [batch, 3, {h}, {w}] (use NearlSession.preprocess for images)"
        if not isinstance(batch, np.ndarray):
            raise TypeError(f"expected a NumPy array {want}, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise ValueError(f"input has dtype {batch.dtype}; expected {want}")
        if batch.ndim != 4:
            raise ValueError(f"input has shape {batch.shape} ({batch.ndim} dims); expected {want}")
        if batch.shape[1] != 3:
            raise ValueError(f"input has {batch.shape[1]} channels (shape {batch.shape}); expected {want}")
        if tuple(batch.shape[2:]) != (h, w):
            raise ValueError(f"input is {batch.shape[2]}x{batch.shape[3]} pixels (shape {batch.shape}); expected {want}")
        if batch.shape[0] == 0:
            raise ValueError(f"input has an empty batch; expected {want}")

    def _run_padded(self, batch: np.ndarray):
        n = len(batch)
        if n < self.fixed_batch:
            batch = np.concatenate([batch, np.zeros((self.fixed_batch - n, *batch.shape[1:]), np.float32)])
        logits, probs = self._run(batch)
        return logits[:n], probs[:n]

    def _open_openvino(self, path: str, providers, session_options, precision: Optional[str]):
        """(precision, metadata, runner) of the OpenVINO runtime; the checks name the fix."""
        from nearl_rt.core.openvino_runtime import PRECISIONS, OpenVinoRunner
        if providers is not None or session_options is not None:
            raise ValueError("providers and session_options are onnxruntime's: leave them out with runtime='openvino'")
        precision = precision or "f32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} for OpenVINO: use one of {sorted(PRECISIONS)}")
        metadata = classifier_metadata(path, path)
        if precision != "f32" and not verified_precision(metadata, "openvino", precision):
            raise ValueError(f"{path} records no verification of OpenVINO {precision}: a reduced precision is served "
                             f"only after it passed the int8 gates against the file's float32 results (export "
                             f"with `python -m export.onnx CKPT --openvino-{precision}`), or use precision='f32'")
        if metadata.get("precision") == "int8" and metadata.get("graph") == GRAPH_FUSED and \
                (metadata.get("quantization") or {}).get("method") == "dynamic":
            raise ValueError(f"{path} is a fused dynamic int8 graph (onnxruntime's QAttention), which OpenVINO cannot "
                             f"run: serve it with onnxruntime, or export OpenVINO's int8 without --fused and with "
                             f"--calibrate (static)")
        return precision, metadata, OpenVinoRunner(path, precision, self.threads)

    def _run(self, batch: np.ndarray):
        batch = np.ascontiguousarray(batch)
        if self.runtime == "openvino":
            return self.session.run(batch)
        if not self._cuda:
            logits, probs = self.session.run(["logits", "probs"], {"images": batch})
            return logits, probs
        binding = self.session.io_binding()
        binding.bind_cpu_input("images", batch)
        for name in ("logits", "probs"):
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        logits, probs = binding.copy_outputs_to_cpu()
        return logits, probs


def binary_threshold(class_names: Sequence[str], thresholds: dict) -> float:
    """The decision threshold on a binary model's positive-class (index 1) probability; ValueError naming the fix
    for a multi-class model or one without a stored threshold."""
    if len(class_names) != 2:
        raise ValueError(f"a decision at the stored threshold is for binary models; this one has {len(class_names)} "
                         f"classes (its one-vs-rest thresholds: {thresholds or 'none stored'})")
    positive = class_names[1]
    if positive not in thresholds:
        raise ValueError(f"the model stores no decision threshold for {positive!r}: calibrate its checkpoint "
                         f"(`python -m nearl_rt.calibrate CKPT --data DATA`; export it again for an .onnx file)")
    return float(thresholds[positive])


def _open_preprocess_graph(classifier_path: str, metadata: dict, session_options) -> ort.InferenceSession:
    """The preprocessing graph of `classifier_path`, checked to belong to it (sha256, size, mean, std)."""
    path = preprocess_graph_path(classifier_path)
    fix = f"write it with `python -m export.preprocess_graph {classifier_path}`"
    if not path.is_file():
        raise FileNotFoundError(f"preprocessing graph not found: {path} ({fix})")
    try:
        session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValueError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0]}") from None
    meta = read_metadata(session)
    if meta.get("kind") != PREPROCESS_KIND:
        raise ValueError(f"{path} is not a nearl preprocessing graph (no nearl.kind = {PREPROCESS_KIND!r}); {fix}")
    if meta.get("classifier_sha256") != sha256_file(classifier_path):
        raise ValueError(f"{path} was written for another classifier (its nearl.classifier_sha256 does not match "
                         f"{classifier_path}); {fix}")
    for key in ("input_size", "mean", "std"):
        if meta.get(key) != metadata[key]:
            raise ValueError(f"{path} has {key} {meta.get(key)} but the classifier {metadata[key]}; {fix}")
    return session
