"""The evaluation preprocessing of nearl_rt/core/preprocess.py as a standard opset-18 ONNX graph, for clients
without Pillow (the C++ library, `NearlSession(preprocess="onnx")`, a Triton ensemble).

    python -m export.preprocess_graph model.onnx     # writes model.preprocess.onnx next to it
    python -m export.onnx CKPT --preprocess           # the same, right after the export

Input `image` uint8 [1, H, W, C] (any H, W; C = 3 RGB, or 1 grayscale, expanded as Pillow's
convert("RGB") does) -> output `images` float32 [1, 3, S, S], the classifier's input:
shorter side to S (Resize cubic, a = -0.5, antialias, exclude_outside, half_pixel on uint8: onnxruntime's
uint8 antialias kernel is Pillow's fixed-point two-pass algorithm) -> centre crop (Pillow's rounding)
-> / 255 -> (x - mean) / std. The graph records the classifier it belongs to by sha256 and is
verified against nearl_rt/core/preprocess.py before it is kept (PREPROCESS_TOLERANCE).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nearl_rt.core.atomic import atomic_output
from nearl_rt.core.hashing import sha256_file
from nearl_rt.core.imaging import load_image
from nearl_rt.core.metadata import (PREPROCESS_KIND, classifier_metadata, preprocess_graph_path, read_metadata,
                                    write_metadata)
from nearl_rt.core.preprocess import preprocess_image

log = logging.getLogger("nearl_rt.export.preprocess_graph")  # by name: also when run as __main__

OPSET = 18  # opset-19+ Resize lacks a CUDA kernel in older onnxruntime builds
# Pillow and onnxruntime round the same fixed-point sums but not always to the same side of .5 (the
# 8-bit intermediate between the two passes carries that on): at most one uint8 step, on at most this
# share of the values; the classifier's probabilities then move by ~1e-7, bounded by PROBS_ATOL.
MAX_STEPS, MAX_SHARE, PROBS_ATOL = 1, 0.005, 1e-5


class PreprocessGraphError(ValueError):
    """The preprocessing graph cannot be built, or it does not reproduce nearl_rt/core/preprocess.py."""


def build_preprocess_graph(size: int, mean: Sequence[float], std: Sequence[float], *,
                           interpolation: str = "bicubic", resize_mode: str = "shortest",
                           classifier_sha256: str = "") -> onnx.ModelProto:
    """uint8 [1, H, W, 1|3] -> float32 [1, 3, size, size], as nearl_rt.core.preprocess.preprocess_image."""
    if interpolation != "bicubic" or resize_mode != "shortest":
        raise PreprocessGraphError(f"interpolation={interpolation!r}, resize_mode={resize_mode!r}: the preprocessing "
                                   f"graph reproduces Pillow's bicubic shortest-side resize only")
    if not isinstance(size, int) or size < 1:
        raise PreprocessGraphError(f"size={size!r}: the preprocessing graph needs a square int input size")
    if len(mean) != 3 or len(std) != 3:
        raise PreprocessGraphError(f"mean={list(mean)}, std={list(std)}: need three values each")

    def const(name, value, dtype):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    inits = [const("rgb_shape", [1, 1, 1, 3], np.int64), const("size", [size], np.int64),
             const("two", [2.0], np.float32), const("two_i", [2], np.int64), const("hw_start", [1], np.int64), const("hw_end", [3], np.int64),
             const("crop_axes", [2, 3], np.int64), const("u8_max", [255.0], np.float32),
             const("mean", np.reshape(mean, (1, 3, 1, 1)), np.float32),
             const("std", np.reshape(std, (1, 3, 1, 1)), np.float32)]
    N = helper.make_node
    resize = dict(mode="cubic", cubic_coeff_a=-0.5, antialias=1, exclude_outside=1,
                  coordinate_transformation_mode="half_pixel")

    def passes(name, order):
        """Resize `nchw` along one axis, then the other (a subgraph of the If below)."""
        (first, axis1), (second, axis2) = order
        return helper.make_graph(
            [N("Resize", ["nchw", "", "", first], [f"{name}_half"], axes=[axis1], **resize),
             N("Resize", [f"{name}_half", "", "", second], [f"{name}_out"], axes=[axis2], **resize)],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.UINT8, None)])

    nodes = [
        N("Expand", ["image", "rgb_shape"], ["rgb"]),  # C = 1 -> 3 (gray replicated); C = 3 unchanged
        N("Transpose", ["rgb"], ["nchw"], perm=[0, 3, 1, 2]),
        N("Shape", ["rgb"], ["shape"]),
        N("Slice", ["shape", "hw_start", "hw_end"], ["hw"]),
        N("ReduceMin", ["hw"], ["short"], keepdims=1),
        # int(size * long / short) == size * long // short for positive ints (no float rounding)
        N("Mul", ["hw", "size"], ["hw_scaled"]),
        N("Div", ["hw_scaled", "short"], ["new_hw"]),
        # Two 1-D passes through a uint8 intermediate, in Pillow's order (the order changes the rounding
        # and clipping of the intermediate: up to 24 steps on tall images). Pillow 13 resamples vertically
        # first when the height shrinks and the image is more than twice as tall as wide (measured on
        # 500+ proportional resizes), else horizontally first.
        N("Split", ["hw"], ["h", "w"], axis=0, num_outputs=2),
        N("Split", ["new_hw"], ["new_h", "new_w"], axis=0, num_outputs=2),
        N("Less", ["new_h", "h"], ["h_shrinks"]),
        N("Mul", ["w", "two_i"], ["twice_w"]),
        N("Greater", ["h", "twice_w"], ["tall"]),
        N("And", ["h_shrinks", "tall"], ["vertical_first"]),
        N("If", ["vertical_first"], ["resized"],
          then_branch=passes("vertical_first", [("new_h", 2), ("new_w", 3)]),
          else_branch=passes("horizontal_first", [("new_w", 3), ("new_h", 2)])),
        # top/left = round((new - size) / 2), half to even like Python's round (and ONNX Round)
        N("Sub", ["new_hw", "size"], ["margin"]),
        N("Cast", ["margin"], ["margin_f"], to=TensorProto.FLOAT),
        N("Div", ["margin_f", "two"], ["half_margin"]),
        N("Round", ["half_margin"], ["start_f"]),
        N("Cast", ["start_f"], ["start"], to=TensorProto.INT64),
        N("Add", ["start", "size"], ["end"]),
        N("Slice", ["resized", "start", "end", "crop_axes"], ["cropped"]),
        N("Cast", ["cropped"], ["pixels"], to=TensorProto.FLOAT),
        # the same float32 operations, in the same order, as preprocess_image
        N("Div", ["pixels", "u8_max"], ["unit"]),
        N("Sub", ["unit", "mean"], ["centred"]),
        N("Div", ["centred", "std"], ["images"]),
    ]
    graph = helper.make_graph(
        nodes, "nearl_preprocess",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, "height", "width", "channels"])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 8  # opset 18's IR; readable by onnxruntime >= 1.14
    from nearl_rt import __version__
    write_metadata(proto, {"kind": PREPROCESS_KIND, "input_size": [size, size], "mean": [float(v) for v in mean],
                           "std": [float(v) for v in std], "interpolation": interpolation, "resize_mode": resize_mode,
                           "classifier_sha256": classifier_sha256, "nearl_rt_version": __version__, "opset": OPSET},
                   doc="NEARL-CLIP preprocessing: uint8 [1,H,W,1|3] -> normalised [1,3,S,S]")
    return proto


def _check_images(seed: int, size: int) -> list[np.ndarray]:
    """Random uint8 images of odd sizes around `size`: smaller and larger, portrait and landscape, 1-pixel
    strips, gray; smooth gradients plus noise (pure noise is not an image, flat colour tests nothing)."""
    rng = np.random.default_rng(seed)
    shapes = [(size + 37, 2 * size + 11), (3 * size + 5, size + 2), (size // 2 + 3, size // 3 + 2), (size, size),
              (size + 1, size), (1, size + 13), (2 * size + 3, 1), (97, 1000), (size - 1, 5 * size // 2 + 1)]
    out = []
    for i, (h, w) in enumerate(shapes):
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        phase = rng.uniform(0, 6.3, 3)
        smooth = np.stack([np.sin(6 * xx + 4 * yy + p) for p in phase], -1) * 90 + 128
        img = np.clip(smooth + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append(img[:, :, :1] if i == 2 else img)  # one grayscale [H, W, 1] image
    return out


def verify_preprocess_graph(path, classifier_path=None, *, seed: int = 0, probs_atol: Optional[float] = None) -> dict:
    """The graph at `path` vs nearl_rt.core.preprocess on random images of odd sizes (<= MAX_STEPS uint8 steps on
    <= MAX_SHARE of the values) and, given the classifier, end to end (probabilities within probs_atol,
    default PROBS_ATOL).
    Returns {"max_steps", "max_share", "probs"} (worst cases); raises PreprocessGraphError."""
    import onnxruntime as ort
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise PreprocessGraphError(f"the preprocessing graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    meta = read_preprocess_metadata(path)
    size, mean, std = meta["input_size"][0], meta["mean"], meta["std"]
    pre = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    step = 1.0 / 255.0 / np.asarray(std, np.float32).reshape(3, 1, 1)  # one uint8 step, normalised
    probs_atol = PROBS_ATOL if probs_atol is None else probs_atol
    result = {"max_steps": 0.0, "max_share": 0.0, "probs": 0.0}
    graph_batch, pillow_batch = [], []
    for img in _check_images(seed, size):
        got = pre.run(["images"], {"image": img[None]})[0][0]
        want = preprocess_image(load_image(img), size, mean, std)
        steps = np.abs(got - want) / step
        share = float((steps > 1e-3).mean())
        result["max_steps"] = max(result["max_steps"], float(steps.max()))
        result["max_share"] = max(result["max_share"], share)
        h, w = img.shape[:2]
        log.debug("preprocess %dx%d: max %.3f steps, %.4f%% of values differ", w, h, steps.max(), 100 * share)
        if steps.max() > MAX_STEPS + 1e-3 or share > MAX_SHARE:
            raise PreprocessGraphError(
                f"the preprocessing graph disagrees with nearl_rt.core.preprocess on a {w}x{h} image: max {steps.max():.2f} "
                f"uint8 steps, {100 * share:.3f}% of values differ (allowed {MAX_STEPS} step on {100 * MAX_SHARE}%)")
        graph_batch.append(got)
        pillow_batch.append(want)
    if classifier_path is not None:
        cls = ort.InferenceSession(str(classifier_path), providers=["CPUExecutionProvider"])
        fixed = cls.get_inputs()[0].shape[0]
        for a, b in zip(_chunks(np.stack(graph_batch), fixed), _chunks(np.stack(pillow_batch), fixed)):
            pa, pb = (cls.run(["probs"], {"images": x})[0] for x in (a, b))
            result["probs"] = max(result["probs"], float(np.abs(pa - pb).max()))
        if not result["probs"] <= probs_atol:
            raise PreprocessGraphError(f"probabilities through the preprocessing graph differ from nearl_rt.core.preprocess's "
                                       f"by {result['probs']:.3g} > {probs_atol}")
    return result


def _chunks(batch: np.ndarray, fixed) -> list[np.ndarray]:
    """Whole batch for a dynamic classifier; zero-padded chunks of `fixed` for a fixed-batch one."""
    if not isinstance(fixed, int):
        return [batch]
    pad = -len(batch) % fixed
    batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), np.float32)])
    return [batch[i:i + fixed] for i in range(0, len(batch), fixed)]


def read_preprocess_metadata(path) -> dict:
    """The nearl.* metadata of a preprocessing graph (JSON lists decoded); raises if it is not one."""
    meta = read_metadata(path)
    if meta.get("kind") != PREPROCESS_KIND:
        raise PreprocessGraphError(f"{path} is not a nearl preprocessing graph (no nearl.kind = {PREPROCESS_KIND!r} "
                                   f"metadata)")
    return meta


def export_preprocess_graph(classifier_path, out_path=None, *, verify: bool = True,
                            probs_atol: Optional[float] = None) -> Path:
    """Write the preprocessing graph of the exported classifier at `classifier_path` (default
    preprocess_graph_path(classifier_path)), atomically; verified unless verify=False (probs_atol: see
    verify_preprocess_graph)."""
    classifier_path = Path(classifier_path)
    if not classifier_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {classifier_path} (export one with `python -m export.onnx CKPT`)")
    meta = classifier_metadata(classifier_path, classifier_path)
    h, w = meta["input_size"]
    if h != w:
        raise PreprocessGraphError(f"{classifier_path} has a non-square input size {h}x{w}: nearl_rt.core.preprocess "
                                   f"centre-crops squares only")
    proto = build_preprocess_graph(int(h), meta["mean"], meta["std"], interpolation=meta.get("interpolation", "bicubic"),
                                   resize_mode=meta.get("resize_mode", "shortest"),
                                   classifier_sha256=sha256_file(classifier_path))
    out_path = preprocess_graph_path(classifier_path) if out_path is None else Path(out_path)
    with atomic_output(out_path) as tmp:
        onnx.save(proto, tmp)
        if verify:
            # End to end through an int8 classifier would measure its quantisation, not the graph: dynamic
            # activation ranges turn a one-step pixel difference into ~1e-3 of probability. Its pixels are checked;
            # the int8 model itself was checked against its fp32 source by nearl_rt.export.quantize's gates.
            end_to_end = meta.get("precision") != "int8"
            r = verify_preprocess_graph(tmp, classifier_path if end_to_end else None, probs_atol=probs_atol)
            log.info("verified %s: max %.0f uint8 step on <= %.3f%% of values; %s", out_path.name, r["max_steps"],
                     100 * r["max_share"], f"probabilities within {r['probs']:.2g}" if end_to_end
                     else "pixels only (an int8 classifier)")
    return out_path


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.preprocess_graph", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an exported classifier (python -m export.onnx)")
    parser.add_argument("-o", "--output", help="output file (default: MODEL with .preprocess.onnx)")
    args = parser.parse_args(argv)
    from nearl_rt.core.cli import log_to_stderr
    log_to_stderr("nearl_rt.export")
    path = export_preprocess_graph(args.model, args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from nearl_rt.core.cli import run_cli
    sys.exit(run_cli(main, prog="python -m export.preprocess_graph"))
