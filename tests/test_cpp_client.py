"""cpp/tools/nearl_client (on the nearl library): prints what NearlSession computes, fails with one line."""
import subprocess

import numpy as np
import onnxruntime
import pytest
from PIL import Image
from scipy.special import softmax

from nearl_rt.core.session import NearlSession
from tests.cpp_build import cpp_build
from tests.export_cases import exported_with_preprocess
from tests.helpers import CLASSES, TINY_PRESETS
from tests.test_preprocess_graph import smooth_noisy


@pytest.fixture(scope="module")
def client():
    return cpp_build() / "nearl_client"


def parse(stdout: str):
    """'<image>\t<rank>\t<prob>\t<name>' lines -> {image: [(name, prob), ...]} in rank order (insertion order
    = output order)."""
    out = {}
    for line in stdout.strip().splitlines():
        image, rank, prob, name = line.split("\t")
        out.setdefault(image, []).append((name, float(prob)))
        assert len(out[image]) == int(rank)
    return out


def assert_same(cpp: dict, python: list, names: list):
    """The client's rows, named by input, equal Python's rows for those inputs (in that order)."""
    assert list(cpp) == names
    for name, row in zip(names, python):
        assert [n for n, _ in cpp[name]] == [n for n, _ in row]
        np.testing.assert_allclose([p for _, p in cpp[name]], [p for _, p in row], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,preset,precision", [(m, p, "fp32") for p in TINY_PRESETS
                                                   for m in ("bidirectional", "text_cacheable")]
                         + [("text_cacheable", "tiny", "int8_static"), ("bidirectional", "tiny", "calibrated")])
def test_cpp_client_equals_nearl_session(client, mode, preset, precision, tmp_path):
    """A raw float32 batch and PNG / JPEG images of other sizes (through the preprocessing graph) give the
    same top-k classes and probabilities as NearlSession (same onnxruntime library; 9 digits printed), for
    fp32, int8 and calibrated files alike (static int8: a dynamic one's results depend on how images are
    batched, see test_quantize.py::test_dynamic_int8_depends_on_the_batch_static_does_not); a calibrated file's
    probabilities are softmax(logits / its temperature) in both."""
    path = exported_with_preprocess(mode, preset=preset, precision=precision)
    session = NearlSession(path, providers=["CPUExecutionProvider"], preprocess="onnx")
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    raw = tmp_path / "batch.f32"
    x.tofile(raw)
    rng = np.random.default_rng(10)
    images = [tmp_path / "wide.png", tmp_path / "tall.jpg"]
    Image.fromarray(smooth_noisy(rng, 45, 70)).save(images[0])
    Image.fromarray(smooth_noisy(rng, 90, 29)).save(images[1], quality=90)
    proc = subprocess.run([str(client), str(path), "--top-k", "2", "--threads", "1", str(raw), *map(str, images)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    logits, probs = session.run(x)
    np.testing.assert_allclose(probs, softmax(logits.astype(np.float64) / session.temperature, axis=1), atol=1e-6)
    assert (precision == "calibrated") == (session.temperature != 1.0)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    expected = [[(CLASSES[c], float(p[c])) for c in row] for p, row in zip(probs, order)]
    expected += session.predict(images, top_k=2)
    assert_same(parse(proc.stdout), expected, [f"{raw}[{i}]" for i in range(3)] + [str(p) for p in images])


@pytest.mark.parametrize("top_k", [[], ["--top-k", "0"]], ids=["default", "zero"])
def test_cpp_client_cuda_falls_back(client, top_k, tmp_path):
    """--device cuda on a CPU-only onnxruntime: one stderr line, CPU results; the default --top-k (5) and
    --top-k 0 both print all 3 classes."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: the fallback is not the path taken")
    path = exported_with_preprocess("bidirectional")
    image = tmp_path / "a.png"
    Image.fromarray(smooth_noisy(np.random.default_rng(1), 40, 33)).save(image)
    proc = subprocess.run([str(client), str(path), "--device", "cuda", *top_k, str(image)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("nearl_client: running on the CPU: ") and len(proc.stderr.splitlines()) == 1
    assert_same(parse(proc.stdout), NearlSession(path, preprocess="onnx").predict([image], top_k=len(CLASSES)),
                [str(image)])


def test_cpp_client_errors(client, tmp_path):
    path = exported_with_preprocess("bidirectional")
    bad_raw = tmp_path / "short.f32"
    np.zeros(100, np.float32).tofile(bad_raw)
    good = tmp_path / "good.png"
    Image.fromarray(smooth_noisy(np.random.default_rng(2), 20, 20)).save(good)
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(b"\xff\xd8\xff" + bytes(range(200)))
    for argv, match in (([str(path), str(tmp_path / "missing.f32")], "cannot open"),
                        ([str(path), str(bad_raw)], "not a whole number of float32"),
                        ([str(path), str(good), str(noise)], "noise.jpg: cannot decode image: corrupt or truncated JPEG"),
                        ([str(path), str(tmp_path / "missing.png")], "image not found"),
                        ([str(tmp_path / "missing.onnx"), str(good)], "model not found"),
                        ([str(path), "--top-k", "x", str(good)], "--top-k x: expected a non-negative integer"),
                        ([str(path), "--top-k", "4", str(tmp_path / "missing.png")],  # checked before the input
                         f"--top-k 4: the model has {len(CLASSES)} classes"),
                        ([str(path), "--device", "tpu", str(good)], "use cpu or cuda"),
                        ([str(path)], "usage")):
        proc = subprocess.run([str(client), *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stdout == "", (argv, proc.stdout)
        assert proc.stderr.startswith("nearl_client: error: ") and match in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1
