"""examples/cpp: the C++ onnxruntime client builds and prints what NearlSession computes."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.runtime import NearlSession
from tests.export_cases import exported
from tests.helpers import CLASSES, TINY_PRESETS

CPP = Path(__file__).resolve().parents[1] / "examples" / "cpp"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """Build nearl_client (headers fetched once into examples/cpp/.ort); skip when that is impossible."""
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"C++ client not built: {', '.join(missing)} not installed (apt-get install cmake g++)")
    fetch = subprocess.run(["bash", str(CPP / "fetch_ort_headers.sh")], capture_output=True, text=True, timeout=300)
    if fetch.returncode != 0:
        pytest.skip(f"C++ client not built: onnxruntime headers unavailable ({fetch.stderr.strip().splitlines()[-1:]})")
    build = tmp_path_factory.mktemp("cpp-build")
    configure = subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
                                f"-DORT_INCLUDE_DIR={fetch.stdout.strip()}"], capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    make = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, timeout=600)
    assert make.returncode == 0, make.stdout + make.stderr
    return build / "nearl_client"


def parse(stdout: str):
    """'<image> <rank> <prob> <name>' lines -> {image: [(name, prob), ...]} in rank order."""
    out = {}
    for line in stdout.strip().splitlines():
        image, rank, prob, name = line.split(" ", 3)
        out.setdefault(int(image), []).append((name, float(prob)))
        assert len(out[int(image)]) == int(rank)
    return out


def assert_same(cpp: dict, python: list):
    assert sorted(cpp) == list(range(len(python)))
    for i, row in enumerate(python):
        assert [n for n, _ in cpp[i]] == [n for n, _ in row]
        np.testing.assert_allclose([p for _, p in cpp[i]], [p for _, p in row], rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("mode", ["bidirectional", "text_cacheable"])
def test_cpp_client_equals_nearl_session(client, mode, preset, tmp_path):
    """Raw float32 batches and PPM images (normalised in C++ with the model's mean/std) give the same
    top-k classes and probabilities as NearlSession (same onnxruntime library; printed with 9 digits)."""
    path = exported(mode, preset=preset)
    session = NearlSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    raw = tmp_path / "batch.f32"
    x.tofile(raw)
    ppms = []
    for i in range(2):
        ppms.append(tmp_path / f"img{i}.ppm")
        Image.fromarray(np.random.default_rng(10 + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ppms[-1])
    proc = subprocess.run([str(client), str(path), "--top-k", "2", str(raw), *map(str, ppms)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    probs = session.run(x)[1]
    order = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    expected = [[(CLASSES[c], float(p[c])) for c in row] for p, row in zip(probs, order)]
    expected += session.predict(ppms, top_k=2)
    assert_same(parse(proc.stdout), expected)


def test_cpp_client_errors(client, tmp_path):
    path = exported("bidirectional")
    bad_raw = tmp_path / "short.f32"
    np.zeros(100, np.float32).tofile(bad_raw)
    small = tmp_path / "small.ppm"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(small)
    for argv, match in (([str(path), str(tmp_path / "missing.f32")], "cannot open"),
                        ([str(path), str(bad_raw)], "not a whole number of float32"),
                        ([str(path), str(small)], "8x8; the model needs 32x32"),
                        ([str(tmp_path / "missing.onnx"), str(bad_raw)], "onnxruntime"),
                        ([str(path)], "usage")):
        proc = subprocess.run([str(client), *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith("nearl_client: error: ") and match in proc.stderr, proc.stderr
