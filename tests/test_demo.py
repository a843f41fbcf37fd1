"""`python -m nearl_rt demo` end to end (its wall time printed), and the bundled demo images: real
PneumoniaMNIST pixels, documented, shipped as package data."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nearl_rt
from nearl_rt.core.session import NearlSession
from nearl_rt.demo import DEMO_DATA, run_demo
from nearl_rt.core.errors import NearlError

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"train": 16, "val": 4, "test": 8}
CLASSES = ["normal", "pneumonia"]


def demo_images():
    return sorted(p for p in DEMO_DATA.rglob("*") if p.is_file() and p.suffix == ".png")


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, not an installed copy
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nearl_rt", "demo", "--out", str(out), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[demo] python -m nearl_rt demo: {wall:.1f} s wall (incl. interpreter start)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "MEANS NOTHING" in text and "demo finished in" in text
    for step in range(1, 5):
        assert f"[{step}/4]" in text
    assert "--pretrained" in text and "python -m export.onnx" in text and "python -m nearl_rt.predict" in text
    # every artefact it names exists (paths printed relative to the working directory)
    for name in ("run/last.pt", "eval.json", "model.onnx"):
        assert (out / name).is_file() and f"demo/{name}" in text, name
    assert (out / "run" / "best.pt").is_file() and (out / "run" / "metrics.jsonl").is_file()
    assert len((out / "run" / "metrics.jsonl").read_text().splitlines()) == 100  # train's default 200 steps
    model = nearl_rt.load_checkpoint(out / "run" / "last.pt", backend="torch")
    assert model.class_names == CLASSES
    # the served prediction is the trained checkpoint's (same probabilities as PyTorch on the same file)
    images = sorted((DEMO_DATA / "test" / "pneumonia").glob("*.png"))[:3]
    session = NearlSession(out / "model.onnx")
    served = np.array([[p for _, p in sorted(top)] for top in session.predict([str(p) for p in images])])
    calibration = torch.load(out / "run" / "last.pt", weights_only=True)["extra"]["calibration"]
    assert session.temperature == calibration["temperature"] and session.thresholds == calibration["thresholds"]
    with torch.no_grad():  # the served probabilities are calibrated: softmax(logits / T)
        logits = model.classify(torch.from_numpy(session.preprocess([str(p) for p in images])))
        ref = (logits / session.temperature).softmax(-1).numpy()
    np.testing.assert_allclose(served, ref, atol=1e-5)
    assert "(true: normal) -> " in text and "(true: pneumonia) -> " in text


def test_demo_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(NearlError, match="already exists and is not empty"):
        run_demo(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_demo_images_are_the_documented_split():
    """56 grayscale 28x28 PNGs in <split>/<class>/ with the counts the README states, well under 1 MB."""
    files = demo_images()
    assert len(files) == sum(COUNTS.values()) * len(CLASSES)
    assert sum(p.stat().st_size for p in DEMO_DATA.rglob("*") if p.is_file()) < 200_000
    for split, k in COUNTS.items():
        for c in CLASSES:
            names = sorted(p.name for p in (DEMO_DATA / split / c).glob("*.png"))
            assert len(names) == k and all(n.startswith(f"{split}_") for n in names), (split, c)
    readme = (DEMO_DATA / "README.md").read_text()
    assert "CC BY 4.0" in readme and "MedMNIST" in readme and "Kermany" in readme


def test_demo_images_equal_pneumoniamnist(pneumonia_npz):
    """Pixel for pixel the images their names point at, the first of each class in index order."""
    data = np.load(pneumonia_npz)
    for split, k in COUNTS.items():
        labels = data[f"{split}_labels"][:, 0]
        for c, cname in enumerate(CLASSES):
            want = np.flatnonzero(labels == c)[:k]
            files = sorted((DEMO_DATA / split / cname).glob("*.png"))
            assert [int(p.stem.split("_")[1]) for p in files] == want.tolist()
            for p, i in zip(files, want):
                with Image.open(p) as im:
                    assert im.mode == "L"
                    np.testing.assert_array_equal(np.asarray(im), data[f"{split}_images"][i])


def test_demo_images_are_package_data():
    """pyproject's package-data patterns cover every bundled file, so an installed package finds them."""
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["nearl_rt"]
    covered = {p for pat in patterns for p in (ROOT / "nearl_rt").glob(pat)}
    bundled = {p for p in DEMO_DATA.rglob("*") if p.is_file()}
    assert bundled and bundled <= covered, sorted(str(p) for p in bundled - covered)
