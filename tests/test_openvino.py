"""NearlSession(runtime="openvino"): the same file, preprocessing, outputs and metadata as onnxruntime; reduced
precision (bf16) only through the int8 gates, recorded in the file; intra-op threads default to physical cores."""
import os

import numpy as np
import onnxruntime as ort
import pytest

import nearl_rt
from nearl_rt.core.cli import run_cli
from nearl_rt.core.cpu import physical_cores
from nearl_rt.core.hashing import sha256_file
from nearl_rt.core.metadata import read_metadata
from nearl_rt.core.session import NearlSession
from nearl_rt.export import onnx as export_onnx
from nearl_rt.export.quantize import Gates, QuantizationError, verify_runtime_precision
from tests.export_cases import exported, exported_int8, tiny_model
from tests.helpers import CLASSES, TINY_PRESETS
from tests.test_runtime import random_images

pytest.importorskip("openvino")
MODES = ["bidirectional", "text_cacheable"]
OPEN = Gates(min_agreement=0.0, max_accuracy_change=100.0)


def _batch(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("mode", MODES)
def test_openvino_f32_equals_onnxruntime(mode, preset, fused):
    """Both runtimes in float32 on one file: summation order only (~1e-6 on logits of ~10; the export's 1e-4)."""
    path = exported(mode, preset=preset, fused=fused)
    ov, rt = NearlSession(path, runtime="openvino"), NearlSession(path)
    assert ov.metadata == rt.metadata and ov.class_names == CLASSES and ov.precision == "f32"
    for n in (1, 5):
        x = _batch(n, seed=n)
        (lo, po), (lr, pr) = ov.run(x), rt.run(x)
        assert lo.shape == (n, len(CLASSES)) and lo.dtype == np.float32
        assert np.abs(lo - lr).max() <= 1e-4 and np.abs(po - pr).max() <= 1e-5
    images = random_images(3, seed=4)
    np.testing.assert_array_equal(ov.preprocess(images), rt.preprocess(images))
    assert [[c for c, _ in r] for r in ov.predict(images)] == [[c for c, _ in r] for r in rt.predict(images)]


def test_openvino_fixed_batch_pads_like_onnxruntime():
    path = exported("text_cacheable", batch_size=2)
    ov = NearlSession(path, runtime="openvino")
    assert ov.fixed_batch == 2
    x = _batch(3, seed=9)
    np.testing.assert_allclose(ov.run(x)[1], NearlSession(path).run(x)[1], atol=1e-5)


def test_openvino_static_int8_runs_and_fused_dynamic_int8_is_refused():
    """OpenVINO's own int8 kernels on a static (QDQ) file: the fused text_cacheable one (OpenVINO 2026.4's
    low-precision pass fails on the plain graph's USEformer key concat, and on the fused bidirectional graph:
    docs/export.md#cpu-serving)."""
    path = exported_int8("text_cacheable", "static", fused=True)
    x = _batch(4, seed=2)
    got, ref = NearlSession(path, runtime="openvino").run(x)[1], NearlSession(path).run(x)[1]
    assert np.abs(got - ref).max() < 0.02  # both int8, each runtime's own kernels and rounding
    with pytest.raises(ValueError, match="QAttention"):
        NearlSession(exported_int8("text_cacheable", fused=True), runtime="openvino")


def test_bf16_needs_its_recorded_verification(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(exported("text_cacheable").read_bytes())
    with pytest.raises(ValueError, match="--openvino-bf16"):
        NearlSession(path, runtime="openvino", precision="bf16")
    before = sha256_file(path)
    with pytest.raises(QuantizationError, match="OpenVINO bf16 model misses"):
        verify_runtime_precision(path, "openvino", "bf16", gates=Gates(min_agreement=0.0, max_prob_diff=0.0))
    assert sha256_file(path) == before  # a miss leaves the file as it was
    report = verify_runtime_precision(path, "openvino", "bf16", gates=OPEN)
    record = read_metadata(path)["runtime_precisions"]["openvino:bf16"]
    assert record["top1_agreement"] == report["top1_agreement"] and record["images"] == 64
    assert "openvino" in record and record["gates"]["min_agreement"] == 0.0
    bf16 = NearlSession(path, runtime="openvino", precision="bf16")
    x = _batch(4, seed=3)
    diff = np.abs(bf16.run(x)[1] - NearlSession(path).run(x)[1]).max()
    assert 0 < diff < 0.05  # bf16 keeps 8 significant bits: another precision, not another model


def test_threads_default_to_physical_cores_and_can_be_set():
    path = exported("text_cacheable")
    cores = physical_cores()
    assert 1 <= cores <= os.cpu_count()
    assert NearlSession(path).threads == cores == NearlSession(path, runtime="openvino").threads
    one = NearlSession(path, threads=1)
    assert one.threads == 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = 3
    assert NearlSession(path, session_options=options).threads == 3  # the caller's own setting stays
    assert NearlSession(path, runtime="openvino", threads=1).session.compiled.get_property("INFERENCE_NUM_THREADS") == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(runtime="tensorrt"), "runtime='tensorrt'"),
    (dict(threads=0), "threads=0"),
    (dict(runtime="openvino", providers=["CPUExecutionProvider"]), "onnxruntime's"),
    (dict(precision="bf16"), "OpenVINO's"),
    (dict(runtime="openvino", precision="int4"), "precision='int4'"),
])
def test_bad_runtime_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NearlSession(exported("text_cacheable"), **kwargs)


def test_cli_openvino_bf16(tmp_path, capsys):
    ckpt = nearl_rt.save_checkpoint(tiny_model("text_cacheable"), tmp_path / "ckpt.pt")
    out = tmp_path / "m.onnx"
    argv = [str(ckpt), "--openvino-bf16", "-o", str(out)]
    assert run_cli(export_onnx.main, argv + ["--min-agreement", "0"], prog="export.onnx") == 0
    assert "OpenVINO bf16: top-1 agreement" in capsys.readouterr().out
    assert "openvino:bf16" in read_metadata(out)["runtime_precisions"]
    strict = tmp_path / "strict.onnx"
    rc = run_cli(export_onnx.main, [str(ckpt), "--openvino-bf16", "--max-prob-diff", "0", "-o", str(strict)],
                 prog="export.onnx")
    assert rc == 2 and "misses its verification gates" in capsys.readouterr().err and not strict.exists()
    assert run_cli(export_onnx.main, argv + ["--int8"], prog="export.onnx") == 2
    assert "without --int8" in capsys.readouterr().err
