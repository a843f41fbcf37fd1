"""train -> resume -> evaluate -> predict end to end on real chest X-rays (tiny preset), the baselines,
and every bad-input case of the CLIs (one clear line, exit code 2, nothing written)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

import nearl_rt
from nearl_rt import evaluate, predict, train
from nearl_rt.classifier import frozen_image_features
from nearl_rt.data import Preprocess
from nearl_rt.sampling import balanced_subset
from tests.helpers import cli, frozen_clip_logits, labels_npz
from tests.test_data import make_tree, write_png

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--preset", "tiny", "--shots", "4", "--epochs", "3", "--batch-size", "4", "--lr", "0.05", "--no-progress"]


def adapters(path):
    return torch.load(path, map_location="cpu", weights_only=True)["adapter"]


def log(run):
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_time_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_evaluate_predict(pneumonia_npz, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    rc, out, _ = cli(train, ["--data", pneumonia_npz, "--out", a, *TRAIN], capsys)
    assert rc == 0 and "17,652 trainable parameters" in out
    assert sorted(p.name for p in a.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl", "run.json",
                                                   "shots.json", "train_state.pt"]
    # interrupted after one epoch, then resumed: bit-for-bit the uninterrupted run
    assert cli(train, ["--data", pneumonia_npz, "--out", b, *TRAIN, "--stop-after", "1"], capsys)[0] == 0
    assert len(log(b)) == 1
    rc, out, _ = cli(train, ["--data", pneumonia_npz, "--out", b, *TRAIN, "--resume"], capsys)
    assert rc == 0 and "resuming" in out
    for name in ("last.pt", "best.pt"):
        wa, wb = adapters(a / name), adapters(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert log(a) == log(b) and len(log(a)) == 3
    assert (a / "shots.json").read_text() == (b / "shots.json").read_text()
    sa = torch.load(a / "train_state.pt", weights_only=True)["optimizer"]["state"]
    sb = torch.load(b / "train_state.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # training moved the adapters (the untrained update is exactly zero)
    trained = adapters(a / "last.pt")
    assert all(trained[k].abs().max() > 0 for k in trained if k.endswith("w_o"))
    rc, out, _ = cli(train, ["--data", pneumonia_npz, "--out", b, *TRAIN, "--resume"], capsys)
    assert rc == 0 and "complete" in out
    (b / "train_state.pt").write_bytes((b / "train_state.pt").read_bytes()[:100])
    rc, _, err = cli(train, ["--data", pneumonia_npz, "--out", b, *TRAIN, "--resume"], capsys)
    assert rc == 2 and "train_state.pt is damaged" in err

    # evaluate: the CLI's numbers are the checkpoint's own predictions on the split
    rc, out, _ = cli(evaluate, [a, "--data", pneumonia_npz, "--split", "test", "--limit", "40", "--json",
                                tmp_path / "eval.json"], capsys)
    assert rc == 0 and "balanced_accuracy" in out
    report = json.loads((tmp_path / "eval.json").read_text())["results"][str(a)]
    model = nearl_rt.load_checkpoint(a / "best.pt")
    temperature = torch.load(a / "best.pt", weights_only=True)["extra"]["calibration"]["temperature"]
    data = np.load(pneumonia_npz)
    subset = balanced_subset(data["test_labels"][:, 0], 40)
    x = Preprocess(model.preprocess_cfg).eval([_pil(data["test_images"][i]) for i in subset])
    with torch.no_grad():  # the probabilities are calibrated: training fitted the temperature on its validation shots
        probs = (model.classify(x).double() / temperature).softmax(-1)
    labels = data["test_labels"][subset, 0]
    assert report["num_images"] == 40 and np.bincount(labels).tolist() == [20, 20]
    assert report["accuracy"] == pytest.approx(float((probs.argmax(-1).numpy() == labels).mean()))
    assert np.array(report["confusion_matrix"]).sum() == 40

    # predict: top-2 with probabilities, CSV and JSON
    rc, out, _ = cli(predict, [a, pneumonia_npz, "--split", "test", "--limit", "5", "--topk", "2"], capsys)
    rows = [line.split(",") for line in out.strip().splitlines()]
    assert rc == 0 and rows[0] == ["input", "rank", "class", "probability"] and len(rows) == 11
    assert rows[1][0].endswith("test:0") and rows[2][0] == rows[1][0] and rows[3][0].endswith("test:1")
    first = subset.index(0)  # test image 0 is in the evaluated subset
    assert float(rows[1][3]) == pytest.approx(probs[first].max().item(), abs=1e-5)
    rc, _, _ = cli(predict, [a, pneumonia_npz, "--limit", "3", "--output", tmp_path / "p.json"], capsys)
    pred = json.loads((tmp_path / "p.json").read_text())
    first3 = probs[[subset.index(j) for j in range(3)]].argmax(-1)
    assert [p["top"][0]["class"] for p in pred] == [model.class_names[i] for i in first3]


def _pil(arr):
    return Image.fromarray(arr).convert("RGB")


def test_zeroshot_and_linear_probe(pneumonia_npz, tmp_path, capsys):
    z, lp = tmp_path / "zs_s1", tmp_path / "lp"
    common = ["--data", pneumonia_npz, "--preset", "tiny", "--shots", "8"]
    for seed in (1, 2):
        run = tmp_path / f"zs_s{seed}"
        assert cli(train, [*common, "--seed", seed, "--method", "zeroshot", "--out", run], capsys)[0] == 0
    common += ["--seed", "1"]
    rc, out, _ = cli(train, [*common, "--method", "linear_probe", "--out", lp], capsys)
    assert rc == 0 and "98 trainable parameters" in out  # 2 classes x (48 + 1)
    data = np.load(pneumonia_npz)
    model = nearl_rt.load_checkpoint(z / "best.pt")
    x = Preprocess(model.preprocess_cfg).eval([_pil(im) for im in data["test_images"][:6]])
    with torch.no_grad():  # zero-shot = the frozen CLIP's own logits
        torch.testing.assert_close(model.classify(x), frozen_clip_logits(model.backbone, x, model.class_tokens),
                                   rtol=1e-5, atol=1e-5)
    # the linear probe is scikit-learn's logistic regression on the training shots' frozen features, with
    # the C it chose on the validation shots (within the CLIP paper's sweep range)
    ckpt = torch.load(lp / "best.pt", weights_only=True)
    head, c = ckpt["extra"]["linear_head"], ckpt["extra"]["linear_probe_C"]
    assert 1e-6 <= c <= 1e6
    shots = json.loads((lp / "shots.json").read_text())
    xs = Preprocess(model.preprocess_cfg).eval([_pil(data["train_images"][i]) for i in shots["train"]])
    with torch.no_grad():
        feats = frozen_image_features(model, xs).double()
    y = data["train_labels"][shots["train"], 0].astype(np.int64)
    reference = LogisticRegression(C=c, max_iter=1000).fit(feats.numpy(), y).predict_proba(feats.numpy())
    probs = (feats.float() @ head["weight"].t() + head["bias"]).softmax(-1)
    np.testing.assert_allclose(probs.numpy(), reference, atol=1e-5)  # the head is stored in float32
    # evaluate / predict use the head: their probabilities are softmax((features @ W.T + b) / T), T calibrated
    rc, out, _ = cli(predict, [lp, pneumonia_npz, "--limit", "3", "--topk", "2"], capsys)
    temperature = ckpt["extra"]["calibration"]["temperature"]
    with torch.no_grad():
        p = ((frozen_image_features(model, x[:3]) @ head["weight"].t() + head["bias"]).double() / temperature).softmax(-1)
    top = [float(r.split(",")[3]) for r in out.strip().splitlines()[1::2]]
    np.testing.assert_allclose(top, p.max(-1).values.numpy(), atol=1e-5)
    # several runs aggregate: zero-shot does not depend on the seed's shots, so its std is 0
    rc, out, _ = cli(evaluate, [tmp_path / "zs_s{seed}", "--seeds", "1", "2", "--data", pneumonia_npz, "--limit", "20",
                                "--json", tmp_path / "zs.json"], capsys)
    summary = json.loads((tmp_path / "zs.json").read_text())["summary"]
    assert rc == 0 and "mean ± std over 2 runs" in out and summary["runs"] == 2
    assert summary["accuracy"]["std"] == 0 and 0 <= summary["accuracy"]["mean"] <= 1


def _bad_image_tree(root):
    make_tree(root, {"a": 2, "b": 1}, "train")
    make_tree(root, {"a": 2, "b": 2}, "val")
    (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


BAD = {
    "empty dataset": (lambda t: (t / "d").mkdir() or t / "d", [], "no class sub-folders"),
    "class with no images": (lambda t: (make_tree(t / "d", {"a": 3}), (t / "d" / "b").mkdir()) and t / "d", [],
                             "class 'b' has no images"),
    "K too large": (lambda t: labels_npz(t / "x.npz", [0] * 20 + [1] * 6), ["--shots", "8"],
                    "--shots 8 is larger than class 'class 1' has: 6 image"),
    "corrupt image": (lambda t: _bad_image_tree(t / "d"), ["--shots", "2"], "cannot read image .*broken.png"),
    "label out of range": (lambda t: labels_npz(t / "x.npz", [0, 1, 5]), ["--classes", "a,b"],
                           "label 5 of image #2 .* out of range for 2 classes"),
    "missing split-JSON path": (lambda t: (write_png(t / "i.png", 0), (t / "s.json").write_text(json.dumps(
        {"train": [["i.png", 0, "n"], ["nope.png", 1, "p"]]})))[0].parent / "s.json", [], "not found, first .*nope.png"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_cleanly(case, tmp_path, capsys):
    make, extra, match = BAD[case]
    data = make(tmp_path)
    out = tmp_path / "run"
    args = ["--data", data, "--out", out, "--preset", "tiny", "--shots", "1", "--epochs", "1", *extra]
    rc, _, err = cli(train, args, capsys)
    assert rc == 2 and err.startswith("nearl_rt.train: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not out.exists()  # nothing half-written


def test_skip_bad_images_counts_them(tmp_path, capsys):
    data = _bad_image_tree(tmp_path / "d")
    rc, out, err = cli(train, ["--data", data, "--out", tmp_path / "r", "--preset", "tiny", "--shots", "1",
                               "--epochs", "1", "--skip-bad-images", "--no-progress"], capsys)
    assert rc == 0 and "skipped 1 unreadable image(s) (1 not an image), first" in err and "broken.png" in err
    assert "broken.png" not in (tmp_path / "r" / "shots.json").read_text()


def test_output_directory_rules(pneumonia_npz, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--data", pneumonia_npz, "--preset", "tiny", "--shots", "1", "--epochs", "1", "--no-progress"]
    assert cli(train, [*base, "--out", run], capsys)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    rc, _, err = cli(train, [*base, "--out", run, "--seed", "5"], capsys)
    assert rc == 2 and "already holds a different run" in err and "--resume" in err
    rc, _, err = cli(train, [*base, "--out", run, "--seed", "5", "--resume"], capsys)
    assert rc == 2 and "holds a different run (seed: run has 0, now 5)" in err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # untouched
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    rc, _, err = cli(train, [*base, "--out", foreign], capsys)
    assert rc == 2 and "not a nearl-rt run directory" in err
    rc, _, err = cli(train, [*base, "--out", foreign / "thesis.tex" / "run"], capsys)
    assert rc == 2 and "cannot create output directory" in err and "writable" in err
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        rc, _, err = cli(train, [*base, "--out", locked / "run"], capsys)
        assert rc == 2 and "Permission denied" in err
    rc, _, err = cli(evaluate, [run, "--data", pneumonia_npz, "--json", tmp_path / "missing" / "e.json"], capsys)
    assert rc == 2 and "does not exist" in err and not (tmp_path / "missing").exists()


def test_evaluate_and_predict_bad_input(pneumonia_npz, tmp_path, capsys):
    rc, _, err = cli(evaluate, [tmp_path / "none.pt", "--data", pneumonia_npz], capsys)
    assert rc == 2 and "checkpoint not found" in err
    rc, _, err = cli(evaluate, [tmp_path / "s{seed}", "--data", pneumonia_npz], capsys)
    assert rc == 2 and "pass --seeds" in err
    rc, _, err = cli(predict, [tmp_path / "none.pt", tmp_path / "nothing.png"], capsys)
    assert rc == 2 and "input not found" in err and "nothing.png" in err


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nearl_rt.train", "--data", str(tmp_path / "gone.npz"),
                           "--shots", "1", "--out", str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"python -m nearl_rt.train: error: dataset not found: {tmp_path / 'gone.npz'}"


def test_folder_tree_train_evaluate_predict(tmp_path, capsys):
    data = make_tree(tmp_path / "d", {"cyst": 3, "solid": 3}, "train")
    make_tree(data, {"cyst": 2, "solid": 2}, "val")
    make_tree(data, {"cyst": 2, "solid": 3}, "test")
    run = tmp_path / "run"
    rc, _, _ = cli(train, ["--data", data, "--out", run, "--preset", "tiny", "--shots", "2", "--epochs", "1",
                           "--template", "an ultrasound of a {} lesion.", "--no-progress"], capsys)
    assert rc == 0
    shots = json.loads((run / "shots.json").read_text())
    assert len(shots["train_images"]) == 4 and all("/train/" in p for p in shots["train_images"])
    assert shots["val_split"] == "val" and all("/val/" in p for p in shots["val_images"])
    rc, out, _ = cli(evaluate, [run, "--data", data, "--split", "test", "--json", tmp_path / "e.json"], capsys)
    result = json.loads((tmp_path / "e.json").read_text())["results"][str(run)]
    assert rc == 0 and result["num_images"] == 5 and np.array(result["confusion_matrix"]).sum(1).tolist() == [2, 3]
    (data / "test" / "solid" / "zz_broken.png").write_bytes(b"not a png")
    rc, _, err = cli(predict, [run, data / "test"], capsys)
    assert rc == 2 and "zz_broken.png" in err and "--skip-bad-images" in err
    rc, out, err = cli(predict, [run, data / "test", "--skip-bad-images", "--output", tmp_path / "p.csv"], capsys)
    lines = (tmp_path / "p.csv").read_text().strip().splitlines()
    assert rc == 0 and "skipped 1" in err and len(lines) == 1 + 5
    assert [line.split(",")[0] for line in lines[1:]] == sorted(str(p) for p in (data / "test").rglob("img*.png"))
