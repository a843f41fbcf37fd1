"""cpp/ (nearl::Classifier): its ctest suite on cases written here with Pillow and NearlSession (decoding
bit-identical to Pillow, probabilities within 1e-6 of NearlSession(preprocess="onnx") on images of any size,
8 threads x 20 calls equal to sequential, every bad input), and the installed CMake package."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from nearl_rt.core.session import NearlSession, preprocess_graph_path
from tests.cpp_build import CPP, cpp_build
from tests.export_cases import exported_with_preprocess
from tests.test_preprocess_graph import smooth_noisy

MODELS = {"model": ("bidirectional", {}), "fixed_model": ("text_cacheable", {"batch_size": 2, "optimize": True})}


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return str(path)


def _decode_cases(d, rng):
    """Files Pillow writes -> (file, pixels Pillow decodes): 1 channel for grayscale sources (the library
    keeps gray; the graph replicates it exactly as convert("RGB") does), else convert("RGB")."""
    rgb = Image.fromarray(smooth_noisy(rng, 53, 37))
    gray = Image.fromarray(smooth_noisy(rng, 41, 67)[:, :, 0])
    rgba = Image.fromarray(np.dstack([smooth_noisy(rng, 30, 21), rng.integers(0, 256, (30, 21, 1), dtype=np.uint8)]))
    files = [_save(rgb, d / "baseline444.jpg", quality=92, subsampling=0),
             _save(rgb, d / "sub420.jpg", quality=80, subsampling=2),
             _save(rgb, d / "progressive.jpg", quality=85, progressive=True),
             _save(gray, d / "gray.jpg", quality=90),
             _save(rgb, d / "rgb.png"), _save(gray, d / "gray.png"), _save(rgba, d / "rgba.png"),
             _save(rgba.convert("LA"), d / "gray_alpha.png"),
             _save(rgb.quantize(17), d / "palette.png", transparency=3),
             _save(gray.point(lambda v: 255 if v > 128 else 0).convert("1"), d / "bilevel.png")]
    cases = []
    for f in files:
        with Image.open(f) as im:
            is_gray = im.mode in ("L", "LA", "1")
            pixels = np.asarray(im.convert("L" if is_gray else "RGB"))
            if is_gray:  # what the graph does with one channel is what Pillow does to RGB
                assert (np.asarray(im.convert("RGB")) == pixels[:, :, None]).all()
        raw = f + ".u8"
        np.ascontiguousarray(pixels).tofile(raw)
        cases.append({"file": f, "raw": raw, "height": pixels.shape[0], "width": pixels.shape[1],
                      "channels": 1 if is_gray else 3})
    return cases


def _undecodable(d, rng):
    jpg = io.BytesIO()
    Image.fromarray(smooth_noisy(rng, 40, 40)).save(jpg, "JPEG")
    png = io.BytesIO()
    Image.fromarray(smooth_noisy(rng, 40, 40)).save(png, "PNG")
    cmyk = d / "cmyk.jpg"
    Image.fromarray(smooth_noisy(rng, 20, 20)).convert("CMYK").save(cmyk)
    sixteen = d / "sixteen.png"
    Image.fromarray(rng.integers(0, 4096, (20, 20), dtype=np.uint16)).save(sixteen)
    broken_png = bytearray(png.getvalue())
    broken_png[60] ^= 0xFF  # inside IDAT: the CRC check fails
    cases = {"noise.png": (rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "not a PNG or JPEG"),
             "truncated.jpg": (jpg.getvalue()[: len(jpg.getvalue()) // 2], "corrupt or truncated JPEG"),
             "truncated.png": (png.getvalue()[: len(png.getvalue()) // 2], "corrupt or truncated PNG"),
             "crc.png": (bytes(broken_png), "corrupt or truncated PNG"), "empty.png": (b"", "empty buffer")}
    out = [{"file": str(cmyk), "error": "CMYK JPEGs are not supported"},
           {"file": str(sixteen), "error": "16-bit PNGs are not supported"}]
    for name, (data, error) in cases.items():
        (d / name).write_bytes(data)
        out.append({"file": str(d / name), "error": error})
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    build = cpp_build()
    d = tmp_path_factory.mktemp("cpp-cases")
    rng = np.random.default_rng(17)
    models = {key: exported_with_preprocess(mode, **kw) for key, (mode, kw) in MODELS.items()}
    sessions = {key: NearlSession(path, preprocess="onnx") for key, path in models.items()}
    decode = _decode_cases(d, rng)
    classify = [{"file": c["file"]} for c in decode if c["file"].endswith(("sub420.jpg", "gray.png", "rgba.png"))]
    for i, (h, w, c) in enumerate([(1, 50, 3), (97, 40, 3), (32, 32, 3), (150, 201, 1), (33, 31, 3)]):
        raw = d / f"image{i}.u8"
        smooth_noisy(rng, h, w, c).tofile(raw)
        classify.append({"raw": str(raw), "height": h, "width": w, "channels": c})
    x = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    x.tofile(d / "batch.f32")
    pre = {"file": str(d / "batch.f32"), "n": 3, "probs": {}, "logits": {}}
    for key, session in sessions.items():
        names = session.class_names
        for c in classify:
            image = c["file"] if "file" in c else np.fromfile(c["raw"], np.uint8).reshape(c["height"], c["width"],
                                                                                           c["channels"])
            row = dict(session.predict([image])[0])
            c.setdefault("probs", {})[key] = [row[n] for n in names]
        logits, probs = session.run(x)
        pre["logits"][key], pre["probs"][key] = logits.ravel().tolist(), probs.ravel().tolist()
    bad = d / "bad"
    bad.mkdir()
    (bad / "text.onnx").write_text("not an onnx file")
    for name, graph_of in (("foreign.onnx", models["fixed_model"]), ("bare.onnx", None)):
        shutil.copy(models["model"], bad / name)
        if graph_of:
            shutil.copy(preprocess_graph_path(graph_of), preprocess_graph_path(bad / name))
    manifest = {"cuda_provider": "CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                "metadata": sessions["model"].metadata,  # what C++ metadata() must parse to
                "model": str(models["model"]), "fixed_model": str(models["fixed_model"]), "decode": decode,
                "classify": classify, "preprocessed": pre,
                "bad": {"missing": str(d / "missing.onnx"), "not_onnx": str(bad / "text.onnx"),
                        "not_nearl": str(preprocess_graph_path(models["model"])),
                        "foreign_preprocess": str(bad / "foreign.onnx"), "no_preprocess": str(bad / "bare.onnx"),
                        "undecodable": _undecodable(d, rng)}}
    (d / "cases.json").write_text(json.dumps(manifest))
    return build, d / "cases.json"


@pytest.mark.parametrize("test", ["decode_parity", "classify_parity", "threads", "bad_inputs"])
def test_ctest(cases, test):
    build, manifest = cases
    proc = subprocess.run(["ctest", "--output-on-failure", "-R", f"^{test}$"], cwd=build, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NEARL_TEST_CASES": str(manifest)})
    assert proc.returncode == 0 and "100% tests passed" in proc.stdout, proc.stdout + proc.stderr


def test_installed_package_consumer(cases, tmp_path):
    """cmake --install, then a separate project doing find_package(nearl_rt) builds, links and runs."""
    build, manifest = cases
    prefix, consumer = tmp_path / "prefix", tmp_path / "consumer"
    for argv in (["cmake", "--install", str(build), "--prefix", str(prefix)],
                 ["cmake", "-S", str(CPP / "tests" / "consumer"), "-B", str(consumer), f"-DCMAKE_PREFIX_PATH={prefix}"],
                 ["cmake", "--build", str(consumer)]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    cases_ = json.loads(manifest.read_text())
    files = [c["file"] for c in cases_["decode"]][:5] + [cases_["bad"]["undecodable"][0]["file"]]
    proc = subprocess.run([str(consumer / "nearl_consumer"), cases_["model"], *files], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    expected = NearlSession(cases_["model"], preprocess="onnx").predict(files[:-1], top_k=1)
    for i, (line, row) in enumerate(zip(lines, expected)):
        index, name, prob = line.rsplit(" ", 1)[0].split(" ", 1) + [line.rsplit(" ", 1)[1]]
        assert int(index) == i and name == row[0][0] and abs(float(prob) - row[0][1]) <= 1e-6, line
    assert lines[-1].startswith(f"{len(files) - 1} error ") and "CMYK JPEGs are not supported" in lines[-1]


def test_cmake_names_missing_onnxruntime(tmp_path):
    """Configuring cpp/ without onnxruntime stops with the one message saying what is missing and how to fix it."""
    cpp_build()  # skips where cmake / the compiler / the headers are missing
    include = subprocess.run(["bash", str(CPP / "fetch_ort_headers.sh")], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    no_wheel = tmp_path / "python-without-site"  # this Python, without its site-packages (so no onnxruntime)
    no_wheel.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    no_wheel.chmod(0o755)
    for i, (flags, message) in enumerate((
            ([f"-DORT_INCLUDE_DIR={empty}"], f"onnxruntime headers not found in {empty}: run cpp/fetch_ort_headers.sh"),
            ([f"-DONNXRUNTIME_ROOT={empty}"], f"ONNXRUNTIME_ROOT={empty} holds no onnxruntime_cxx_api.h"),
            ([f"-DORT_INCLUDE_DIR={include}", f"-DPython3_EXECUTABLE={no_wheel}"],
             "onnxruntime library not found: no onnxruntime wheel for Python"))):
        proc = subprocess.run(["cmake", "-S", str(CPP), "-B", str(tmp_path / f"build{i}"), *flags],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and message in " ".join(proc.stderr.split()), proc.stderr
