"""export.triton: the repository it writes, its checks of config.pbtxt against the ONNX graph, atomic writes.
(Triton's own checks of the same repository, by a real tritonserver, are in test_serve.py.)"""
import shutil

import pytest

import nearl_rt
from nearl_rt.serving.triton_repository import (Options, RepositoryError, check_model_dir, main, model_config_pb2, parse_config,
                           write_repository)
from nearl_rt.core.session import preprocess_graph_path
from tests.export_cases import exported, exported_with_preprocess, tiny_model
from tests.helpers import CLASSES


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_repository_layout_and_config_fit_the_export(tmp_path):
    model_dir = write_repository(exported("bidirectional"), tmp_path, Options(max_batch_size=16, gpu=False,
                                                                               max_queue_delay_us=500))
    assert _files(tmp_path) == ["nearl_clip", "nearl_clip/1", "nearl_clip/1/model.onnx", "nearl_clip/config.pbtxt",
                                "nearl_clip/labels.txt"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == exported("bidirectional").read_bytes()
    assert (model_dir / "labels.txt").read_text().splitlines() == CLASSES
    c = parse_config(model_dir / "config.pbtxt")
    pb = model_config_pb2()
    assert (c.name, c.backend, c.max_batch_size) == ("nearl_clip", "onnxruntime", 16)
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in c.input] == \
        [("images", "TYPE_FP32", [3, 32, 32])]
    assert [(t.name, list(t.dims), t.label_filename) for t in c.output] == \
        [("logits", [3], ""), ("probs", [3], "labels.txt")]
    assert c.dynamic_batching.max_queue_delay_microseconds == 500 and not c.dynamic_batching.preferred_batch_size
    assert [(g.count, g.kind) for g in c.instance_group] == [(1, pb.ModelInstanceGroup.KIND_CPU)]
    assert [w.batch_size for w in c.model_warmup] == [1, 16]
    assert not c.optimization.execution_accelerators.gpu_execution_accelerator


def test_gpu_tensorrt_fp16_and_a_second_version(tmp_path):
    write_repository(exported("bidirectional"), tmp_path)
    model_dir = write_repository(exported("text_cacheable"), tmp_path,
                                 Options(version=2, instances=2, tensorrt_fp16=True, max_batch_size=8))
    assert (model_dir / "1" / "model.onnx").read_bytes() == exported("bidirectional").read_bytes()
    assert (model_dir / "2" / "model.onnx").read_bytes() == exported("text_cacheable").read_bytes()
    c = parse_config(model_dir / "config.pbtxt")
    pb = model_config_pb2()
    assert [(g.count, g.kind) for g in c.instance_group] == [(2, pb.ModelInstanceGroup.KIND_GPU)]
    (trt,) = c.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert (trt.parameters["trt_profile_min_shapes"], trt.parameters["trt_profile_max_shapes"]) == \
        ("images:1x3x32x32", "images:8x3x32x32")
    assert check_model_dir(model_dir) == model_dir / "2" / "model.onnx"


def test_existing_version_needs_force_and_force_replaces_it(tmp_path):
    write_repository(exported("bidirectional"), tmp_path)
    with pytest.raises(RepositoryError, match="--force"):
        write_repository(exported("text_cacheable"), tmp_path)
    assert (tmp_path / "nearl_clip" / "1" / "model.onnx").read_bytes() == exported("bidirectional").read_bytes()
    write_repository(exported("text_cacheable"), tmp_path, force=True)
    assert (tmp_path / "nearl_clip" / "1" / "model.onnx").read_bytes() == exported("text_cacheable").read_bytes()
    assert _files(tmp_path) == ["nearl_clip", "nearl_clip/1", "nearl_clip/1/model.onnx", "nearl_clip/config.pbtxt",
                                "nearl_clip/labels.txt"]


def _with_preprocess(tmp_path, **options):
    return write_repository(exported_with_preprocess("bidirectional"), tmp_path,
                            Options(gpu=False, with_preprocess=True, **options))


def test_with_preprocess_adds_the_graph_and_an_ensemble(tmp_path):
    _with_preprocess(tmp_path, version=2)
    model = exported_with_preprocess("bidirectional")
    assert _files(tmp_path) == [
        "nearl_clip", "nearl_clip/2", "nearl_clip/2/model.onnx", "nearl_clip/config.pbtxt", "nearl_clip/labels.txt",
        "nearl_clip_image", "nearl_clip_image/2", "nearl_clip_image/config.pbtxt",
        "nearl_clip_preprocess", "nearl_clip_preprocess/2", "nearl_clip_preprocess/2/model.onnx",
        "nearl_clip_preprocess/config.pbtxt"]
    assert (tmp_path / "nearl_clip_preprocess/2/model.onnx").read_bytes() == preprocess_graph_path(model).read_bytes()
    pb = model_config_pb2()
    pre = parse_config(tmp_path / "nearl_clip_preprocess" / "config.pbtxt")
    assert (pre.backend, pre.max_batch_size) == ("onnxruntime", 0)
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in pre.input] == \
        [("image", "TYPE_UINT8", [1, -1, -1, -1])]
    assert [(t.name, list(t.dims)) for t in pre.output] == [("images", [1, 3, 32, 32])]
    ens = parse_config(tmp_path / "nearl_clip_image" / "config.pbtxt")
    assert (ens.platform, ens.max_batch_size) == ("ensemble", 0)
    assert [(s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
            for s in ens.ensemble_scheduling.step] == [
        ("nearl_clip_preprocess", 2, {"image": "image"}, {"images": "preprocessed"}),
        ("nearl_clip", 2, {"images": "preprocessed"}, {"logits": "logits", "probs": "probs"})]
    assert [(t.name, list(t.dims)) for t in ens.output] == [("logits", [1, 3]), ("probs", [1, 3])]
    assert check_model_dir(tmp_path / "nearl_clip_image") == tmp_path / "nearl_clip_image"
    with pytest.raises(RepositoryError, match="nearl_clip/2 exists"):
        _with_preprocess(tmp_path, version=2, name="nearl_clip")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace('model_name: "nearl_clip"\n', 'model_name: "nearl_clp"\n'), r"no model .*nearl_clp"),
    (lambda t: t.replace("model_version: 1", "model_version: 7", 1), r"version 7 does not exist"),
    (lambda t: t.replace('value: "preprocessed"', 'value: "pre"', 1),
     r"input 'preprocessed' is neither an ensemble input nor an earlier step's output"),
    (lambda t: t.replace("dims: 1\n  dims: 3\n}", "dims: 1\n  dims: 4\n}", 1),
     r"output 'logits': TYPE_FP32\[1, 4\], the step produces TYPE_FP32\[-1, 3\]"),
    (lambda t: t.replace("data_type: TYPE_UINT8", "data_type: TYPE_FP32"),
     r"'image' TYPE_FP32\[1, -1, -1, -1\] does not fit input 'image' TYPE_UINT8"),
])
def test_check_catches_ensemble_edits(tmp_path, edit, match):
    _with_preprocess(tmp_path)
    config = tmp_path / "nearl_clip_image" / "config.pbtxt"
    edited = edit(config.read_text())
    assert edited != config.read_text()
    config.write_text(edited)
    with pytest.raises(RepositoryError, match=match):
        check_model_dir(tmp_path / "nearl_clip_image")


def test_with_preprocess_refuses_a_graph_of_another_classifier(tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copyfile(exported("text_cacheable"), model)
    shutil.copyfile(preprocess_graph_path(exported_with_preprocess("bidirectional")), preprocess_graph_path(model))
    with pytest.raises(RepositoryError, match="written for another classifier"):
        write_repository(model, tmp_path / "repo", Options(gpu=False, with_preprocess=True))
    assert _files(tmp_path / "repo") == []


@pytest.mark.parametrize("saved", ["checkpoint", "save-pretrained folder"])
def test_from_a_checkpoint(tmp_path, saved):
    model = tiny_model("text_cacheable")
    ckpt = nearl_rt.save_checkpoint(model, tmp_path / "ckpt.pt") if saved == "checkpoint" else \
        model.save_pretrained(tmp_path / "shared")
    model_dir = write_repository(ckpt, tmp_path / "repo", Options(name="xray", gpu=False))
    assert check_model_dir(model_dir).name == "model.onnx"
    assert (model_dir / "labels.txt").read_text().splitlines() == CLASSES
    assert parse_config(model_dir / "config.pbtxt").name == "xray"


def test_failures_leave_nothing_behind(tmp_path):
    with pytest.raises(RepositoryError, match="fixed batch size.*--batch-size dynamic"):
        write_repository(exported("text_cacheable", batch_size=2, optimize=True), tmp_path)
    not_nearl = tmp_path / "plain.onnx"
    raw = exported("bidirectional").read_bytes()
    not_nearl.write_bytes(raw.replace(b"nearl.class_names", b"other.class_names"))
    with pytest.raises(RepositoryError, match="not written by `python -m export.onnx`"):
        write_repository(not_nearl, tmp_path)
    assert _files(tmp_path) == ["plain.onnx"]
    # another tool's file: the error names that file (not a temporary copy), and a new --repo is not left behind
    with pytest.raises(RepositoryError, match=rf"^{not_nearl} lacks the nearl\.\* metadata"):
        write_repository(not_nearl, tmp_path / "new" / "repo")
    assert _files(tmp_path) == ["plain.onnx"]
    with pytest.raises(RepositoryError, match=rf"--repo {not_nearl} is a file; give a directory"):
        write_repository(exported("bidirectional"), not_nearl)
    for bad, match in ((Options(name="../x"), "--name"), (Options(version=0), "--version"),
                       (Options(max_batch_size=0), "--max-batch-size"), (Options(gpu=False, tensorrt_fp16=True),
                                                                         "--tensorrt-fp16 needs --gpu")):
        with pytest.raises(RepositoryError, match=match):
            write_repository(exported("bidirectional"), tmp_path / "r", bad)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace("max_queue_delay_microseconds", "max_queue_delay_microsecond"),
     r"config.pbtxt:\d+:\d+ : .*has no field named"),
    (lambda t: t.replace("kind: KIND_CPU", "kind: CPU"), r"config.pbtxt:\d+:\d+ "),
    (lambda t: t.replace("dynamic_batching {", "dynamic_batching {\n  preferred_batch_size: 128"),
     r"preferred_batch_size \[128\] outside 1..max_batch_size 64"),
    (lambda t: t.replace("dims: 32\n  dims: 32\n}", "dims: 32\n  dims: 31\n}", 1), r"input 'images': dims \[3, 32, 31\]"),
    (lambda t: t.replace('name: "probs"\n  data_type: TYPE_FP32', 'name: "probs"\n  data_type: TYPE_FP16'),
     r"output 'probs': data_type TYPE_FP16"),
    (lambda t: t.replace('name: "logits"', 'name: "scores"'), r"output 'logits' of the model is missing"),
    (lambda t: t.replace("max_batch_size: 64", "max_batch_size: 0"), r"max_batch_size 0 does not fit a dynamic"),
])
def test_check_catches_hand_edits(tmp_path, edit, match):
    model_dir = write_repository(exported("bidirectional"), tmp_path, Options(gpu=False))
    config = model_dir / "config.pbtxt"
    edited = edit(config.read_text())
    assert edited != config.read_text()
    config.write_text(edited)
    with pytest.raises(RepositoryError, match=match):
        check_model_dir(model_dir)


def test_check_catches_labels_that_differ(tmp_path):
    model_dir = write_repository(exported("bidirectional"), tmp_path, Options(gpu=False))
    (model_dir / "labels.txt").write_text("\n".join(CLASSES[:2]) + "\n")
    with pytest.raises(RepositoryError, match="labels.txt: 2 lines differ from the model's 3 class names"):
        check_model_dir(model_dir)
    shutil.rmtree(model_dir / "1")
    with pytest.raises(RepositoryError, match="no numeric version directory"):
        check_model_dir(model_dir)


def test_cli(tmp_path, capsys):
    assert main([str(exported("bidirectional")), "--repo", str(tmp_path), "--name", "m", "--version", "3",
                 "--cpu", "--max-batch-size", "4", "--instances", "2", "--max-queue-delay-us", "100"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "docker run --rm -p8000:8000" in out and "--gpus" not in out  # KIND_CPU: no GPUs
    assert main([str(exported("bidirectional")), "--repo", str(tmp_path / "gpu")]) == 0
    assert "docker run --rm --gpus all -p8000:8000" in capsys.readouterr().out  # KIND_GPU needs them
    c = parse_config(tmp_path / "m" / "config.pbtxt")
    assert (c.max_batch_size, c.instance_group[0].count, c.dynamic_batching.max_queue_delay_microseconds) == (4, 2, 100)
    assert main(["--check", str(tmp_path / "m")]) == 0
    assert "fits" in capsys.readouterr().out
