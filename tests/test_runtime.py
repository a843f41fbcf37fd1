"""nearl_rt.core.session.NearlSession: no PyTorch, same preprocessing and predictions as the model, clear errors."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from nearl_rt.bench.decode import write_dicom
from nearl_rt.core.imaging import DEFAULT_POLICY
from nearl_rt.core.preprocess import preprocess_batch, preprocess_image
from nearl_rt.core.session import NearlSession
from tests.export_cases import exported, tiny_model
from tests.helpers import CLASSES, TINY_PRESETS
from tests.test_imaging import linear, xray16

ROOT = Path(__file__).resolve().parents[1]


def random_images(n, seed=0):
    """uint8 images of odd, non-square sizes (so resize + centre crop really run)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(37 + 5 * i, 29 + 3 * i, 3), dtype=np.uint8) for i in range(n)]


def test_runtime_does_not_import_torch():
    code = "import sys, nearl_rt.core.session; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("mode", ["bidirectional", "text_cacheable"])
def test_predict_matches_model_classify(mode, preset, tmp_path):
    session = NearlSession(exported(mode, preset=preset))
    assert session.class_names == CLASSES and session.providers == ["CPUExecutionProvider"]
    images = random_images(5, seed=1)
    paths = []
    for i, im in enumerate(images[:2]):  # the same images as files and as PIL images
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    mixed = [paths[0], Image.fromarray(images[1])] + images[2:]
    cfg = tiny_model(mode, preset).preprocess_cfg
    x = preprocess_batch(images, cfg["size"][0], cfg["mean"], cfg["std"], cfg["interpolation"])
    np.testing.assert_array_equal(session.preprocess(mixed), x)
    with torch.no_grad():
        probs = tiny_model(mode, preset).classify(torch.from_numpy(x)).softmax(-1).numpy()
    got = session.predict(mixed, batch_size=2)  # 3 runs: 2 + 2 + 1
    assert [row[0][0] for row in got] == [CLASSES[i] for i in probs.argmax(1)]
    for row, p in zip(got, probs):
        assert sorted(name for name, _ in row) == sorted(CLASSES)
        assert [q for _, q in row] == sorted((q for _, q in row), reverse=True)
        np.testing.assert_allclose([q for _, q in row], np.sort(p)[::-1], atol=1e-5)
    assert [len(r) for r in session.predict(images[:2], top_k=1)] == [1, 1]


def test_fixed_batch_session_pads_and_splits():
    """A model exported for batch 2 serves 3 images (2 + 1 padded) with the dynamic model's results."""
    fixed = NearlSession(exported("text_cacheable", batch_size=2, optimize=True))
    dynamic = NearlSession(exported("text_cacheable"))
    assert fixed.fixed_batch == 2 and dynamic.fixed_batch is None
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (fl, fp), (dl, dp) = fixed.run(x), dynamic.run(x)
    assert fl.shape == (3, len(CLASSES))
    np.testing.assert_allclose(fl, dl, atol=1e-4)
    np.testing.assert_allclose(fp, dp, atol=1e-5)


def test_real_xrays(pneumonia_npz):
    """Grey 28x28 chest X-rays (upsampled to the model's 32 px) as [H, W] uint8 arrays."""
    images = list(np.load(pneumonia_npz)["test_images"][:4])
    session = NearlSession(exported("bidirectional"))
    with torch.no_grad():
        probs = tiny_model("bidirectional").classify(torch.from_numpy(session.preprocess(images))).softmax(-1)
    assert [r[0][0] for r in session.predict(images)] == [CLASSES[i] for i in probs.argmax(1)]


def test_high_bit_depth_arrays_and_files(tmp_path):
    """uint16 and float arrays are accepted, mapped by the model's intensity policy (the default, min..max, for
    this export) exactly as the same image's 16-bit PNG and DICOM are."""
    session = NearlSession(exported("bidirectional"))
    assert session.intensity == DEFAULT_POLICY
    img = xray16(2)
    as_float = (img / 65536).astype(np.float32)  # a power-of-two scale: the min..max mapping is exactly the same
    Image.fromarray(img).save(tmp_path / "x.png")
    write_dicom(tmp_path / "x.dcm", img)
    grey = linear(img.astype(np.float64), float(img.min()), float(img.max()))
    m = session.metadata
    want = preprocess_image(Image.fromarray(grey).convert("RGB"), session.input_size[0], m["mean"], m["std"],
                            m.get("interpolation", "bicubic"))
    x = session.preprocess([img, as_float, img[:, :, None], tmp_path / "x.png", tmp_path / "x.dcm"])
    for i in range(len(x)):
        np.testing.assert_array_equal(x[i], want, err_msg=f"input {i}")
    assert session.predict([as_float]) == session.predict([img])


def test_bad_session_inputs(tmp_path):
    session = NearlSession(exported("bidirectional"))
    good = np.zeros((2, 3, 32, 32), np.float32)
    cases = [(good[0], ValueError, r"3 dims.*float32 \[batch, 3, 32, 32\]"),
             (good[None], ValueError, "5 dims"),
             (good.astype(np.float64), ValueError, "dtype float64"),
             (good.astype(np.uint8), ValueError, "dtype uint8"),
             (np.zeros((2, 1, 32, 32), np.float32), ValueError, "1 channels"),
             (np.zeros((2, 3, 28, 28), np.float32), ValueError, "28x28 pixels"),
             (np.zeros((0, 3, 32, 32), np.float32), ValueError, "empty batch"),
             (good.tolist(), TypeError, "NumPy array")]
    for batch, exc, match in cases:
        with pytest.raises(exc, match=match):
            session.run(batch)
    nan_image = np.full((8, 8), 0.5, np.float32)
    nan_image[3, 4] = np.nan
    with pytest.raises(ValueError, match="has 1 NaN/Inf pixel value"):
        session.predict([nan_image])
    with pytest.raises(ValueError, match="integer or float dtype"):
        session.predict([np.zeros((8, 8), np.complex64)])
    with pytest.raises(ValueError, match=r"\[H, W, 1\|3\|4\]"):
        session.predict([np.zeros((8, 8, 2), np.uint8)])
    with pytest.raises(FileNotFoundError, match="image not found"):
        session.predict([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="top_k"):
        session.predict(random_images(1), top_k=len(CLASSES) + 1)


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m export.onnx"):
        NearlSession(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="onnxruntime cannot load"):
        NearlSession(junk)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported("bidirectional").read_bytes()[:5000])
    with pytest.raises(ValueError, match="onnxruntime cannot load"):
        NearlSession(truncated)
    foreign = tmp_path / "identity.onnx"
    x = onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    y = onnx.helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["images"], ["probs"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), foreign)
    with pytest.raises(ValueError, match="not written by export.onnx"):
        NearlSession(foreign)
