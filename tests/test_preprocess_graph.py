"""nearl_rt/export/preprocess_graph.py: the uint8 ONNX preprocessing equals nearl_rt.core.preprocess (Pillow) within one
uint8 step on a few values, end to end within 1e-5; NearlSession(preprocess="onnx"); clear errors."""
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import nearl_rt.export.preprocess_graph as pg
from nearl_rt.core.imaging import load_image
from nearl_rt.core.preprocess import preprocess_image
from nearl_rt.core.session import NearlSession, preprocess_graph_path, sha256_file
from tests.export_cases import TINY_PREPROCESS_PROBS_ATOL, exported, exported_with_preprocess

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def smooth_noisy(rng, h, w, c=3):
    """A gradient plus noise: pure noise is not an image, a flat colour tests nothing."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([np.sin(5 * xx + 3 * yy + p) for p in rng.uniform(0, 6, c)], -1) * 90 + 128
    return np.clip(base + rng.normal(0, 30, (h, w, c)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [32, 57])
def test_graph_matches_pillow_within_one_step(size, tmp_path):
    """Fresh images of odd sizes: both sides of Pillow's pass-order rule (height shrinks and h > 2w),
    up- and downscaling, strips, no-op, gray given as C = 1."""
    path = tmp_path / "pre.onnx"
    onnx.save(pg.build_preprocess_graph(size, MEAN, STD), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(size)
    shapes = [(81, 40), (80, 40), (2 * size + 1, size), (2 * size, size), (40, 81), (size, size), (size - 3, size + 5),
              (3, 2 * size + 7), (5 * size + 1, 2), (1, 1), (223, 301), (401, 150)]
    step = 1 / 255 / np.asarray(STD, np.float32).reshape(3, 1, 1)
    for i, (h, w) in enumerate(shapes):
        img = smooth_noisy(rng, h, w, 1 if i % 4 == 3 else 3)
        got = session.run(["images"], {"image": img[None]})[0]
        want = preprocess_image(load_image(img), size, MEAN, STD)
        assert got.shape == (1, 3, size, size) and got.dtype == np.float32
        steps = np.abs(got[0] - want) / step
        assert steps.max() <= 1 + 1e-3 and (steps > 1e-3).mean() <= pg.MAX_SHARE, (h, w, steps.max())


def test_written_graph_metadata_and_checks():
    model = exported_with_preprocess("bidirectional")
    graph = preprocess_graph_path(model)
    assert graph.name == model.stem + ".preprocess.onnx"
    onnx.checker.check_model(str(graph), full_check=True)
    proto = onnx.load(str(graph))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [pg.OPSET] == [18]
    meta = pg.read_preprocess_metadata(graph)
    assert meta["kind"] == "preprocess" and meta["classifier_sha256"] == sha256_file(model)
    assert meta["input_size"] == [32, 32] and meta["interpolation"] == "bicubic" and meta["resize_mode"] == "shortest"
    r = pg.verify_preprocess_graph(graph, model, seed=7, probs_atol=TINY_PREPROCESS_PROBS_ATOL)
    assert r["max_steps"] <= 1 + 1e-3 and r["max_share"] <= pg.MAX_SHARE and r["probs"] <= TINY_PREPROCESS_PROBS_ATOL


@pytest.mark.parametrize("fixed", [False, True])
def test_session_onnx_preprocess_matches_pillow(fixed, tmp_path):
    model = exported_with_preprocess("text_cacheable", **({"batch_size": 2, "optimize": True} if fixed else {}))
    rng = np.random.default_rng(3)
    images = [smooth_noisy(rng, 45, 97), smooth_noisy(rng, 130, 41), smooth_noisy(rng, 20, 23)[:, :, 0]]
    load_image(images[0]).save(tmp_path / "a.png")
    images.append(tmp_path / "a.png")
    pillow, graph = NearlSession(model), NearlSession(model, preprocess="onnx")
    a, b = pillow.preprocess(images), graph.preprocess(images)
    assert a.shape == b.shape == (4, 3, 32, 32)
    assert np.abs(a - b).max() <= 1 / 255 / min(pillow.metadata["std"]) + 1e-6  # at most one uint8 step
    pa, pb = pillow.predict(images), graph.predict(images)
    for ra, rb in zip(pa, pb):
        np.testing.assert_allclose([p for _, p in ra], [dict(rb)[n] for n, _ in ra], atol=TINY_PREPROCESS_PROBS_ATOL,
                                   rtol=0)


def test_bad_preprocess_graphs(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(exported("bidirectional"), model)
    with pytest.raises(ValueError, match="preprocess='opencv'"):
        NearlSession(model, preprocess="opencv")
    with pytest.raises(FileNotFoundError, match=r"m.preprocess.onnx \(write it with `python -m export.preprocess_graph"):
        NearlSession(model, preprocess="onnx")
    other = exported_with_preprocess("text_cacheable")
    shutil.copy(preprocess_graph_path(other), preprocess_graph_path(model))  # another classifier's graph
    with pytest.raises(ValueError, match="written for another classifier"):
        NearlSession(model, preprocess="onnx")
    shutil.copy(model, preprocess_graph_path(model))  # a classifier where the graph should be
    with pytest.raises(ValueError, match="not a nearl preprocessing graph"):
        NearlSession(model, preprocess="onnx")
    with pytest.raises(pg.PreprocessGraphError, match="bicubic shortest-side resize only"):
        pg.build_preprocess_graph(32, MEAN, STD, interpolation="bilinear")


def test_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    shutil.copy(exported("bidirectional"), model)
    monkeypatch.setattr(pg, "MAX_SHARE", -1.0)
    with pytest.raises(pg.PreprocessGraphError, match="disagrees with nearl_rt.core.preprocess"):
        pg.export_preprocess_graph(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_cli_writes_graph(tmp_path, capsys, monkeypatch):
    from nearl_rt.core.cli import run_cli
    monkeypatch.setattr(pg, "PROBS_ATOL", TINY_PREPROCESS_PROBS_ATOL)  # the tiny model, see export_cases
    model = tmp_path / "m.onnx"
    shutil.copy(exported("bidirectional"), model)
    assert run_cli(pg.main, [str(model)], prog="python -m export.preprocess_graph") == 0
    out = capsys.readouterr()
    assert f"wrote {tmp_path / 'm.preprocess.onnx'}" in out.out and "verified m.preprocess.onnx" in out.err
    assert run_cli(pg.main, [str(tmp_path / "nope.onnx")], prog="python -m export.preprocess_graph") == 2
    assert capsys.readouterr().err.strip() == (f"python -m export.preprocess_graph: error: ONNX model not found: "
                                               f"{tmp_path / 'nope.onnx'} (export one with `python -m export.onnx CKPT`)")


def test_export_cli_preprocess_flag(tmp_path, capsys, monkeypatch):
    """`python -m export.onnx CKPT --preprocess` writes both files; the graph belongs to the classifier."""
    import nearl_rt.export.onnx as export_onnx
    import nearl_rt
    from nearl_rt.core.cli import run_cli
    from tests.export_cases import tiny_model
    monkeypatch.setattr(pg, "PROBS_ATOL", TINY_PREPROCESS_PROBS_ATOL)  # the tiny model, see export_cases
    ckpt = nearl_rt.save_checkpoint(tiny_model("bidirectional"), tmp_path / "tiny.pt")
    assert run_cli(export_onnx.main, [str(ckpt), "--preprocess"], prog="python -m export.onnx") == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'tiny.onnx'}" in out and f"wrote {tmp_path / 'tiny.preprocess.onnx'}" in out
    meta = pg.read_preprocess_metadata(tmp_path / "tiny.preprocess.onnx")
    assert meta["classifier_sha256"] == sha256_file(tmp_path / "tiny.onnx")
