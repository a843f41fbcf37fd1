"""int8 export (nearl_rt.export.quantize, `python -m export.onnx CKPT --int8`): dynamic and static QDQ in both modes,
the nodes kept in float32, the verification gates, metadata, the CLI and its bad input."""
import json
import re

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import nearl_rt.export.onnx as export_onnx
import nearl_rt
from nearl_rt.core.imaging import IntensityPolicy
from nearl_rt.core.metadata import read_metadata
from nearl_rt.export.quantize import Gates, ImageSet, QuantizationError, fp32_matmuls, quantize
from nearl_rt.core.session import NearlSession
from nearl_rt.core.cli import run_cli
from tests.export_cases import exported, exported_int8, tiny_model
from tests.helpers import perturb_adapters, tiny

MODES = ["bidirectional", "text_cacheable"]
LOOSE = Gates(min_agreement=0.0, max_accuracy_change=100.0)


def random_images(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


def probs(path, images):
    return NearlSession(path, providers=["CPUExecutionProvider"]).run(images)[1]


def probs_raw(path, images):
    """probs of a file without nearl.* metadata (bench/frozen_clip's export)."""
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probs"], {"images": images})[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_int8_close_to_fp32_with_fp32_logits_path(mode, method, tmp_path):
    """int8 rounds every weight to 1/127 of its tensor's range (relative error ~0.4% per weight, more per
    activation range): the tiny model's probabilities move by ~1e-2, far below what would flip a confident
    class; 0 would mean nothing was quantised."""
    src, out = exported(mode), tmp_path / "m.int8.onnx"
    calibration = ImageSet(random_images(32, 1), source="random calibration") if method == "static" else None
    report = quantize(src, out, method=method, calibration=calibration, gates=LOOSE)
    q = onnx.load(str(out))
    ops = [n.op_type for n in q.graph.node]
    assert ("MatMulInteger" in ops) if method == "dynamic" else ("QuantizeLinear" in ops and "DequantizeLinear" in ops)
    # The last MatMul before the logits on every path stays float32, and is found again in the int8 graph.
    kept = fp32_matmuls(onnx.load(str(src)))
    assert kept and {n.name: n.op_type for n in q.graph.node if n.name in kept} == {k: "MatMul" for k in kept}
    # Float-only reductions of the OCA split and softmax are not quantised: no QuantizeLinear feeds them.
    quantized_outputs = {o for n in q.graph.node if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")
                         for o in n.output}
    assert not [n.name for n in q.graph.node if n.op_type in ("Div", "ReduceSum", "Softmax", "Sub")
                and quantized_outputs.intersection(n.input)]
    meta = read_metadata(out)
    assert meta["precision"] == "int8" and meta["class_names"] == read_metadata(src)["class_names"]
    quant = meta["quantization"]
    assert quant["method"] == method and quant["fp32_nodes"] == kept
    assert quant["verification"]["top1_agreement"] == report["top1_agreement"]
    if method == "static":
        assert quant["calibration"] == {"source": "random calibration", "count": 32, "method": "MinMax",
                                        "images_sha256": calibration.fingerprint()}
    images = random_images(5, 2)
    diff = np.abs(probs(out, images) - probs(src, images)).max()
    assert 1e-6 < diff < 0.1
    assert out.stat().st_size < src.stat().st_size


def test_frozen_clip_is_quantised_the_same_way(tmp_path):
    """bench/latency.py's int8 floor: frozen CLIP through quantize_graph keeps its own last MatMul before
    logits in float32, as the NEARL file does, and has its weight matmuls in int8."""
    from nearl_rt.bench.frozen_clip import export_frozen_clip
    from nearl_rt.export.quantize import quantize_graph
    src, dst = export_frozen_clip(tiny_model("text_cacheable"), tmp_path / "frozen.onnx"), tmp_path / "frozen.int8.onnx"
    kept = quantize_graph(src, dst)
    assert kept == fp32_matmuls(onnx.load(str(src))) and len(kept) == 1
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert "MatMulInteger" in ops and kept[0] in {n.name for n in onnx.load(str(dst)).graph.node}
    x = random_images(8, 2)
    assert np.abs(probs_raw(dst, x) - probs_raw(src, x)).max() < 0.05


def test_dynamic_int8_depends_on_the_batch_static_does_not():
    """Dynamic int8 quantises each activation tensor with its own range, taken over the whole batch, so an
    image's probabilities move with the other images of its batch (measured here ~3e-3); static int8 (fixed
    calibrated ranges) and fp32 give each image the same result alone or in a batch of 8."""
    x = random_images(8, 3)
    for path, bound in ((exported("text_cacheable"), 1e-6), (exported_int8("text_cacheable", "static"), 1e-6)):
        session = NearlSession(path, providers=["CPUExecutionProvider"])
        alone = np.concatenate([session.run(x[i:i + 1])[1] for i in range(len(x))])
        assert np.abs(session.run(x)[1] - alone).max() <= bound, path
    session = NearlSession(exported_int8("text_cacheable"), providers=["CPUExecutionProvider"])
    alone = np.concatenate([session.run(x[i:i + 1])[1] for i in range(len(x))])
    assert np.abs(session.run(x)[1] - alone).max() > 1e-4


def test_triton_repository_takes_an_int8_export(tmp_path):
    """export.triton writes and checks a repository from an int8 file as from its fp32 source: same signature
    (the int8 graph keeps the float32 images input and logits/probs outputs), the file copied unchanged."""
    from nearl_rt.serving.triton_repository import Options, check_model_dir, parse_config, write_repository
    q = exported_int8("text_cacheable")
    model_dir = write_repository(q, tmp_path / "repo", Options(gpu=False))
    ref_dir = write_repository(exported("text_cacheable"), tmp_path / "ref", Options(gpu=False))
    assert (model_dir / "1" / "model.onnx").read_bytes() == q.read_bytes()
    check_model_dir(model_dir)
    got, ref = parse_config(model_dir / "config.pbtxt"), parse_config(ref_dir / "config.pbtxt")
    assert list(got.input) == list(ref.input) and list(got.output) == list(ref.output)


def test_static_calibration_is_deterministic(tmp_path):
    calibration = ImageSet(random_images(24, 3))
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for path in (a, b):
        quantize(exported("text_cacheable"), path, method="static", calibration=calibration, gates=LOOSE)
    images = random_images(4, 4)
    np.testing.assert_array_equal(probs(a, images), probs(b, images))


def test_gates_loose_passes_impossible_refuses(tmp_path):
    src = exported("bidirectional")
    ok = tmp_path / "ok.onnx"
    quantize(src, ok, gates=Gates(min_agreement=0.5, max_prob_diff=0.5))
    assert ok.is_file()
    bad = tmp_path / "bad.onnx"
    with pytest.raises(QuantizationError, match=r"max \|delta prob\| 0\.\d+ > 0\.0000.*not written"):
        quantize(src, bad, gates=Gates(max_prob_diff=0.0))
    labels = np.arange(64) % 3
    # Labels on which the two models disagree in accuracy by more than 0 points are impossible to pass at 0,
    # unless both are exactly equal: a gate of -1 is refused up front, a gate of 100 passes.
    with pytest.raises(ValueError, match="max_accuracy_change"):
        Gates(max_accuracy_change=-1)
    verified = ImageSet(random_images(64, 5), labels, "labelled")
    report = quantize(src, tmp_path / "labelled.onnx", verification=verified, gates=LOOSE)
    assert set(report["accuracy"]) == {"fp32", "int8", "change_points"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled.onnx", "ok.onnx"]


def test_api_refuses_fp16_and_too_few_images(tmp_path):
    with pytest.raises(QuantizationError, match="fp16 model.*without --fp16"):
        quantize(exported("text_cacheable", fp16=True), tmp_path / "q.onnx")
    with pytest.raises(QuantizationError, match="only 8 calibration images.*at least 16"):
        quantize(exported("text_cacheable"), tmp_path / "q.onnx", method="static",
                 calibration=ImageSet(random_images(8, 0)))
    with pytest.raises(QuantizationError, match="static int8 needs calibration images"):
        quantize(exported("text_cacheable"), tmp_path / "q.onnx", method="static")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def pneumonia_ckpt(tmp_path_factory):
    torch.manual_seed(4)  # the random backbone: module fixtures run before conftest's per-test seed
    model = perturb_adapters(tiny("text_cacheable", backend="torch"), seed=4).eval()
    model.set_classes(["normal", "pneumonia"], "a chest x-ray showing {}.")
    return nearl_rt.save_checkpoint(model, tmp_path_factory.mktemp("int8") / "tiny.pt")


def _cli(capsys, *argv):
    code = run_cli(export_onnx.main, list(map(str, argv)), prog="python -m export.onnx")
    return code, capsys.readouterr()


def test_cli_static_int8_on_real_xrays(pneumonia_ckpt, pneumonia_npz, capsys):
    code, out = _cli(capsys, pneumonia_ckpt, "--int8", "--calibrate", pneumonia_npz, "--calibration-count", 32,
                     "--verify-count", 32, "--min-agreement", 90, "--max-accuracy-change", 10)
    assert code == 0, out.err
    fp32, int8 = pneumonia_ckpt.with_suffix(".onnx"), pneumonia_ckpt.with_suffix(".int8.onnx")
    assert f"wrote {fp32}" in out.out and f"wrote {int8}" in out.out and "accuracy" in out.out
    quant = read_metadata(int8)["quantization"]
    assert quant["method"] == "static" and quant["calibration"]["count"] == 32
    assert str(pneumonia_npz) in quant["calibration"]["source"]
    ver = quant["verification"]
    assert ver["images"] == 32 and ver["top1_agreement"] >= 0.9 and "accuracy" in ver
    session = NearlSession(int8, providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).integers(0, 256, (40, 52), dtype=np.uint8)
    (top,), = session.predict([image], top_k=1)
    assert top[0] in ("normal", "pneumonia")
    assert not [p for p in pneumonia_ckpt.parent.iterdir() if p.name.startswith(".nearl-int8-")]


def test_cli_dynamic_int8_with_output_writes_only_int8(pneumonia_ckpt, tmp_path, capsys):
    out_path = tmp_path / "served.onnx"
    code, out = _cli(capsys, pneumonia_ckpt, "--int8", "-o", out_path, "--min-agreement", 90)
    assert code == 0, out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served.onnx"]
    meta = read_metadata(out_path)
    assert meta["precision"] == "int8" and meta["quantization"]["method"] == "dynamic"
    assert meta["quantization"]["verification"]["source"] == "random"


def test_cli_int8_keeps_intensity_policy_and_writes_its_preprocess_graph(tmp_path, capsys):
    """A model trained on 16-bit images with a non-default intensity policy: its int8 file records that policy
    (NearlSession applies it) and --preprocess writes the int8 file's own preprocessing graph."""
    torch.manual_seed(5)
    model = perturb_adapters(tiny("text_cacheable", backend="torch"), seed=5).eval()
    model.set_classes(["normal", "pneumonia"], "a chest x-ray showing {}.")
    policy = IntensityPolicy.parse("percentile:1,99")
    ckpt = nearl_rt.save_checkpoint(model, tmp_path / "m16.pt", extra={"intensity": policy.to_dict()})
    out_path = tmp_path / "m16.int8.onnx"
    code, out = _cli(capsys, ckpt, "--int8", "-o", out_path, "--min-agreement", 90, "--preprocess")
    assert code == 0, out.err
    assert IntensityPolicy.from_dict(read_metadata(out_path)["intensity"]) == policy
    assert NearlSession(out_path, providers=["CPUExecutionProvider"]).intensity == policy
    pillow, graph = (NearlSession(out_path, providers=["CPUExecutionProvider"], preprocess=p)
                     for p in ("pillow", "onnx"))
    image = np.random.default_rng(1).integers(0, 65536, (37, 45), dtype=np.uint16)
    a, b = pillow.preprocess([image]), graph.preprocess([image])
    assert np.abs(a - b).max() <= 1 / 255 / min(pillow.metadata["std"]) + 1e-6  # at most one uint8 step


def _folder(root, classes, per_class):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_cli_bad_inputs(pneumonia_ckpt, tmp_path, capsys):
    other = _folder(tmp_path / "other", ["cat", "dog"], 2)
    small = _folder(tmp_path / "small", ["normal", "pneumonia"], 10)
    out = tmp_path / "out"
    out.mkdir()
    cases = [(("--int8", "--fp16"), "exclude each other"),
             (("--calibrate", small), "applies to int8 models: add --int8"),
             (("--int8", "--calibrate", other), r"classes \['cat', 'dog'\].*model's own class set"),
             (("--int8", "--calibrate", small), r"has 20 images; 256 are needed"),
             (("--int8", "--calibrate", small, "--calibration-count", 8), "needs at least 16 calibration images"),
             (("--int8", "--verify-data", small, "--verify-count", 4), "need at least 16 verification images"),
             (("--int8", "--calibration-count", 0), "--calibration-count must be >= 1"),
             (("--int8", "--max-prob-diff", 0, "-o", out / "m.onnx"), r"misses its verification gates.*not written"),
             (("--int8", "--min-agreement", 120), "min_agreement")]
    for argv, match in cases:
        code, res = _cli(capsys, pneumonia_ckpt, *argv)
        # The gate case exports the fp32 model first (its verification is logged); the error is one last line.
        lines = [ln for ln in res.err.strip().splitlines() if not ln.startswith("verified ")]
        assert code == 2 and len(lines) == 1 and re.search(match, lines[0]), (argv, res.err)
    assert list(out.iterdir()) == []


def _evaluate(capsys, model_path, data, tmp_path, name):
    from nearl_rt import evaluate
    out = tmp_path / f"{name}.json"
    code = run_cli(evaluate.main, [str(model_path), "--data", str(data), "--split", "test", "--limit", "24",
                                   "--json", str(out), "--device", "cpu", "--backend", "torch"])
    assert code == 0, capsys.readouterr().err
    return json.loads(out.read_text())["results"][str(model_path)]


def test_evaluate_scores_onnx_files_like_their_checkpoint(pneumonia_ckpt, pneumonia_npz, tmp_path, capsys):
    """The same 24 real test X-rays through the checkpoint (PyTorch) and through its fp32 export
    (onnxruntime, summation order only: <= 1e-5 on the metrics' inputs), then its int8 export, whose
    accuracy must stay within the export's default gate of the fp32 file's on images it never saw."""
    fp32 = tmp_path / "m.onnx"
    assert run_cli(export_onnx.main, [str(pneumonia_ckpt), "-o", str(fp32)]) == 0
    int8 = tmp_path / "m.int8.onnx"
    assert run_cli(export_onnx.main, [str(pneumonia_ckpt), "--int8", "-o", str(int8), "--min-agreement", "90"]) == 0
    ref = _evaluate(capsys, pneumonia_ckpt, pneumonia_npz, tmp_path, "ckpt")
    got = _evaluate(capsys, fp32, pneumonia_npz, tmp_path, "fp32")
    q = _evaluate(capsys, int8, pneumonia_npz, tmp_path, "int8")
    assert got["method"] == "onnx (fp32)" and q["method"] == "onnx (int8)"
    for key in ("accuracy", "macro_f1", "auc", "balanced_accuracy"):
        assert abs(got[key] - ref[key]) <= 1e-5, key
    assert got["confusion_matrix"] == ref["confusion_matrix"]
    assert abs(q["accuracy"] - got["accuracy"]) <= 1 / 24 + 1e-9  # at most one of 24 images changes class
