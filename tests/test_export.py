"""python -m export.onnx / export_model: ORT equals PyTorch, fp16, metadata, offline optimisation, bad input."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import nearl_rt.export.onnx as export_onnx
import nearl_rt
from nearl_rt.core.metadata import read_metadata
from nearl_rt.export.onnx import ExportError, export_model
from nearl_rt.core.cli import run_cli
from nearl_rt.core.hashing import sha256_file
from tests.export_cases import TEMPLATE, exported, tiny_model
from tests.helpers import CLASSES, TINY_PRESETS, perturb_adapters, tiny

ROOT = Path(__file__).resolve().parents[1]
MODES = ["bidirectional", "text_cacheable"]


def ort_logits(path, images: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probs = session.run(["logits", "probs"], {"images": images.numpy()})
    return torch.from_numpy(logits), torch.from_numpy(probs)


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("mode", MODES)
def test_ort_matches_pytorch_fp32(mode, preset):
    """Batch 1 and an odd batch, fresh inputs (not the ones the export verified on). Both sides are
    float32; they differ only in summation order, ~1e-6 per op, far inside 1e-4 on logits of ~10.
    tiny_bert: the timm ViT and BERT layers with their key-padding mask, as BiomedCLIP exports."""
    model, path = tiny_model(mode, preset), exported(mode, preset=preset)
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(100 + batch))
        with torch.no_grad():
            ref = model.classify(images)
        logits, probs = ort_logits(path, images)
        assert logits.shape == (batch, len(CLASSES))
        assert (logits - ref).abs().max() <= 1e-4
        torch.testing.assert_close(probs, ref.softmax(-1), atol=1e-5, rtol=0)
        assert ref.std() > 1e-3  # the classes are really told apart (adapters are non-trivial)


@pytest.mark.parametrize("mode", MODES)
def test_fp16_within_tolerance_and_finite_on_large_inputs(mode):
    """fp16 weights/activations vs float32 PyTorch: float16's unit roundoff is 4.9e-4; over the tiny
    model's 2+2 layers the cosine moves by ~1e-3, i.e. ~0.05 on logits of scale exp(logit_scale)=14.3.
    Large-magnitude inputs (normalised images lie within about +-3; here up to 1e4) must not produce
    NaN/inf: the orthogonal split's reductions and LayerNorm's statistics run in float32."""
    model, path = tiny_model(mode), exported(mode, fp16=True)
    assert read_metadata(path)["precision"] == "fp16"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    assert {o.type for o in session.get_outputs()} == {"tensor(float)"}
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model.classify(images)
    logits, probs = ort_logits(path, images)
    err = (logits - ref).abs().max().item()
    assert 0 < err <= 0.05 + 0.01 * ref.abs().max().item()  # 0 would mean the file is not fp16 at all
    for magnitude in (1e2, 1e3, 1e4):
        big = images * magnitude
        logits, probs = ort_logits(path, big)
        assert torch.isfinite(logits).all() and torch.isfinite(probs).all(), magnitude
        with torch.no_grad():
            ref = model.classify(big)
        assert (logits - ref).abs().max() <= 0.05 + 0.01 * ref.abs().max(), magnitude
        torch.testing.assert_close(probs.sum(-1), torch.ones(3), atol=1e-3, rtol=0)


def test_metadata_round_trip():
    path = exported("bidirectional")
    meta = read_metadata(path)
    model = tiny_model("bidirectional")
    cfg = model.preprocess_cfg
    assert meta["class_names"] == CLASSES
    assert meta["template"] == TEMPLATE
    assert meta["interaction"] == "bidirectional"
    assert meta["input_size"] == [32, 32]
    np.testing.assert_allclose(meta["mean"], cfg["mean"]) and np.testing.assert_allclose(meta["std"], cfg["std"])
    assert meta["backbone"] == "nearl-tiny"
    assert meta["nearl_rt_version"] == nearl_rt.__version__
    assert meta["checkpoint_sha256"] == "ab" * 32
    assert meta["opset"] == str(export_onnx.DEFAULT_OPSET)
    assert meta["batch_size"] == "dynamic"
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits", "probs"]
    assert proto.opset_import[0].version == export_onnx.DEFAULT_OPSET
    assert read_metadata(exported("text_cacheable"))["interaction"] == "text_cacheable"


def test_fixed_batch_optimized_and_opset23():
    """--batch-size N gives a static batch axis; --optimize keeps metadata and results; opset 23's
    native Attention (with the USEformer's key-padding mask) runs in onnxruntime."""
    fixed = exported("text_cacheable", batch_size=2, optimize=True)
    session = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 32, 32]
    assert read_metadata(fixed)["batch_size"] == "2" and read_metadata(fixed)["class_names"] == CLASSES
    op23 = exported("bidirectional", opset=23)
    assert "Attention" in {n.op_type for n in onnx.load(str(op23)).graph.node}
    for mode, path, batch in (("text_cacheable", fixed, 2), ("bidirectional", op23, 3)):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ref = tiny_model(mode).classify(images)
        assert (ort_logits(path, images)[0] - ref).abs().max() <= 1e-4


def test_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx, "FP32_RMS_FACTOR", -1.0)
    with pytest.raises(ExportError, match="further from a float64 copy of the model than float32 rounding explains"):
        export_model(tiny_model("text_cacheable"), tmp_path / "m.onnx", opset=18)
    assert list(tmp_path.iterdir()) == []


def _edited(src, dst, edit):
    """A copy of the ONNX file `src` with one initializer changed: edit(array) returns the new array or None (not
    this one); exactly one initializer must be changed."""
    from onnx import numpy_helper
    proto = onnx.load(str(src))
    changed = 0
    for init in proto.graph.initializer:
        new = edit(init.name, numpy_helper.to_array(init).copy())
        if new is not None:
            init.CopyFrom(numpy_helper.from_array(new, init.name))
            changed += 1
    assert changed == 1
    onnx.save(proto, str(dst))
    return dst


def _bump(name, a, target):
    """One element of `target` moved by 1 % of the largest |weight| (a corrupted or mis-converted weight)."""
    if name != target:
        return None
    a.flat[a.size // 3] += 0.01 * np.abs(a).max()
    return a


@pytest.mark.parametrize("mode", MODES)
def test_verification_refuses_a_wrong_file_and_keeps_a_correct_one(mode, tmp_path):
    """A correct export passes with its error an order of magnitude inside the bound; one weight of the image
    projection moved by 1 %, a causal mask that lets prompt tokens see later ones, a key mask that lets the
    USEformer read padding, or another model's adapters are refused."""
    from nearl_rt.export.graph import export_module
    model = tiny_model(mode)
    good = export_model(model, tmp_path / "good.onnx")
    r = export_onnx.verify_onnx(good, export_module(model))
    assert r["images"] == 8 and r["rms_error"]["onnxruntime"] <= r["bound"]["rms"] / 4
    assert 0 < r["scale"] < 1e-4  # the tiny model is well conditioned: float32 errors of ~1e-6 of a logit
    wrong = {"projection": lambda n, a: _bump(n, a, "model.backbone.visual.proj")}
    if mode == "bidirectional":  # the masks are constants of the bidirectional graph (the prompts are fixed)
        wrong["causal mask"] = lambda n, a: np.zeros_like(a) if a.dtype.kind == "f" and np.isinf(a).any() else None
        wrong["key mask"] = lambda n, a: np.ones_like(a) if a.dtype == bool and not a.all() else None
    for case, edit in wrong.items():
        bad = _edited(good, tmp_path / f"{case}.onnx", edit)
        with pytest.raises(ExportError, match="further from a float64 copy|picks another class"):
            export_onnx.verify_onnx(bad, export_module(model))
    other = perturb_adapters(tiny(mode, backend="torch"), seed=4).eval()
    other.set_classes(CLASSES, TEMPLATE)
    with pytest.raises(ExportError, match="further from a float64 copy"):
        export_onnx.verify_onnx(good, export_module(other))


def test_bad_api_arguments(tmp_path):
    model = tiny_model("bidirectional")
    for kwargs, match in (({"batch_size": 0}, "batch_size"), ({"batch_size": "dyn"}, "batch_size"),
                          ({"opset": 11}, "opset")):
        with pytest.raises(ValueError, match=match):
            export_model(model, tmp_path / "m.onnx", **kwargs)
    bare = nearl_rt.build_model("tiny", backend="torch")
    with pytest.raises(ValueError, match="set_classes"):
        export_model(bare, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="directory"):
        export_model(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    nearl_rt.save_checkpoint(tiny_model("text_cacheable"), path)
    return path


def test_cli_exports_next_to_checkpoint(checkpoint):
    """The real `python -m export.onnx` entry point, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "export.onnx", str(checkpoint), "--batch-size", "dynamic"],
                          capture_output=True, text=True, env=env, cwd=checkpoint.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = checkpoint.with_suffix(".onnx")
    assert f"wrote {out}" in proc.stdout
    assert "max |ORT - PyTorch| logits" in proc.stderr and "batches 1, 3, 4" in proc.stderr
    assert "error vs float64" in proc.stderr
    assert "Skipping constant folding" not in proc.stderr  # onnxscript's note about its own work (issue 28, item 8)
    warned = [line for line in proc.stderr.splitlines() if "random weights" in line]
    assert len(warned) == 1 and warned[0].startswith("python -m export.onnx: warning: "), proc.stderr
    meta = read_metadata(out)
    assert meta["checkpoint_sha256"] == sha256_file(checkpoint)
    assert meta["interaction"] == "text_cacheable" and meta["class_names"] == CLASSES


def _cli(capsys, *argv):
    code = run_cli(export_onnx.main, list(map(str, argv)), prog="python -m export.onnx")
    err = capsys.readouterr().err
    return code, err


def test_cli_bad_inputs(tmp_path, capsys, checkpoint):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    probe = nearl_rt.save_checkpoint(nearl_rt.load_checkpoint(checkpoint), tmp_path / "probe.pt",
                                     extra={"method": "linear_probe"})
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    cases = [((tmp_path / "missing.pt",), "checkpoint not found"),
             ((truncated,), "damaged or truncated"),
             ((foreign,), "not a nearl-rt checkpoint"),
             ((text,), "not a nearl-rt checkpoint|damaged"),
             ((checkpoint, "-o", tmp_path / "no" / "such" / "dir" / "m.onnx"), "does not exist"),
             ((checkpoint, "-o", tmp_path), "is a directory"),
             ((checkpoint, "--batch-size", "-3"), "batch_size"),
             ((probe,), "linear_probe baseline")]
    for argv, match in cases:
        code, err = _cli(capsys, *argv)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m export.onnx: error: "), err
        assert __import__("re").search(match, lines[0]), (match, lines[0])
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt", "notes.pt", "probe.pt", "truncated.pt"]


def test_cli_no_traceback_in_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "nearl_rt.export.onnx", str(tmp_path / "missing.pt")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"python -m export.onnx: error: checkpoint not found: "
                                                f"{tmp_path / 'missing.pt'}"]
