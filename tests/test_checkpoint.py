"""Checkpoints: exact round trip, safe loading, clear errors, atomic writes."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nearl_rt
from nearl_rt.checkpoint import FORMAT_VERSION, load_adapter_weights
from tests.helpers import CLASSES, perturb_adapters, tiny, tiny_inputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path):
    model = perturb_adapters(tiny("text_cacheable", oca_rank=5))
    model.set_classes(CLASSES, template="a chest x-ray of {}.")
    path = nearl_rt.save_checkpoint(model, tmp_path / "ckpt.pt")
    return model, path


def cli_info(path):
    return subprocess.run([sys.executable, "-m", "nearl_rt", "info", str(path)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_round_trip_is_exact(saved):
    model, path = saved
    loaded = nearl_rt.load_checkpoint(path)
    assert loaded.config == model.config and loaded.config.oca_rank == 5
    assert loaded.class_names == CLASSES and loaded.prompts == model.prompts
    a, b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images, _ = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(model.classify(images), loaded.classify(images))
    assert list(path.parent.iterdir()) == [path], "no temp files left behind"
    out = cli_info(path)
    assert out.returncode == 0 and "nearl-tiny" in out.stdout and "a chest x-ray of {}." in out.stdout
    assert "custom" in out.stdout, "oca_rank=5 is not a preset"


def test_info_json_names_the_preset(tmp_path):
    model = tiny("text_cacheable")
    model.set_classes(CLASSES)
    path = nearl_rt.save_checkpoint(model, tmp_path / "ckpt.pt")
    out = subprocess.run([sys.executable, "-m", "nearl_rt", "info", str(path), "--json"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    info = json.loads(out.stdout)
    assert info["preset"] == "tiny" and info["config"]["interaction"] == "text_cacheable"
    assert info["class_names"] == CLASSES and info["adapter_parameters"] == model.num_trainable_parameters()


def _expect_error(path, match):
    with pytest.raises(nearl_rt.CheckpointError, match=match):
        nearl_rt.load_checkpoint(path)
    out = cli_info(path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "error:" in out.stderr, out.stderr
    return out.stderr


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.pt", "not found")


def test_truncated_file(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _expect_error(bad, "damaged or truncated")


def test_random_bytes(tmp_path):
    """Seeded blobs: about one in ten random files makes torch's unpickler raise IndexError or KeyError."""
    bad = tmp_path / "random.pt"
    for seed in range(64):
        bad.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(nearl_rt.CheckpointError, match="not a nearl-rt checkpoint"):
            nearl_rt.load_checkpoint(bad)
    _expect_error(bad, "not a nearl-rt checkpoint")


def test_pickle_carrying_an_object_is_refused(tmp_path):
    for name, writer in (("plain.pkl", lambda f: pickle.dump({"format": Evil()}, f)),
                         ("torch.pt", lambda f: torch.save({"adapter": Evil()}, f))):
        bad = tmp_path / name
        with open(bad, "wb") as f:
            writer(f)
        err = _expect_error(bad, "refuses to unpickle|not a nearl-rt checkpoint")
        assert "pwned" not in err


def test_wrong_format_version(saved, tmp_path):
    _, path = saved
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "future.pt")
    _expect_error(tmp_path / "future.pt", r"format version 2\b.*upgrade nearl-rt")
    torch.save({"some": "dict"}, tmp_path / "other.pt")
    _expect_error(tmp_path / "other.pt", "not a nearl-rt checkpoint")


def test_weights_for_a_different_preset(saved, tmp_path):
    _, path = saved
    payload = torch.load(path, weights_only=True)
    payload["config"]["oca_rank"] = 8  # the tensors are rank 5
    torch.save(payload, tmp_path / "mismatch.pt")
    _expect_error(tmp_path / "mismatch.pt", "different preset")
    with pytest.raises(nearl_rt.CheckpointError, match="different preset.*oca_rank"):
        load_adapter_weights(tiny(), path)
    model = tiny(oca_rank=5)
    load_adapter_weights(model, path)
    assert torch.equal(model.oca_v[1].w_q, saved[0].oca_v[1].w_q)


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def broken_save(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        nearl_rt.save_checkpoint(model, path)
    assert path.read_bytes() == before and list(path.parent.iterdir()) == [path]


def test_written_file_has_the_mode_open_gives(saved, tmp_path):
    _, path = saved
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")  # honours the umask; atomic writes must too (not mkstemp's 0600)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_unwritable_output(saved, tmp_path):
    model, _ = saved
    with pytest.raises(nearl_rt.NearlError, match="does not exist"):
        nearl_rt.save_checkpoint(model, tmp_path / "no" / "such" / "dir" / "c.pt")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(nearl_rt.NearlError, match="cannot write"):
            nearl_rt.save_checkpoint(model, ro / "c.pt")
