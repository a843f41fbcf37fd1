"""train -> export -> NearlSession.predict on a folder of DICOM (single- and multi-frame, MONOCHROME1,
rescaled, windowed) and 16-bit PNG / TIFF images gives nearl_rt.predict's probabilities; the intensity
policy travels checkpoint -> ONNX metadata -> NearlSession."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nearl_rt.export import onnx as export_onnx
from nearl_rt.core.imaging import IntensityMismatchWarning, IntensityPolicy, expand_frames
from nearl_rt.core.session import NearlSession
import nearl_rt.__main__ as nearl_main
from nearl_rt import predict, train
from tests.test_imaging import write_dicom, xray16
from tests.helpers import cli


def medical_folder(root):
    """Two classes told apart by a bright disc; every file kind in each."""
    def image(cls, seed):
        img = xray16(seed).astype(np.int32)
        return np.clip(img + (1200 if cls == "lesion" else 0) * (np.arange(img.shape[1]) > 30), 0, 4095
                       ).astype(np.uint16)
    for c, cls in enumerate(("clear", "lesion")):
        d = root / cls
        d.mkdir(parents=True)
        s = 10 * c
        Image.fromarray(image(cls, s)).save(d / "a.png")
        Image.fromarray(image(cls, s + 1)).save(d / "b.tif")
        write_dicom(d / "c.dcm", image(cls, s + 2), RescaleSlope=2, RescaleIntercept=-1024)
        write_dicom(d / "d.dcm", image(cls, s + 3), "MONOCHROME1", WindowCenter=2000, WindowWidth=3000)
        write_dicom(d / "cine.dcm", np.stack([image(cls, s + 4), image(cls, s + 5)]))
    return root


def test_train_export_session_equals_predict(tmp_path, capsys):
    data = medical_folder(tmp_path / "d")
    run = tmp_path / "run"
    rc, out, err = cli(train, ["--data", data, "--out", run, "--preset", "tiny", "--shots", "2", "--epochs", "1",
                               "--batch-size", "4", "--interaction", "text_cacheable", "--frames", "each", "--intensity", "percentile:1,99",
                               "--no-progress"], capsys)
    assert rc == 0, err
    policy = IntensityPolicy.parse("percentile:1,99")
    assert torch.load(run / "best.pt", weights_only=True)["extra"]["intensity"] == policy.to_dict()
    rc, out, _ = cli(nearl_main, ["info", run / "best.pt", "--json"], capsys)
    assert rc == 0 and json.loads(out)["intensity"] == "percentile:1,99"

    onnx_path = tmp_path / "m.onnx"
    assert cli(export_onnx, [run / "best.pt", "-o", onnx_path], capsys)[0] == 0
    session = NearlSession(onnx_path)
    assert session.intensity == policy

    rc, _, err = cli(predict, [run, data, "--frames", "each", "--output", tmp_path / "p.json", "--topk", "2"], capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "p.json").read_text())
    files = sorted(str(p) for p in data.rglob("*") if p.is_file())
    sources, _ = expand_frames(files)
    assert [r["input"] for r in results] == [str(s) for s in sources]
    assert sum(":frame=" in r["input"] for r in results) == 4  # 2 cine files x 2 frames
    served = session.predict(sources)
    for r, row in zip(results, served):
        want = {t["class"]: t["probability"] for t in r["top"]}
        got = dict(row)
        assert got.keys() == want.keys()
        assert max(abs(got[k] - want[k]) for k in want) <= 1e-5, r["input"]

    # a multi-frame file without --frames each: one clear line naming it
    rc, _, err = cli(predict, [run, data / "clear" / "cine.dcm"], capsys)
    assert rc == 2 and "cine.dcm holds 2 frames" in err and "--frames each" in err
    # a damaged DICOM among good files: one line naming it, and no output file half-written
    cut = tmp_path / "cut.dcm"
    cut.write_bytes((data / "clear" / "c.dcm").read_bytes()[:-700])
    rc, _, err = cli(predict, [run, data / "clear" / "a.png", cut, "--output", tmp_path / "bad.json"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cut.dcm: truncated or damaged" in err, err
    assert not (tmp_path / "bad.json").exists()
    # another policy than training's warns, and changes what the model sees
    with pytest.warns(IntensityMismatchWarning, match="percentile:1,99"):
        other = NearlSession(onnx_path, intensity=IntensityPolicy.parse("minmax"))
    assert not np.array_equal(other.preprocess(sources[:1]), session.preprocess(sources[:1]))
    with pytest.warns(IntensityMismatchWarning):
        rc, _, _ = cli(predict, [run, data / "clear" / "a.png", "--intensity", "minmax"], capsys)
    assert rc == 0


def test_runs_recorded_before_the_image_options_still_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    settings = {k: None for k in train.RUN_KEYS} | train.RUN_KEY_DEFAULTS
    (run / "run.json").write_text(json.dumps({k: v for k, v in settings.items() if k not in train.RUN_KEY_DEFAULTS}))
    (run / train.STATE).write_bytes(b"")
    assert train.check_out_dir(run, settings, resume=True)
    with pytest.raises(train.NearlError, match="intensity: run has 'minmax', now 'full'"):
        train.check_out_dir(run, settings | {"intensity": "full"}, resume=True)
