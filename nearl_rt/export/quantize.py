"""int8 quantisation of an exported NEARL-CLIP for CPU serving (`python -m export.onnx CKPT --int8`).

Two methods, both onnxruntime's own quantiser on the verified fp32 file:
- dynamic (default): int8 weights (per tensor, symmetric); activations quantised per call from their
  own range (DynamicQuantizeLinear). No data needed.
- static: QDQ format, uint8 activations with ranges calibrated (MinMax, deterministic) on preprocessed
  images, int8 weights.

What is quantised: MatMul / Gemm / Conv whose second input is a weight (a constant), and in a fused graph's
dynamic int8 the QKV weights of onnxruntime's Attention nodes (QAttention; nearl_rt.export.fused). Everything
else stays float32, in particular
- the OCA's parallel/orthogonal split (<H, F> / (<F, F> + eps) F: Mul, ReduceSum, Div, Sub) and every
  LayerNorm / Softmax / GELU: elementwise and reduction ops are not in the quantised op set, and the
  projections they read are dequantised to float32 before them;
- the attention products q k^T and attn v (both inputs are activations: "MatMulConstBOnly");
- the last MatMul before `logits` on every path (the cosine product with the cached class text in
  text_cacheable; the two feature projections in bidirectional, whose cosine is elementwise): a
  quantised cosine would round the logits directly, where a wrong top-1 costs most.

A quantised file is kept only after it passes the verification gates against the fp32 file on the
same images (top-1 agreement, max |delta prob| and, with labels, |delta accuracy|); `QuantizationError`
otherwise, with the measured figures, and nothing is written.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx

from nearl_rt.core.hashing import sha256_file
from nearl_rt.core.imaging import DEFAULT_POLICY, IntensityPolicy
from nearl_rt.core.metadata import is_multi_label, precision_key, read_metadata, write_metadata
from nearl_rt.core.atomic import atomic_output
from nearl_rt.core.errors import NearlError

METHODS = ("dynamic", "static")
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
MIN_CALIBRATION_IMAGES = 16
MIN_VERIFICATION_IMAGES = 16
RANDOM_VERIFICATION_IMAGES = 64


class QuantizationError(NearlError):
    """The model cannot be quantised, or its int8 version misses a verification gate."""


@dataclass(frozen=True)
class Gates:
    """Verification thresholds of an int8 model against its fp32 source.

    min_agreement: fraction of images whose top-1 class is unchanged (default 0.99);
    max_accuracy_change: largest |accuracy_int8 - accuracy_fp32| in accuracy points (default 0.5; only
    with labelled images); max_prob_diff: largest |prob_int8 - prob_fp32| over all images and classes
    (default: not gated, only reported)."""
    min_agreement: float = 0.99
    max_accuracy_change: float = 0.5
    max_prob_diff: Optional[float] = None

    def __post_init__(self):
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement={self.min_agreement}: use a fraction between 0 and 1 (e.g. 0.99)")
        if self.max_accuracy_change < 0:
            raise ValueError(f"max_accuracy_change={self.max_accuracy_change}: use points >= 0 (e.g. 0.5)")
        if self.max_prob_diff is not None and self.max_prob_diff < 0:
            raise ValueError(f"max_prob_diff={self.max_prob_diff}: use a value >= 0 (or None for no gate)")


@dataclass
class ImageSet:
    """Preprocessed images [N, 3, H, W] float32 (labels [N] or None) and where they came from."""
    images: np.ndarray
    labels: Optional[np.ndarray] = None
    source: str = "random"

    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()


def fp32_matmuls(proto: onnx.ModelProto) -> list[str]:
    """Names of the quantisable nodes kept in float32: the last MatMul/Gemm before `logits` on every
    path (walking back from the output, a path stops at its first MatMul/Gemm)."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    constants = {init.name for init in proto.graph.initializer}
    keep, seen, stack = [], set(), ["logits"]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            keep.append(node.name)
            continue
        stack.extend(i for i in node.input if i and i not in constants)
    return sorted(keep)


def quantize(fp32_path, out_path, *, method: str = "dynamic", calibration: Optional[ImageSet] = None,
             verification: Optional[ImageSet] = None, gates: Gates = Gates(), seed: int = 0) -> dict:
    """Quantise the verified fp32 export `fp32_path` to `out_path` (atomically) and verify it.

    static needs `calibration` (>= MIN_CALIBRATION_IMAGES images). `verification` are the images the
    int8 model is checked on against the fp32 one (default: RANDOM_VERIFICATION_IMAGES random inputs
    drawn with `seed`). Returns the verification report; raises QuantizationError when a gate fails
    (no file is written then)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {METHODS}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    proto = onnx.load(str(fp32_path))
    meta = read_metadata(proto)
    if meta.get("precision", "fp32") != "fp32":
        raise QuantizationError(f"{fp32_path} is a {meta['precision']} model: int8 quantisation starts from the "
                                f"fp32 export (export without --fp16)")
    if method == "static":
        if calibration is None:
            raise QuantizationError("static int8 needs calibration images (--calibrate DATA)")
        if len(calibration.images) < MIN_CALIBRATION_IMAGES:
            raise QuantizationError(f"only {len(calibration.images)} calibration images from {calibration.source}; "
                                    f"static int8 needs at least {MIN_CALIBRATION_IMAGES}")
    verification = verification_images(verification, meta["input_size"], seed)
    info = {"method": method, "weights": "int8, per tensor, symmetric",
            "activations": "uint8, dynamic per call" if method == "dynamic" else "uint8, calibrated (MinMax)",
            "quantized_ops": quantized_ops(proto, method),
            "source_sha256": sha256_file(fp32_path)}
    if calibration is not None and method == "static":
        info["calibration"] = {"source": calibration.source, "count": int(len(calibration.images)),
                               "method": "MinMax", "images_sha256": calibration.fingerprint()}
    with atomic_output(out_path) as tmp:
        info["fp32_nodes"] = quantize_graph(fp32_path, tmp, method=method, calibration=calibration, graph=proto)
        report = verify_int8(fp32_path, tmp, verification, gates)
        info["verification"] = report
        q = onnx.load(str(tmp))
        write_metadata(q, dict(meta, precision="int8", quantization=info),
                       doc="NEARL-CLIP classifier (int8): images -> logits, probs")
        onnx.save(q, str(tmp))
    return report


def quantized_ops(proto: onnx.ModelProto, method: str) -> list[str]:
    """The op types quantised: QUANTIZED_OPS, plus a fused graph's Attention in dynamic int8 (onnxruntime's
    QAttention; its static QDQ quantiser has no Attention, which then stays float32)."""
    fused = any(n.op_type == "Attention" and n.domain == "com.microsoft" for n in proto.graph.node)
    return [*QUANTIZED_OPS, "Attention"] if fused and method == "dynamic" else list(QUANTIZED_OPS)


def quantize_graph(src, dst, *, method: str = "dynamic", calibration: Optional[ImageSet] = None,
                   graph: Optional[onnx.ModelProto] = None) -> list[str]:
    """The quantisation alone, no checks, verification or metadata: the graph at `src` (any ONNX file with
    an `images` input and a `logits` output) with its weight MatMul / Gemm / Conv in int8, fp32_matmuls kept
    float32, written to `dst`. Returns the float32 nodes' names. quantize() builds on it; bench/latency.py
    quantises frozen CLIP with it, so both int8 rows are made the same way. `graph`: src already loaded (not
    read a second time)."""
    graph = graph if graph is not None else onnx.load(str(src))
    excluded, ops = fp32_matmuls(graph), quantized_ops(graph, method)
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # "consider pre-processing" noise
    if method == "dynamic":
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=ops, weight_type=QuantType.QInt8,
                         nodes_to_exclude=excluded, extra_options={"MatMulConstBOnly": True})
        return excluded

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray, batch: int = 8):
            self.batches = iter([images[i:i + batch] for i in range(0, len(images), batch)])

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"images": np.ascontiguousarray(b, dtype=np.float32)}

    quantize_static(str(src), str(dst), Reader(calibration.images), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=ops, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                    calibration_providers=["CPUExecutionProvider"],
                    extra_options={"MatMulConstBOnly": True})
    return excluded


def _probs(path: Path, images: np.ndarray, batch: int = 16) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    fixed = shape[0] if isinstance(shape[0], int) else None
    out = []
    for i in range(0, len(images), fixed or batch):
        x = np.ascontiguousarray(images[i:i + (fixed or batch)], dtype=np.float32)
        n = len(x)
        if fixed and n < fixed:
            x = np.concatenate([x, np.zeros((fixed - n, *x.shape[1:]), np.float32)])
        out.append(session.run(["probs"], {"images": x})[0][:n])
    return np.concatenate(out)


def verify_int8(fp32_path, int8_path, images: ImageSet, gates: Gates) -> dict:
    """Score `images` with both files; raise QuantizationError when a gate fails, else return the report:
    top-1 agreement, max |delta prob| and, with labels, both accuracies (and macro-F1 / AUC) and their change."""
    return gate_report(_probs(Path(fp32_path), images.images), _probs(Path(int8_path), images.images), images,
                       gates, "int8", is_multi_label(read_metadata(fp32_path)))


def gate_report(ref: np.ndarray, got: np.ndarray, images: ImageSet, gates: Gates, what: str,
                multi_label: bool = False) -> dict:
    """The gates of a reduced precision `what` ("int8", "OpenVINO bf16") whose probabilities `got` stand against
    the float32 `ref` on `images`: the report (metrics keyed "fp32" and `what`'s last word), or QuantizationError
    naming every gate missed. multi_label: probabilities per finding; "top-1 agreement" is then the agreement of
    the (image, finding) decisions at p >= 0.5, and with labels the accuracy is that of the known labels'
    decisions (1 - Hamming loss) and the AUROC the macro AUROC (nearl_rt.multilabel)."""
    label = what.split()[-1]
    if not np.isfinite(got).all():
        raise QuantizationError(f"the {what} model returns non-finite probabilities; the file was not written")
    agree = float(np.mean((ref >= 0.5) == (got >= 0.5))) if multi_label else float(np.mean(ref.argmax(1) == got.argmax(1)))
    report = {"images": int(len(ref)), "source": images.source, "top1_agreement": agree,
              "max_abs_prob_diff": float(np.abs(ref - got).max()), "gates": asdict(gates)}
    failures = []
    if agree < gates.min_agreement:
        total, what_changed = (ref.size, "(image, finding) decisions changed") if multi_label else \
            (len(ref), "images changed class")
        failures.append(f"{'decision' if multi_label else 'top-1'} agreement {100 * agree:.1f}% < "
                        f"{100 * gates.min_agreement:.1f}% ({int(round((1 - agree) * total))} of {total} {what_changed})")
    if gates.max_prob_diff is not None and report["max_abs_prob_diff"] > gates.max_prob_diff:
        failures.append(f"max |delta prob| {report['max_abs_prob_diff']:.4f} > {gates.max_prob_diff:.4f}")
    if images.labels is not None:
        names = [str(i) for i in range(ref.shape[1])]
        m_ref, m_got = (_labelled_metrics(images.labels, p, names, multi_label) for p in (ref, got))
        for key in ("accuracy", "macro_f1", "auc"):
            report[key] = {"fp32": m_ref[key], label: m_got[key], "change_points": 100 * (m_got[key] - m_ref[key])}
        change = abs(report["accuracy"]["change_points"])
        if change > gates.max_accuracy_change:
            failures.append(f"|delta accuracy| {change:.2f} points > {gates.max_accuracy_change:.2f} "
                            f"(fp32 {100 * m_ref['accuracy']:.2f}%, {what} {100 * m_got['accuracy']:.2f}%)")
    if failures:
        raise QuantizationError(f"the {what} model misses its verification gates on {len(ref)} {images.source} images: "
                                f"{'; '.join(failures)}. The file was not written (loosen the gates with "
                                f"--min-agreement / --max-accuracy-change / --max-prob-diff, or "
                                f"{'try the other method' if what == 'int8' else 'serve float32'})")
    return report


def _labelled_metrics(labels, probs, names: list, multi_label: bool) -> dict:
    """accuracy, macro_f1 and auc of probabilities against labels (multi-label: see gate_report)."""
    if not multi_label:
        from nearl_rt.metrics import classification_metrics
        return classification_metrics(labels, probs, names)
    from nearl_rt.multilabel import multilabel_metrics
    m = multilabel_metrics(labels, probs, names)
    return {"accuracy": 1.0 - m["hamming_loss"], "macro_f1": m["macro_f1"], "auc": m["macro_auroc"]}


def images_from_dataset(data, class_names: Sequence[str], preprocess_cfg: dict, *, split: Optional[str] = None,
                        counts: Sequence[int] = (), seed: int = 0, image_root=None,
                        intensity: IntensityPolicy = DEFAULT_POLICY) -> list[ImageSet]:
    """Disjoint, deterministic (seeded permutation) draws of `counts[i]` preprocessed images from one split of a
    dataset the CLIs read (default split: train, else the only one), decoded with the model's `intensity`
    policy (nearl_rt.core.imaging). The dataset's classes must be the model's."""
    from nearl_rt.data import Preprocess, finding_columns, load_images, read_dataset
    ds = read_dataset(data, image_root, names_matter=False)
    if ds.multi_label:
        ds = finding_columns(ds, class_names)
    if list(ds.class_names) != list(class_names):
        raise QuantizationError(f"{data} has the classes {ds.class_names}, the model {list(class_names)}: "
                                f"calibrate on images of the model's own class set")
    name = split or ("train" if "train" in ds.splits else next(iter(ds.splits)))
    part = ds.split(name)
    order = np.random.default_rng(seed).permutation(len(part))
    need = sum(counts)
    if len(order) < need:
        raise QuantizationError(f"the {name} split of {data} has {len(order)} images; {need} are needed "
                                f"({' + '.join(map(str, counts))}): lower --calibration-count / --verify-count")
    prep, out, start = Preprocess(preprocess_cfg, intensity=intensity), [], 0
    for n in counts:
        sub = part.subset(order[start:start + n].tolist())
        images, _, _ = load_images(sub, False, prep.intensity)
        out.append(ImageSet(prep.eval(images).numpy(), sub.labels, f"{data} ({name} split)"))
        start += n
    return out


def verification_images(verification: Optional[ImageSet], input_size, seed: int) -> ImageSet:
    """The images the gates compare on: the given set (at least MIN_VERIFICATION_IMAGES) or random ones."""
    if verification is None:
        return random_images(input_size, seed)
    if len(verification.images) < MIN_VERIFICATION_IMAGES:
        raise QuantizationError(f"only {len(verification.images)} verification images from {verification.source}; "
                                f"need at least {MIN_VERIFICATION_IMAGES}")
    return verification


def random_images(size, seed: int = 0) -> ImageSet:
    """RANDOM_VERIFICATION_IMAGES seeded random inputs [N, 3, *size] (agreement only: no labels)."""
    rng = np.random.default_rng(seed)
    return ImageSet(rng.standard_normal((RANDOM_VERIFICATION_IMAGES, 3, *size), dtype=np.float32))


def verify_runtime_precision(path, runtime: str, precision: str, verification: Optional[ImageSet] = None,
                             gates: Gates = Gates(), seed: int = 0) -> dict:
    """Check a reduced precision that a runtime applies at load time (OpenVINO's "bf16") against the file's own
    float32 results on onnxruntime, through the int8 gates (`verification`: labelled or not; default random
    inputs), and record the report in the file's nearl.runtime_precisions (rewritten atomically). Returns the
    report; QuantizationError when a gate fails (the file is left as it was)."""
    from nearl_rt.core.cpu import physical_cores
    from nearl_rt.core.openvino_runtime import OpenVinoRunner, openvino_version
    if runtime != "openvino":
        raise ValueError(f"runtime={runtime!r}: reduced precisions at load time are OpenVINO's ('openvino')")
    path = Path(path)
    proto = onnx.load(str(path))
    meta = read_metadata(proto)
    if meta.get("precision", "fp32") != "fp32":
        raise QuantizationError(f"{path} is a {meta['precision']} model: {runtime} {precision} is verified on the "
                                f"float32 export")
    verification = verification_images(verification, meta["input_size"], seed)
    runner = OpenVinoRunner(str(path), precision, physical_cores())
    got = np.concatenate([runner.run(np.ascontiguousarray(verification.images[i:i + 16]))[1]
                          for i in range(0, len(verification.images), 16)])
    report = gate_report(_probs(path, verification.images), got, verification, gates, f"OpenVINO {precision}")
    import openvino as ov
    report["openvino"] = openvino_version()
    report["cpu_capabilities"] = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    records = dict(meta.get("runtime_precisions") or {})
    records[precision_key(runtime, precision)] = report
    with atomic_output(path) as tmp:
        write_metadata(proto, dict(meta, runtime_precisions=records))
        onnx.save(proto, str(tmp))
    return report
