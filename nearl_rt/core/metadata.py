"""The `nearl.*` metadata of the ONNX files nearl-rt writes: its keys, reading and writing, in one place.

An exported classifier (nearl_rt.export.onnx) and its preprocessing graph (nearl_rt.export.preprocess_graph)
carry their serving parameters as ONNX `metadata_props` named `nearl.<key>`. Values are strings; the keys in
JSON_KEYS hold JSON (lists, objects). Readers take a file path, an `onnx.ModelProto` or an onnxruntime
`InferenceSession`, so a server that has only onnxruntime reads them too (onnx is imported only for paths and
protos).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

PREFIX = "nearl."
JSON_KEYS = ("class_names", "input_size", "mean", "std", "intensity", "templates", "quantization", "thresholds",
             "runtime_precisions")
# What every classifier file has; a file without them was not written by nearl_rt.export.onnx.
CLASSIFIER_KEYS = ("class_names", "input_size", "mean", "std")
# A calibrated classifier (nearl_rt.calibration): its graph's probs are softmax(logits / temperature); thresholds
# are the decision thresholds on those probs, {class name: t} (one-vs-rest; a binary model's positive class),
# chosen by the rule in operating_point. A file without them: temperature 1, no thresholds.
CALIBRATION_KEYS = ("temperature", "operating_point", "thresholds")
# nearl.labels: "multi" for a multi-label classifier (class_names are findings; probs [B, F] are per-finding
# sigmoid probabilities, thresholds per finding); "single" (or absent) for softmax over classes.
LABELS_SINGLE, LABELS_MULTI = "single", "multi"
PREPROCESS_KIND = "preprocess"  # nearl.kind of a preprocessing graph
# nearl.graph: how the classifier's graph is written. plain: standard ONNX ops (every runtime); fused: the towers'
# blocks as onnxruntime's com.microsoft transformer ops (nearl_rt.export.fused). Files without the key are plain.
GRAPH_PLAIN, GRAPH_FUSED = "plain", "fused"
# nearl.runtime_precisions: {"<runtime>:<precision>": verification report} for the reduced precisions a runtime
# applies to this file at load time (OpenVINO's bf16), each verified against the file's own float32 results by
# the int8 export's gates before it was recorded (nearl_rt.export.quantize.verify_runtime_precision).
PRODUCER = "nearl-rt"


class MetadataError(ValueError):
    """An ONNX file lacks the nearl.* metadata it needs (it was not written by nearl-rt)."""


def preprocess_graph_path(classifier_path) -> Path:
    """Where the preprocessing graph of a classifier lives: model.onnx -> model.preprocess.onnx."""
    return Path(classifier_path).with_suffix(".preprocess.onnx")


def read_raw(source) -> dict:
    """The nearl.* entries of `source` (path, onnx.ModelProto or onnxruntime.InferenceSession), prefix
    stripped, values as stored (strings)."""
    if hasattr(source, "get_modelmeta"):  # onnxruntime.InferenceSession
        props = source.get_modelmeta().custom_metadata_map.items()
    else:
        if isinstance(source, (str, os.PathLike)):
            import onnx
            source = onnx.load(os.fspath(source), load_external_data=False)
        props = ((p.key, p.value) for p in source.metadata_props)
    return {k[len(PREFIX):]: v for k, v in props if k.startswith(PREFIX)}


def decode(raw: Mapping[str, str]) -> dict:
    """Raw nearl.* values with the JSON keys decoded."""
    out = dict(raw)
    for key in JSON_KEYS:
        if key in out:
            out[key] = json.loads(out[key])
    return out


def read_metadata(source) -> dict:
    """The decoded nearl.* metadata of `source` (see read_raw)."""
    return decode(read_raw(source))


def classifier_metadata(source, name) -> dict:
    """read_metadata for an exported classifier; MetadataError naming `name` when it is not one."""
    meta = read_metadata(source)
    missing = [k for k in CLASSIFIER_KEYS if k not in meta]
    if missing:
        raise MetadataError(f"{name} lacks the nearl.* metadata {missing}: it was not written by export.onnx "
                            f"(export a checkpoint with `python -m export.onnx CKPT`)")
    return meta


def precision_key(runtime: str, precision: str) -> str:
    """The key of a runtime's reduced precision in nearl.runtime_precisions, e.g. "openvino:bf16"."""
    return f"{runtime}:{precision}"


def verified_precision(meta: Mapping[str, object], runtime: str, precision: str) -> bool:
    """Whether decoded metadata records that `runtime`'s `precision` passed the int8 gates (export.onnx
    --openvino-bf16, nearl_rt.export.quantize.verify_runtime_precision)."""
    return bool((meta.get("runtime_precisions") or {}).get(precision_key(runtime, precision)))


def is_multi_label(meta: Mapping[str, object]) -> bool:
    """Whether decoded metadata describes a multi-label classifier (nearl.labels = multi)."""
    return meta.get("labels", LABELS_SINGLE) == LABELS_MULTI


def calibration_values(temperature: float, operating_point: str, thresholds: Mapping[str, float]) -> dict:
    """The decoded metadata entries of a calibration (for write_metadata, with the other values)."""
    return {"temperature": repr(float(temperature)), "operating_point": operating_point,
            "thresholds": {str(k): float(v) for k, v in thresholds.items()}}


def read_calibration(meta: Mapping[str, object]) -> tuple[float, str | None, dict]:
    """(temperature, operating_point, thresholds) of decoded metadata: (1.0, None, {}) when it has none."""
    return (float(meta.get("temperature", 1.0)), meta.get("operating_point") or None,
            {str(k): float(v) for k, v in (meta.get("thresholds") or {}).items()})


def encode(values: Mapping[str, object]) -> dict:
    """Decoded values (as read_metadata returns them) to their stored strings: JSON for the JSON keys,
    str() for the others."""
    return {k: json.dumps(v) if k in JSON_KEYS else str(v) for k, v in values.items()}


def write_metadata(proto, values: Mapping[str, object], doc: str | None = None) -> None:
    """Replace the nearl.* entries of the onnx.ModelProto `proto` by `values` (decoded, see encode); other
    entries stay. The producer is nearl-rt; `doc` becomes the model's doc string."""
    keep = [p for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in encode(values).items():
        proto.metadata_props.add(key=PREFIX + key, value=value)
    proto.producer_name = PRODUCER
    if doc is not None:
        proto.doc_string = doc
