"""The rough edges a new user hit (issue 28, part 2), one test each; the export verification (part 1) is tested
in test_export.py, the C++ client's file names in test_cpp_client.py, export.serve's labels and 4xx answers in
test_serve.py, the Triton repository's errors and docker hint in test_triton_repo.py, bench/latency.py --quick
in test_bench_latency.py, the shipped real data in test_data.py."""
import re
import shutil
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nearl_rt
from nearl_rt import __main__ as entry
from nearl_rt import train
from nearl_rt.core.errors import ClassNamesWarning
from nearl_rt.core.imaging import ImageError
from tests.export_cases import exported, tiny_model
from tests.helpers import CLASSES, cli

ROOT = Path(__file__).resolve().parents[1]


def test_info_describes_an_exported_onnx_file(tmp_path, capsys):
    """`nearl-rt info model.onnx` describes the export (item 2), also when the file lost its .onnx suffix."""
    renamed = tmp_path / "model.bin"
    shutil.copyfile(exported("text_cacheable"), renamed)
    for path in (exported("text_cacheable"), renamed):
        rc, out, err = cli(entry, ["info", path], capsys)
        assert rc == 0, err
        assert "ONNX, classifier" in out and "unpickle" not in out + err
        assert str(CLASSES) in out and "'images': ['batch', 3, 32, 32]" in out and "text_cacheable" in out


def test_info_reads_a_save_pretrained_folder_and_names_a_missing_path(tmp_path, capsys):
    """`info` tells exports, checkpoints and save-pretrained folders apart (a folder is no ONNX file)."""
    model = tiny_model("bidirectional")
    folder = model.save_pretrained(tmp_path / "share")
    rc, out, err = cli(entry, ["info", folder], capsys)
    assert rc == 0, err
    assert "adapter_parameters" in out and str(CLASSES) in out
    rc, _, err = cli(entry, ["info", tmp_path / "missing.pt"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "missing.pt" in err


def test_load_checkpoint_names_an_onnx_file_for_what_it_is(tmp_path):
    """load_checkpoint on an export says it is an ONNX model and what to do (item 14), with or without .onnx."""
    renamed = tmp_path / "model.pt"
    shutil.copyfile(exported("bidirectional"), renamed)
    for path in (exported("bidirectional"), renamed):
        with pytest.raises(nearl_rt.CheckpointError, match=r"is an exported ONNX model, not a nearl-rt checkpoint: "
                                                           r"serve it with nearl_rt.NearlSession") as e:
            nearl_rt.load_checkpoint(path)
        assert "unpickle" not in str(e.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x08" + bytes(range(200)))  # starts like an ONNX file, is none
    with pytest.raises(nearl_rt.CheckpointError, match="damaged or truncated|not a nearl-rt checkpoint"):
        nearl_rt.load_checkpoint(garbage)


def test_readme_evaluates_the_int8_file_the_export_wrote():
    """The README's int8 lines (item 3): the evaluate line names the file the export line writes, and the text
    says that the tiny preset misses the default gates and how to relax them."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    export = re.search(r"python -m export\.onnx (\S+)\.pt --int8", readme)
    assert export, "README shows the int8 export"
    assert f"python -m nearl_rt.evaluate {export.group(1)}.int8.onnx" in readme
    assert "--min-agreement" in readme and "tiny" in readme


def _npz(path, n=6):
    rng = np.random.default_rng(0)
    np.savez(path, **{f"{s}_images": rng.integers(0, 256, (n, 8, 8), dtype=np.uint8) for s in ("train", "val")},
             **{f"{s}_labels": np.arange(n)[:, None] % 2 for s in ("train", "val")})
    return path


def test_an_unnamed_npz_warns_that_its_prompts_are_placeholders(tmp_path):
    """A MedMNIST file renamed by the user (item 6): a loud warning that names the flag, and --data-classes."""
    from nearl_rt.data import read_dataset
    data = _npz(tmp_path / "pneumonia.npz")
    with pytest.warns(ClassNamesWarning, match=r"\['class 0', 'class 1'\].*--data-classes a,b"):
        ds = read_dataset(data)
    assert ds.class_names == ["class 0", "class 1"] and not ds.named
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: no warning; a MedMNIST file name still names its classes
        assert read_dataset(data, classes=["normal", "pneumonia"]).class_names == ["normal", "pneumonia"]
        assert read_dataset(_npz(tmp_path / "pneumoniamnist_28.npz")).class_names == ["normal", "pneumonia"]
        read_dataset(data, names_matter=False)  # predict reads only the images
    args = train.build_parser().parse_args(["--data", str(data), "--shots", "1", "--out", "x",
                                            "--data-classes", "normal,pneumonia"])
    assert args.classes == "normal,pneumonia"


def test_classify_takes_images_and_paths(tmp_path):
    """model.classify on PIL images, paths and arrays (item 7): what the preprocessed tensor gives."""
    model = tiny_model("text_cacheable")
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (37, 51, 3), dtype=np.uint8)) for _ in range(2)]
    images[1].save(tmp_path / "b.png")
    with torch.no_grad():
        want = model.classify(model.preprocess(images))
        got = model.classify([images[0], tmp_path / "b.png"])
        one = model.classify(images[0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(one, want[:1])  # a batch of 1: float32 sums may block differently
    with pytest.raises(TypeError, match=r"take a float tensor \[B, 3, 32, 32\] or images"):
        model.classify([object()])


def test_cli_warnings_are_one_line_each(pneumonia_npz, tmp_path):
    """A command prints each distinct warning once, as one line (item 8): the random-backbone warning of train
    (which builds the model twice: to train, and to calibrate best.pt) and of evaluate, as users run them."""
    import os
    import sys
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    commands = {"nearl_rt.train": ["--data", pneumonia_npz, "--preset", "tiny", "--shots", "2", "--epochs", "1",
                                   "--out", tmp_path / "run", "--no-progress"],
                "nearl_rt.evaluate": [tmp_path / "run", "--data", pneumonia_npz, "--split", "test", "--limit", "8"]}
    for module, args in commands.items():
        proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "random weights" in line]
        assert len(lines) == 1 and lines[0].startswith(f"python -m {module}: warning: backbone nearl-tiny has random"), \
            proc.stderr
        assert "warnings.warn" not in proc.stderr and ".py:" not in proc.stderr  # no source lines


def test_gitignore_covers_the_default_output_folders():
    """`nearl-demo/` (the demo's default --out) and `sweeps/` (README's sweep --out) are ignored (item 11)."""
    from nearl_rt.demo import DEFAULT_OUT
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (f"{DEFAULT_OUT}/run/best.pt", "sweeps/mine/results.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (8-bit RGB) and holds one tiny IDAT: what a decompression bomb's
    first bytes look like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_an_image_error_naming_the_file(tmp_path):
    """NearlSession.predict and load_image refuse a 40000 x 40000 PNG with the project's image error (item 14)."""
    bomb = _png_header_only(tmp_path / "bomb.png", 40000, 40000)
    session = nearl_rt.NearlSession(exported("text_cacheable"))
    with pytest.raises(ImageError, match=rf"{bomb} is too large to decode safely .*MAX_IMAGE_PIXELS"):
        session.predict([bomb])
