"""export.triton --backend openvino: a repository for Triton's OpenVINO backend (the same model.onnx, CPU instances,
batch padding), only for a file whose OpenVINO bf16 passed the int8 gates (that backend cannot be held to f32);
its checks; and the file computing there, run the way that backend runs it, what NearlSession computes.
(Triton's own config checks of such a repository, by a real tritonserver, are in test_serve.py.)"""
import shutil

import numpy as np
import pytest

from nearl_rt.core.session import NearlSession
from nearl_rt.export.quantize import Gates, verify_runtime_precision
from nearl_rt.serving.triton_repository import (Options, RepositoryError, check_model_dir, main, model_config_pb2,
                                                parse_config, write_repository)
from tests.export_cases import exported
from tests.helpers import CLASSES

ov = pytest.importorskip("openvino")
OPENVINO = Options(gpu=False, backend="openvino", max_batch_size=4)
OPEN = Gates(min_agreement=0.0, max_accuracy_change=100.0)  # the gates' arithmetic is tested in test_openvino.py


@pytest.fixture(scope="module", params=["bidirectional", "text_cacheable"])
def verified(request, tmp_path_factory):
    """An export whose OpenVINO bf16 passed the gates (`export.onnx --openvino-bf16`)."""
    path = tmp_path_factory.mktemp("verified") / "model.onnx"
    shutil.copyfile(exported(request.param), path)
    verify_runtime_precision(path, "openvino", "bf16", gates=OPEN)
    return path


def _run_as_triton_backend(path, x, max_batch, hint=None):
    """What Triton's OpenVINO backend does (src/openvino.cc, ValidateInputs/ValidateOutputs and ProcessRequests):
    the tensors' element types and a batch layout "N..." set through a PrePostProcessor, the batch fixed at
    max_batch_size (ov::set_batch), requests padded to it (ENABLE_BATCH_PADDING), no precision property unless
    HINT_BF16."""
    core = ov.Core()
    model = core.read_model(str(path))
    ppp = ov.preprocess.PrePostProcessor(model)
    ppp.input("images").tensor().set_element_type(ov.Type.f32).set_layout(ov.Layout("N..."))
    for name in ("logits", "probs"):
        ppp.output(name).tensor().set_element_type(ov.Type.f32)
    model = ppp.build()
    ov.set_batch(model, max_batch)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint} if hint else {})
    padded = np.concatenate([x, np.zeros((max_batch - len(x), *x.shape[1:]), np.float32)])
    out = compiled({"images": padded})
    return np.array(out[compiled.output("logits")])[:len(x)], np.array(out[compiled.output("probs")])[:len(x)]


def test_openvino_repository_serves_what_nearlsession_computes(tmp_path, verified):
    model_dir = write_repository(verified, tmp_path, OPENVINO)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert files == ["nearl_clip", "nearl_clip/1", "nearl_clip/1/model.onnx", "nearl_clip/config.pbtxt",
                     "nearl_clip/labels.txt"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == verified.read_bytes()
    c = parse_config(model_dir / "config.pbtxt")
    pb = model_config_pb2()
    assert (c.backend, c.default_model_filename, c.max_batch_size) == ("openvino", "model.onnx", 4)
    assert {k: v.string_value for k, v in c.parameters.items()} == \
        {"ENABLE_BATCH_PADDING": "YES", "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
    assert [(g.count, g.kind) for g in c.instance_group] == [(1, pb.ModelInstanceGroup.KIND_CPU)]
    assert [(t.name, list(t.dims), t.label_filename) for t in c.output] == \
        [("logits", [3], ""), ("probs", [3], "labels.txt")]
    assert (model_dir / "labels.txt").read_text().splitlines() == CLASSES
    assert check_model_dir(model_dir) == model_dir / "1" / "model.onnx"
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    native_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    # OpenVINO's default precision: bf16 where the CPU has it natively (verified), else f32.
    want = NearlSession(verified, runtime="openvino", precision="bf16" if native_bf16 else "f32").run(x)
    got = _run_as_triton_backend(model_dir / "1" / "model.onnx", x, 4)
    # A padded batch of 4 vs NearlSession's 3: float32 summation order only (test_openvino's bound).
    assert np.abs(got[0] - want[0]).max() <= 1e-4 and np.abs(got[1] - want[1]).max() <= 1e-5


def test_unverified_file_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(RepositoryError, match="records no verification of OpenVINO bf16, which Triton's OpenVINO "
                                              "backend runs on CPUs with AVX512-BF16/AMX"):
        write_repository(exported("bidirectional"), tmp_path / "repo", OPENVINO)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace('string_value: "YES"', 'string_value: "NO"'), "ENABLE_BATCH_PADDING must be YES"),
    (lambda t: t.replace("kind: KIND_CPU", "kind: KIND_GPU"), "runs on CPU only"),
    (lambda t: t + 'parameters {\n  key: "HINT_BF16"\n  value {\n    string_value: "YES"\n  }\n}\n',
     "HINT_BF16 forces bf16 also on CPUs without native bf16"),
    (lambda t: t.replace('backend: "openvino"', 'backend: "tensorrt"'), 'expected "onnxruntime" or "openvino"'),
])
def test_check_catches_openvino_edits(tmp_path, verified, edit, match):
    model_dir = write_repository(verified, tmp_path, OPENVINO)
    config = model_dir / "config.pbtxt"
    edited = edit(config.read_text())
    assert edited != config.read_text()
    config.write_text(edited)
    with pytest.raises(RepositoryError, match=match):
        check_model_dir(model_dir)


def test_check_catches_an_unverified_model_behind_an_openvino_config(tmp_path, verified):
    model_dir = write_repository(verified, tmp_path, OPENVINO)
    shutil.copyfile(exported("bidirectional"), model_dir / "1" / "model.onnx")
    with pytest.raises(RepositoryError, match="records no verification of OpenVINO bf16"):
        check_model_dir(model_dir)


@pytest.mark.parametrize("opts, match", [
    (Options(backend="openvino"), "runs on CPU instances only"),
    (Options(gpu=False, backend="openvino", with_preprocess=True), "--with-preprocess is written for the onnxruntime"),
    (Options(gpu=False, backend="tensorrt"), "--backend 'tensorrt': use one of onnxruntime, openvino"),
])
def test_bad_options_are_one_line(tmp_path, opts, match):
    with pytest.raises(RepositoryError, match=match):
        write_repository(exported("bidirectional"), tmp_path / "repo", opts)
    assert not (tmp_path / "repo").exists()


def test_cli_defaults_to_cpu_and_a_small_batch(tmp_path, capsys, verified):
    assert main([str(verified), "--repo", str(tmp_path), "--backend", "openvino"]) == 0
    out = capsys.readouterr().out
    assert "nearl_clip/1/model.onnx" in out and "--gpus" not in out
    c = parse_config(tmp_path / "nearl_clip" / "config.pbtxt")
    assert (c.backend, c.max_batch_size, c.instance_group[0].kind) == \
        ("openvino", 8, model_config_pb2().ModelInstanceGroup.KIND_CPU)
    assert main(["--check", str(tmp_path / "nearl_clip")]) == 0
    with pytest.raises(RepositoryError, match="--max-batch-size 0: must be >= 1"):  # not replaced by the default
        main([str(verified), "--repo", str(tmp_path / "zero"), "--backend", "openvino", "--max-batch-size", "0"])
