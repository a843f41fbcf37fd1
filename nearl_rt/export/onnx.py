"""`python -m export.onnx CKPT`: a trained checkpoint as one ONNX file that onnxruntime serves as it is.

Input `images` float32 [batch, 3, H, W] (normalised); outputs `logits` (raw) and `probs` float32 [batch, C]
(softmax(logits / T) with the temperature T the checkpoint was calibrated with, recorded in the metadata with
its decision thresholds).
The class prompts (bidirectional) or the cached class text stream (text_cacheable) are constants.
The file is verified before it is kept: onnx.checker, then onnxruntime CPU vs PyTorch on fresh
random inputs at two batch sizes; on any failure no file is left behind.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnx
import torch
from onnxscript import opset23 as op23
from onnxscript.onnx_types import BOOL, FLOAT

from nearl_rt.calibration import Calibration
from nearl_rt.export.fused import fused_towers
from nearl_rt.export.ort_ops import TRANSLATIONS as ORT_TRANSLATIONS
from nearl_rt.export.graph import export_module, reference_ops
from nearl_rt.core.imaging import DEFAULT_POLICY, IntensityPolicy, resolve_policy
from nearl_rt.core.metadata import (GRAPH_FUSED, GRAPH_PLAIN, LABELS_MULTI, LABELS_SINGLE, calibration_values,
                                    read_metadata, write_metadata)
from nearl_rt.core.atomic import atomic_output
from nearl_rt.core.errors import NearlError

log = logging.getLogger("nearl_rt.export.onnx")  # by name: also when run as __main__

# Measured on CPU onnxruntime with vit_b16 (README "Export and serving"): opset 23's native Attention was
# not faster than opset 18's MatMul/Softmax attention beyond noise; 18 runs on more onnxruntime builds.
DEFAULT_OPSET = 18
MIN_OPSET = 18
# Verification (docs/export.md#verification): VERIFY_IMAGES random images in VERIFY_BATCHES (a fixed-batch file:
# chunks of its size).
VERIFY_IMAGES, VERIFY_BATCHES = 8, (1, 3, 4)
# fp32: a correct float32 export and PyTorch's float32 forward are two float32 roundings of one function; against a
# float64 copy of the model their errors share one scale, which the model's conditioning sets (~1e-6 of a logit on
# a well-conditioned model, ~1e-3 on a deep random-weight one). PyTorch's RMS error measures that scale (at least
# FP32_FLOOR_ULPS float32 ulps of the largest |logit|); onnxruntime's error must stay within FP32_RMS_FACTOR times
# it in RMS and FP32_MAX_FACTOR times it at the worst logit, and its top-1 class must be float64's wherever the
# top-2 margin exceeds twice that worst-case bound. Measured over correct exports (tiny, tiny_bert, biomedclip;
# both modes, 189 correct exports): RMS ratio <= 2.9, worst logit <= 12.5x the scale (docs/export.md).
FP32_RMS_FACTOR, FP32_MAX_FACTOR, FP32_FLOOR_ULPS = 8.0, 32.0, 64
# fp16: |ORT fp16 - PyTorch fp32| <= ATOL + RTOL * max|logit|: float16 has a unit roundoff of 4.9e-4; through 12
# layers of matmuls and LayerNorms the normalised features move by ~1e-3 and the logits (cosine x
# exp(logit_scale) <= 100) by that times the scale.
FP16_TOLERANCE = (5e-2, 1e-2)
CLASSIFIER_DOC = "NEARL-CLIP classifier: images -> logits, probs"
# onnxscript's optimiser logs "Skipping constant folding for op LayerNormalization with multiple outputs" per
# LayerNorm kind: a note about its own work on a graph that is correct (and verified below), not a user's problem.
EXPORTER_NOISE = ("onnxscript.optimizer._constant_folding",)


class ExportError(NearlError):
    """The export failed, or the exported file does not reproduce the PyTorch model."""


def export_model(model, out_path, *, opset: Optional[int] = None, fp16: bool = False, optimize: bool = False,
                 batch_size: Union[str, int] = "dynamic", verify: bool = True,
                 checkpoint_sha256: Optional[str] = None, intensity: Optional[IntensityPolicy] = None,
                 calibration: Optional[Calibration] = None, fused: bool = False, head=None,
                 method: str = "nearl") -> Path:
    """Export a NearlCLIP (classes set, either interaction mode) to `out_path`, atomically; with `head` (a
    nearl_rt.feature_heads module) the head on the frozen image features instead. `method`: recorded.

    opset: ONNX opset (default DEFAULT_OPSET); fp16: float16 weights and activations, float32 input and
    outputs; optimize: store onnxruntime's offline-optimised graph; batch_size: "dynamic" or a fixed
    int; verify: onnx.checker + onnxruntime CPU vs PyTorch at two batch sizes (raises ExportError on a
    mismatch); checkpoint_sha256: recorded in the metadata; intensity: the image intensity policy the model
    was trained with (nearl_rt.core.imaging; recorded so NearlSession applies it); calibration: the checkpoint's
    (nearl_rt.calibration): its temperature divides the logits before the graph's softmax, and it is recorded
    with the operating point's thresholds in the metadata; fused: the graph onnxruntime's CPU provider runs
    fastest (nearl_rt.export.fused: the towers' blocks as its fused transformer ops, NEARL's ops in their "graph"
    forms; float32 only). Returns the written path.
    """
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset={opset!r}: use an int >= {MIN_OPSET}")
    fixed_batch = _parse_batch_size(batch_size)
    if fused and fp16:
        raise ValueError("fused=True writes a float32 graph for onnxruntime's CPU provider; export float16 without it")
    temperature = calibration.temperature if calibration is not None and calibration.fitted else None
    if head is not None and (fused or fp16):
        raise ValueError(f"a {method} head exports as a plain float32 graph: drop --fp16 / --fused "
                         f"(fp16=True, fused=True)")
    export_module(model, temperature, head)  # checks the model before anything is written
    if model.dtype != torch.float32:  # the reference (and the fp32 export) is the float32 model
        model = copy.deepcopy(model).float()
    module = export_module(model, temperature, head)
    out_path = _output_file(out_path)
    with atomic_output(out_path) as tmp:
        proto = trace_to_onnx(export_module(copy.deepcopy(model).half(), temperature) if fp16 else module, opset,
                              fixed_batch, fused=fused)
        write_metadata(proto, {**classifier_metadata_values(model, opset, fp16, fixed_batch, checkpoint_sha256,
                                                           intensity, calibration, fused), "method": method},
                       doc=CLASSIFIER_DOC)
        onnx.save(proto, tmp)
        if optimize:
            _optimize_offline(tmp)
        if verify:
            r = verify_onnx(tmp, module, fp16=fp16, fixed_batch=fixed_batch)
            log.info("verified %s on %d random images (batches %s): max |ORT - PyTorch| logits %.3g, probs %.3g%s",
                     out_path.name, r["images"], ", ".join(map(str, r["batches"])), r["logits"], r["probs"],
                     "" if fp16 else f"; error vs float64: ORT rms {r['rms_error']['onnxruntime']:.2g}, PyTorch rms "
                     f"{r['rms_error']['pytorch']:.2g} (bound rms {r['bound']['rms']:.2g}, max {r['bound']['max']:.2g})")
    return out_path


def _parse_batch_size(batch_size) -> Optional[int]:
    if batch_size == "dynamic":
        return None
    try:
        n = int(batch_size)
    except (TypeError, ValueError):
        n = 0
    if isinstance(batch_size, bool) or n < 1 or str(n) != str(batch_size).strip():
        raise ValueError(f"batch_size={batch_size!r}: use 'dynamic' or a positive int")
    return n


def _output_file(path) -> Path:
    """`path` as a Path, refused when it names a directory."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory (give a file name ending in .onnx)")
    return path


@contextmanager
def _quiet(loggers):
    """Loggers below ERROR silenced for the block (levels restored after)."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def trace_to_onnx(module, opset: int, fixed_batch: Optional[int], fused: bool = False) -> onnx.ModelProto:
    """The ONNX graph of an nn.Module whose `.model` is a NearlCLIP (nearl_rt.export.graph's modules, the benchmark's
    frozen CLIP): dynamo exporter, input `images` (dynamic batch axis unless fixed), outputs logits/probs.
    fused: the towers' blocks as onnxruntime's fused ops (nearl_rt.export.fused)."""
    src = module.model
    was_training = src.training
    src.eval()
    size = _input_size(src)
    example = torch.randn(fixed_batch or 2, 3, *size, device=src.class_tokens.device)
    dynamic = None if fixed_batch else {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}
    try:
        with reference_ops(src, "graph" if fused else "torch"), (fused_towers(src) if fused else nullcontext()), \
                torch.no_grad(), warnings.catch_warnings(), _quiet(EXPORTER_NOISE):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=["images"], output_names=["logits", "probs"],
                                        dynamic_shapes=dynamic, custom_translation_table=_translations(opset, fused),
                                        optimize=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; report one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"torch.onnx export failed ({e.__class__.__name__}: {first})") from e
    finally:
        src.train(was_training)
    return program.model_proto


def _sdpa_as_attention(query: FLOAT, key: FLOAT, value: FLOAT, attn_mask: Optional[BOOL] = None,
                       dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                       enable_gqa: bool = False):
    """SDPA as opset 23's native Attention. onnxruntime's CPU kernel needs the mask's query axis spelled
    out, so a key-padding mask [.., 1, K] is broadcast to [.., Lq, K] first."""
    if attn_mask is not None:
        lq = op23.Shape(query, start=2, end=3)
        shape = op23.Concat(op23.Constant(value_ints=[1, 1]), lq, op23.Constant(value_ints=[1]), axis=0)
        attn_mask = op23.Expand(attn_mask, shape)
    y, _, _, _ = op23.Attention(query, key, value, attn_mask, scale=scale, is_causal=is_causal)
    return y


def _translations(opset: int, fused: bool) -> dict:
    table = {torch.ops.aten.scaled_dot_product_attention.default: _sdpa_as_attention} if opset >= 23 else {}
    if fused:
        table.update(ORT_TRANSLATIONS)
    return table


def _input_size(model) -> tuple[int, int]:
    size = model.preprocess_cfg["size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def classifier_metadata_values(model, opset: int, fp16: bool, fixed_batch: Optional[int],
                               checkpoint_sha256: Optional[str], intensity: Optional[IntensityPolicy] = None,
                               calibration: Optional[Calibration] = None, fused: bool = False) -> dict:
    """The nearl.* metadata of a classifier exported from `model` (nearl_rt.core.metadata writes it)."""
    from nearl_rt import __version__
    cfg = model.preprocess_cfg
    calibrated = {} if calibration is None or not calibration.fitted else calibration_values(
        calibration.temperature, calibration.operating_point, calibration.thresholds)
    return {
        "class_names": list(model.class_names),
        "template": model.template or "",
        "templates": model.templates,  # the prompt ensemble baked into the graph
        "interaction": model.interaction,
        "input_size": list(_input_size(model)),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
        "intensity": (intensity or DEFAULT_POLICY).to_dict(),
        "backbone": model.backbone_identity.name,
        "backbone_sha256": model.backbone_identity.sha256 or "",
        "nearl_rt_version": __version__,
        "checkpoint_sha256": checkpoint_sha256 or "",
        "opset": str(opset),
        "precision": "fp16" if fp16 else "fp32",
        "batch_size": str(fixed_batch) if fixed_batch else "dynamic",
        "graph": GRAPH_FUSED if fused else GRAPH_PLAIN,
        "labels": LABELS_MULTI if model.multi_label else LABELS_SINGLE,
        **calibrated,
    }


def _optimize_offline(path: Path) -> None:
    """Replace `path` by onnxruntime's offline-optimised graph (extended level: portable across CPU and
    CUDA, unlike the layout-specific "all" level), keeping the metadata."""
    import onnxruntime as ort
    meta = read_metadata(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    proto = onnx.load(str(path))
    write_metadata(proto, meta, doc=CLASSIFIER_DOC)
    onnx.save(proto, str(path))


def verification_batches(images: int, fixed_batch: Optional[int]) -> list[int]:
    """Batch sizes the verification runs: VERIFY_BATCHES (dynamic batch axis), or chunks of the fixed size."""
    if fixed_batch:
        return [fixed_batch] * -(-images // fixed_batch)
    assert sum(VERIFY_BATCHES) == images
    return list(VERIFY_BATCHES)


def verify_onnx(path, module, *, fp16: bool = False, fixed_batch: Optional[int] = None, seed: int = 0) -> dict:
    """onnx.checker, then onnxruntime CPU against the `module` (an nearl_rt.export.graph module) on VERIFY_IMAGES
    fresh random images: fp32 files against a float64 copy of the model, within the bound PyTorch's own float32
    error sets (see FP32_RMS_FACTOR); fp16 files against float32 PyTorch within FP16_TOLERANCE. Returns the
    figures ({"images", "batches", "logits", "probs" (max |ORT - PyTorch|), and for fp32 "rms_error", "max_error"
    ({"onnxruntime", "pytorch"} vs float64), "scale", "bound" ({"rms", "max"})}); raises ExportError when the file
    fails a check or an output is not finite."""
    import onnxruntime as ort
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = module.model
    device = model.class_tokens.device
    images = torch.randn(VERIFY_IMAGES, 3, *_input_size(model), generator=torch.Generator().manual_seed(seed))
    batches = verification_batches(len(images), fixed_batch)
    ref, got = [], []
    with reference_ops(model), torch.no_grad():
        start = 0
        for batch in batches:
            x = images[start:start + batch]
            start += batch
            ref.append([t.cpu().numpy() for t in module(x.to(device))])
            padded = np.concatenate([x.numpy(), np.zeros((batch - len(x), *x.shape[1:]), np.float32)])
            got.append([o[:len(x)] for o in session.run(["logits", "probs"], {"images": padded})])
    ref = [np.concatenate([r[i] for r in ref]) for i in (0, 1)]
    got = [np.concatenate([g[i] for g in got]) for i in (0, 1)]
    bad = [f"{side}'s {name}" for side, outs in (("onnxruntime", got), ("PyTorch", ref))
           for name, a in zip(("logits", "probs"), outs) if not np.isfinite(a).all()]
    if bad:  # a NaN cannot be compared against a tolerance
        raise ExportError(f"non-finite output on the verification images: {', '.join(bad)} hold NaN or Inf (the "
                          f"model's weights{', or float16 arithmetic,' if fp16 else ''} overflow); the file was not "
                          f"written")
    report = {"images": len(images), "batches": batches, "logits": float(np.abs(got[0] - ref[0]).max()),
              "probs": float(np.abs(got[1] - ref[1]).max())}
    if fp16:
        atol, rtol = FP16_TOLERANCE
        tol = atol + rtol * float(np.abs(ref[0]).max())
        if report["logits"] > tol:
            raise ExportError(f"the fp16 file disagrees with float32 PyTorch: max |diff| of the logits "
                              f"{report['logits']:.3g} > tolerance {tol:.3g}; the file was not written")
        return report
    return {**report, **check_float32_error(got[0], ref[0], _float64_logits(module, images))}


def _float64_logits(module, images: torch.Tensor) -> np.ndarray:
    """The logits of a float64 copy of the model (reference ops): the ground truth float32 rounds. A feature
    head's graph module runs in float64 as a whole (its head included)."""
    model = module.model
    with reference_ops(model), torch.no_grad():
        if getattr(module, "head", None) is not None:
            module64 = copy.deepcopy(module).double()
            return module64(images.double().to(model.class_tokens.device))[0].cpu().numpy()
        model64 = copy.deepcopy(model).double()
        return model64.classify(images.double().to(model64.class_tokens.device)).cpu().numpy()


def check_float32_error(ort_logits: np.ndarray, torch_logits: np.ndarray, ref64: np.ndarray) -> dict:
    """The fp32 bound of FP32_RMS_FACTOR: figures, or ExportError naming the one that fails."""
    e_ort, e_pt = ort_logits.astype(np.float64) - ref64, torch_logits.astype(np.float64) - ref64
    rms = {"onnxruntime": float(np.sqrt(np.mean(e_ort ** 2))), "pytorch": float(np.sqrt(np.mean(e_pt ** 2)))}
    worst = {"onnxruntime": float(np.abs(e_ort).max()), "pytorch": float(np.abs(e_pt).max())}
    scale = max(rms["pytorch"], FP32_FLOOR_ULPS * float(np.finfo(np.float32).eps) * float(np.abs(ref64).max()))
    bound = {"rms": FP32_RMS_FACTOR * scale, "max": FP32_MAX_FACTOR * scale}
    figures = f"(PyTorch float32: rms {rms['pytorch']:.3g}, max {worst['pytorch']:.3g})"
    if rms["onnxruntime"] > bound["rms"] or worst["onnxruntime"] > bound["max"]:
        raise ExportError(f"onnxruntime's logits are further from a float64 copy of the model than float32 rounding "
                          f"explains: rms error {rms['onnxruntime']:.3g}, max {worst['onnxruntime']:.3g} > bound rms "
                          f"{bound['rms']:.3g}, max {bound['max']:.3g} {figures}; the file was not written")
    top2 = np.sort(ref64, axis=1)[:, -2:]
    changed = (top2[:, 1] - top2[:, 0] > 2 * bound["max"]) & (ort_logits.argmax(1) != ref64.argmax(1))
    if changed.any():
        raise ExportError(f"onnxruntime picks another class than the float64 model for {int(changed.sum())} of "
                          f"{len(ref64)} verification images with a clear margin; the file was not written")
    return {"rms_error": rms, "max_error": worst, "scale": scale, "bound": bound}


def load_exportable(checkpoint, pretrained: Optional[str] = None):
    """The model a checkpoint holds, if it is one export.onnx writes (a method the registry exports, with class
    names; else ExportError), and what it records for the export: (model, {"intensity": policy, "calibration": ...,
    "head": a feature head or None, "method": its method})."""
    from nearl_rt.checkpoint import read_checkpoint
    from nearl_rt.classifier import load_classifier
    from nearl_rt.methods import METHODS, REGISTRY
    extra = read_checkpoint(checkpoint).get("extra") or {}
    method = extra.get("method", "nearl")
    if method not in REGISTRY:
        raise ExportError(f"{checkpoint} records an unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if REGISTRY[method].not_exported:
        kind = "baseline" if method in ("linear_probe",) else "checkpoint"
        raise ExportError(f"{checkpoint} is a {method} {kind}: {REGISTRY[method].not_exported}. Export a checkpoint "
                          f"of another method (e.g. --method nearl)")
    classifier, _ = load_classifier(checkpoint, pretrained=pretrained, backend="torch")
    model = classifier.model
    if not model.class_names:
        raise ExportError(f"{checkpoint} stores no class names: set classes before saving the checkpoint")
    head = classifier.head if isinstance(classifier.head, torch.nn.Module) else None
    return model, {"intensity": resolve_policy(extra.get("intensity"), None, checkpoint),
                   "calibration": Calibration.from_dict(extra.get("calibration"), str(checkpoint)),
                   "head": head, "method": method}


def export_checkpoint(checkpoint, out_path, *, pretrained: Optional[str] = None, **options):
    """Export a checkpoint's model (see load_exportable) with its recorded intensity policy, calibration and
    sha256; options go to export_model. Returns (path, model)."""
    from nearl_rt.checkpoint import checkpoint_sha256
    model, recorded = load_exportable(checkpoint, pretrained)
    path = export_model(model, out_path, checkpoint_sha256=checkpoint_sha256(checkpoint), **recorded, **options)
    return path, model


def main(argv=None) -> int:
    from nearl_rt.checkpoint import checkpoint_sha256
    from nearl_rt.core.cli import log_to_stderr
    parser = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a nearl-rt checkpoint (nearl_rt.save_checkpoint) or save-pretrained folder")
    parser.add_argument("-o", "--output", help="output .onnx file (default: next to CKPT with .onnx)")
    parser.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--fp16", action="store_true", help="float16 model; input and outputs stay float32")
    parser.add_argument("--optimize", action="store_true", help="store onnxruntime's offline-optimised graph")
    parser.add_argument("--fused", action="store_true",
                        help="the graph onnxruntime's CPU provider runs fastest: the towers' blocks as its fused "
                             "transformer ops (Attention, SkipLayerNormalization, BiasGelu); float32 and int8 "
                             "(docs/export.md#cpu-serving)")
    parser.add_argument("--batch-size", default="dynamic", help="'dynamic' (default) or a fixed batch size")
    parser.add_argument("--pretrained", help="the backbone weights file or download folder on this machine (if it moved)")
    parser.add_argument("--preprocess", action="store_true",
                        help="also write OUT.preprocess.onnx: uint8 images of any size -> the model's input "
                             "(nearl_rt/export/preprocess_graph.py; for C++ and other clients without Pillow)")
    add_int8_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".onnx")
    _parse_batch_size(args.batch_size)  # fail on a bad option before loading anything
    gates = check_int8_arguments(args)
    log_to_stderr("nearl_rt.export")  # onnx, quantize, preprocess_graph
    if args.int8:
        model, recorded = load_exportable(args.checkpoint, args.pretrained)
        paths = export_int8(model, args, gates, checkpoint_sha256(args.checkpoint), recorded)
    else:
        model, recorded = load_exportable(args.checkpoint, args.pretrained)
        options = dict(opset=args.opset, fp16=args.fp16, optimize=args.optimize, batch_size=args.batch_size,
                       fused=args.fused, checkpoint_sha256=checkpoint_sha256(args.checkpoint), **recorded)
        extra = ""
        if args.openvino_bf16:
            with atomic_output(_output_file(out)) as tmp:  # kept only once bf16 passed its gates
                export_model(model, tmp, **options)
                extra = f"; OpenVINO bf16: {_record_openvino_bf16(tmp, model, args, gates, recorded)}"
        else:
            export_model(model, out, **options)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {model.interaction}, "
              f"{len(model.class_names)} {'findings' if model.multi_label else 'classes'}{extra})")
        paths = [out]
    if args.preprocess:
        from nearl_rt.export.preprocess_graph import export_preprocess_graph
        for path in paths:
            print(f"wrote {export_preprocess_graph(path)}")
    return 0


def add_int8_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("int8 (CPU serving; see docs/int8.md)")
    g.add_argument("--int8", action="store_true",
                   help="also write CKPT.int8.onnx, quantised (dynamic int8 weights; static QDQ with --calibrate). "
                        "With -o, only the int8 file is written there")
    g.add_argument("--calibrate", metavar="DATA", help="static int8: calibrate activation ranges on images of this "
                   "dataset (folder, split .json or .npz with the model's classes); a held-out part verifies")
    g.add_argument("--verify-data", metavar="DATA", help="labelled images to verify the int8 model on (default: the "
                   "held-out part of --calibrate, else random inputs)")
    g.add_argument("--image-root", help="folder a split JSON's paths are relative to")
    g.add_argument("--data-split", help="split of DATA to draw images from (default: train, else the only one)")
    g.add_argument("--calibration-count", type=int, default=128, help="calibration images (default 128)")
    g.add_argument("--verify-count", type=int, default=128, help="verification images drawn from data (default 128)")
    g.add_argument("--min-agreement", type=float, default=99.0, help="gate: %% of images whose top-1 class the int8 "
                   "model keeps (default 99)")
    g.add_argument("--max-accuracy-change", type=float, default=0.5, help="gate: |delta accuracy| in points, with "
                   "labelled images (default 0.5)")
    g.add_argument("--max-prob-diff", type=float, help="gate: max |delta prob| (default: reported, not gated)")
    g.add_argument("--openvino-bf16", action="store_true",
                   help="verify the float32 file under OpenVINO's bf16 inference against its float32 results through "
                        "these gates and record it (nearl.runtime_precisions), so that NearlSession(runtime='openvino', "
                        "precision='bf16') serves it; a miss writes nothing (docs/export.md#cpu-serving)")


def check_int8_arguments(args):
    """The gates of --int8 / --openvino-bf16, after refusing inconsistent combinations (before anything is loaded)."""
    from nearl_rt.export.quantize import MIN_CALIBRATION_IMAGES, MIN_VERIFICATION_IMAGES, Gates
    if args.openvino_bf16 and (args.int8 or args.fp16):
        raise ExportError("--openvino-bf16 verifies the float32 file: export it without --int8 / --fp16")
    if args.calibrate and not args.int8:
        raise ExportError("--calibrate applies to int8 models: add --int8")
    if not (args.int8 or args.openvino_bf16):
        if args.verify_data:
            raise ExportError("--verify-data applies to int8 models and --openvino-bf16: add one of them")
        return None
    if args.fp16:
        raise ExportError("--int8 and --fp16 exclude each other: int8 quantises the fp32 model (drop --fp16)")
    for name in ("calibration_count", "verify_count"):
        if getattr(args, name) < 1:
            raise ExportError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.calibrate and args.calibration_count < MIN_CALIBRATION_IMAGES:
        raise ExportError(f"--calibration-count {args.calibration_count}: static int8 needs at least "
                          f"{MIN_CALIBRATION_IMAGES} calibration images")
    if (args.calibrate or args.verify_data) and args.verify_count < MIN_VERIFICATION_IMAGES:
        raise ExportError(f"--verify-count {args.verify_count}: the int8 gates need at least "
                          f"{MIN_VERIFICATION_IMAGES} verification images")
    return Gates(min_agreement=args.min_agreement / 100.0, max_accuracy_change=args.max_accuracy_change,
                 max_prob_diff=args.max_prob_diff)


def _gate_images(model, args, recorded: dict):
    """The verification images of --verify-data (labelled), or None (random inputs)."""
    from nearl_rt.export.quantize import images_from_dataset
    if not args.verify_data:
        return None
    verification, = images_from_dataset(args.verify_data, model.class_names, model.preprocess_cfg,
                                        counts=(args.verify_count,), seed=1, split=args.data_split,
                                        image_root=args.image_root, intensity=recorded["intensity"])
    return verification


def _record_openvino_bf16(path: Path, model, args, gates, recorded: dict) -> str:
    """--openvino-bf16: verify and record (nearl_rt.export.quantize.verify_runtime_precision); one line of figures."""
    from nearl_rt.export.quantize import verify_runtime_precision
    report = verify_runtime_precision(path, "openvino", "bf16", _gate_images(model, args, recorded), gates)
    line = (f"top-1 agreement {100 * report['top1_agreement']:.1f}%, max |delta prob| "
            f"{report['max_abs_prob_diff']:.4f} on {report['images']} {report['source']} images")
    if "accuracy" in report:
        line += f", accuracy {100 * report['accuracy']['fp32']:.2f}% -> {100 * report['accuracy']['bf16']:.2f}%"
    return line


def export_int8(model, args, gates, checkpoint_sha256: str, recorded: dict) -> list[Path]:
    """--int8: the verified fp32 export (kept next to the checkpoint unless -o names the int8 file), then
    its quantised version (its graph, temperature included, and metadata come from the fp32 one), verified
    against it. `recorded`: load_exportable's intensity policy and calibration. Returns the files written."""
    from nearl_rt.export.quantize import images_from_dataset, quantize
    draw = dict(split=args.data_split, image_root=args.image_root, intensity=recorded["intensity"])
    calibration = verification = None
    if args.calibrate:
        calibration, verification = images_from_dataset(args.calibrate, model.class_names, model.preprocess_cfg,
                                                        counts=(args.calibration_count, args.verify_count), **draw)
    if args.verify_data:
        verification = _gate_images(model, args, recorded)
    ckpt = Path(args.checkpoint)
    int8 = Path(args.output) if args.output else ckpt.with_suffix(".int8.onnx")
    fp32 = None if args.output else ckpt.with_suffix(".onnx")
    for path in (int8, fp32):
        if path is not None and not path.resolve().parent.is_dir():
            raise ExportError(f"cannot write {path}: directory {path.parent} does not exist")
    # Both files are made in a scratch folder beside the output and kept only once the int8 one passed.
    with tempfile.TemporaryDirectory(prefix=".nearl-int8-", dir=int8.resolve().parent) as scratch:
        tmp_fp32, tmp_int8 = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        export_model(model, tmp_fp32, opset=args.opset, optimize=args.optimize, batch_size=args.batch_size,
                     checkpoint_sha256=checkpoint_sha256, fused=args.fused, **recorded)
        method = "static" if calibration is not None else "dynamic"
        report = quantize(tmp_fp32, tmp_int8, method=method, calibration=calibration, verification=verification,
                          gates=gates)
        if fp32 is not None:
            tmp_fp32.replace(fp32)
            print(f"wrote {fp32} ({fp32.stat().st_size / 2**20:.1f} MiB, fp32)")
        tmp_int8.replace(int8)
    line = (f"top-1 agreement {100 * report['top1_agreement']:.1f}%, max |delta prob| "
            f"{report['max_abs_prob_diff']:.4f} on {report['images']} {report['source']} images")
    if "accuracy" in report:
        line += f", accuracy {100 * report['accuracy']['fp32']:.2f}% -> {100 * report['accuracy']['int8']:.2f}%"
    print(f"wrote {int8} ({int8.stat().st_size / 2**20:.1f} MiB, int8 {method}, {model.interaction}, "
          f"{len(model.class_names)} {'findings' if model.multi_label else 'classes'}; {line})")
    return [p for p in (fp32, int8) if p is not None]


if __name__ == "__main__":
    from nearl_rt.core.cli import run_cli
    sys.exit(run_cli(main, prog="python -m export.onnx"))
