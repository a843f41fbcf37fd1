"""Multi-label findings end to end (issue 23): data, sampling, the pair-prompt model, masked BCE, training,
evaluation, prediction, checkpoints, ONNX export and NearlSession, on synthetic images whose findings are
planted patterns (tests.helpers.planted_multilabel)."""
import csv
import json
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, hamming_loss, roc_auc_score

import nearl_rt
from nearl_rt import evaluate, multilabel, predict, train
from nearl_rt.calibration import OperatingPointRule
from nearl_rt.checkpoint import load_checkpoint
from nearl_rt.classifier import Classifier, load_classifier
from nearl_rt.core.metadata import read_metadata
from nearl_rt.core.session import NearlSession
from nearl_rt.data import DataError, Preprocess, read_dataset
from nearl_rt.sampling import sample_shots
from tests.helpers import FINDINGS, cli, frozen_clip_logits, planted_multilabel, tiny, write_planted_npz
from tests.test_data import make_tree, write_png

NAMES = ",".join(FINDINGS)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_npz(tmp_path_factory.mktemp("ml") / "planted.npz", unknown=0.15)


@pytest.fixture(scope="module")
def run(planted, tmp_path_factory):
    """One tiny NEARL run on the planted findings (bidirectional)."""
    out = tmp_path_factory.mktemp("run") / "nearl"
    args = train.build_parser().parse_args(["--data", planted, "--classes", NAMES, "--preset", "tiny", "--shots", "6",
                                            "--steps", "30", "--lr", "2e-2", "--device", "cpu", "--no-progress",
                                            "--out", str(out)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.run(args)
    return out


# ------------------------------------------------------------------------------------------------- data
def write_manifest(tmp_path, rows, header="path,split,effusion,nodule"):
    for row in rows:
        write_png(tmp_path / row.split(",")[0], 1)
    path = tmp_path / "labels.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_npz_and_manifest_read_as_findings(planted, tmp_path):
    ds = read_dataset(planted, classes=FINDINGS)
    assert ds.multi_label and ds.class_names == FINDINGS and ds.split("train").labels.shape == (48, 3)
    assert (ds.split("train").labels == -1).any()
    rows = ["a.png,train,1,", "b.png,train,0,-1", "c.png,val,1.0,0.0", "d.png,test,,1"]
    path = write_manifest(tmp_path, rows)
    by_policy = {u: read_dataset(path, uncertain=u) for u in ("ignore", "zeros", "ones")}
    assert by_policy["ignore"].split("train").labels.tolist() == [[1, -1], [0, -1]]
    assert by_policy["zeros"].split("train").labels.tolist() == [[1, -1], [0, 0]]
    assert by_policy["ones"].split("train").labels.tolist() == [[1, -1], [0, 1]]
    assert by_policy["ignore"].split("test").labels.tolist() == [[-1, 1]]
    picked = read_dataset(path, classes=["nodule"])
    assert picked.class_names == ["nodule"] and picked.split("val").labels.tolist() == [[0]]


def test_single_label_data_is_unchanged(pneumonia_npz):
    ds = read_dataset(pneumonia_npz)
    assert not ds.multi_label and ds.split("train").labels.ndim == 1
    shots = sample_shots(ds, 4, 0)
    assert np.bincount(ds.split("train").labels[shots["train"]]).tolist() == [4, 4]  # K per class, as before
    # --multi-label reads its [N, 1] labels as one finding (named by --classes)
    one = read_dataset(pneumonia_npz, classes=["pneumonia"], multi_label=True)
    assert one.multi_label and one.split("train").labels[:, 0].tolist() == ds.split("train").labels.tolist()


@pytest.mark.parametrize("case, match", [
    ("value", r"labels.csv line 3: finding 'nodule' is '2'; use 1, 0, blank"),
    ("name", r"finding\(s\) \['edema'\] are not in"),
    ("all_unknown", r"finding\(s\) \['nodule'\] are unknown for every image"),
    ("folder", r"cannot hold multi-label findings; use a MedMNIST-style .npz"),
    ("single", r"holds one class per image, not findings"),
])
def test_bad_input_is_one_clear_line(case, match, tmp_path, capsys):
    if case == "folder":
        data, extra = make_tree(tmp_path / "tree", {"a": 2, "b": 2}), ["--multi-label"]
    elif case == "single":
        data, extra = tmp_path / "single.npz", ["--multi-label"]
        np.savez(data, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.array([0, 1, 0, 1]))
    else:
        cells = {"value": ["1,0", "0,2"], "name": ["1,0", "0,1"], "all_unknown": ["1,", "0,"]}[case]
        data = write_manifest(tmp_path, [f"a.png,train,{cells[0]}", f"b.png,train,{cells[1]}"])
        extra = ["--classes", "effusion,edema"] if case == "name" else []
    code, _, err = cli(train, ["--data", data, "--preset", "tiny", "--shots", "1", "--out", tmp_path / "o", *extra],
                       capsys)
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    assert code == 2 and len(lines) == 1, err
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "o").exists()


def test_k_images_per_finding_positive(planted):
    ds = read_dataset(planted, classes=FINDINGS)
    shots = sample_shots(ds, 5, seed=3)
    train_labels = ds.split("train").labels[shots["train"]]
    assert len(set(shots["train"])) == len(shots["train"]) <= 5 * 3
    assert ((train_labels == 1).sum(axis=0) >= 5).all()
    assert ((ds.split("val").labels[shots["val"]] == 1).sum(axis=0) >= 4).all()
    assert shots == sample_shots(ds, 5, seed=3) and shots != sample_shots(ds, 5, seed=4)
    with pytest.raises(DataError, match="larger than finding"):
        sample_shots(ds, 40, seed=0)


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("mode", ["bidirectional", "text_cacheable"])
def test_untrained_equals_frozen_clip_pair_scores(mode):
    model = tiny(mode).eval()
    model.set_findings(FINDINGS, ["a chest X-ray showing {}.", "an image of {}."], "a chest X-ray with no {}.")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.classify(x)
        positive = frozen_clip_logits(model.backbone, x, model.tokenize([t.format(f) for f in FINDINGS for t in (
            "a chest X-ray showing {}.", "an image of {}.")]))
        negative = frozen_clip_logits(model.backbone, x, model.tokenize([f"a chest X-ray with no {f}." for f in FINDINGS]))
    # the ensemble's class feature is the normalised mean of its prompts' features
    feats = torch.nn.functional.normalize(model.backbone.encode_text(model.tokenize(
        [t.format(f) for f in FINDINGS for t in ("a chest X-ray showing {}.", "an image of {}.")])), dim=-1)
    pooled = torch.nn.functional.normalize(feats.view(3, 2, -1).mean(1), dim=-1)
    img = torch.nn.functional.normalize(model.backbone.encode_image(x), dim=-1)
    positive = model.backbone.logit_scale.exp() * img @ pooled.t()
    expected = positive - negative
    assert got.shape == (4, 3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # probability = softmax over the (positive, negative) pair = sigmoid of the difference
    pair = torch.softmax(torch.stack([positive, negative], -1), -1)[..., 0]
    torch.testing.assert_close(torch.sigmoid(got), pair, rtol=1e-4, atol=1e-5)


def test_masked_labels_contribute_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g, requires_grad=True)
    truth = (torch.rand(6, 3, generator=g) < 0.5).long()
    mask = torch.rand(6, 3, generator=g) < 0.3
    labels = torch.where(mask, torch.full_like(truth, -1), truth)
    loss = multilabel.masked_bce(logits, labels)
    loss.backward()
    assert (logits.grad[mask] == 0).all() and (logits.grad[~mask] != 0).all()
    # other logits or flipped truths at the unknown entries: the same loss
    moved = torch.where(mask, logits.detach() * -5 + 3, logits.detach())
    assert multilabel.masked_bce(moved, labels).item() == pytest.approx(loss.item(), rel=1e-6)
    flipped = torch.where(mask, 1 - truth, truth)
    full_weight = multilabel.masked_bce(logits.detach(), torch.where(mask, -1, flipped))
    assert full_weight.item() == pytest.approx(loss.item(), rel=1e-6)
    # metrics: probabilities at unknown entries do not matter, and they match scikit-learn on the known entries
    probs = torch.sigmoid(logits.detach()).double().numpy()
    other = np.where(mask.numpy(), 1.0 - probs, probs)
    names = ["a", "b", "c"]
    m1 = multilabel.multilabel_metrics(labels.numpy(), probs, names)
    m2 = multilabel.multilabel_metrics(labels.numpy(), other, names)
    assert {k: m1[k] for k in multilabel.SUMMARY_KEYS} == {k: m2[k] for k in multilabel.SUMMARY_KEYS}
    known = ~mask.numpy()
    assert m1["hamming_loss"] == pytest.approx(hamming_loss(truth.numpy()[known], (probs >= 0.5)[known]))
    for f, n in enumerate(names):
        y, p = truth.numpy()[known[:, f], f], probs[known[:, f], f]
        if 0 < y.sum() < len(y):
            assert m1["per_finding"][n]["auroc"] == pytest.approx(roc_auc_score(y, p))


def test_training_lowers_masked_bce(run, planted):
    """The masked BCE on the run's training shots: the untrained model (same backbone, fresh adapters) vs last.pt."""
    ds = read_dataset(planted, classes=FINDINGS)
    shots = json.loads((run / "shots.json").read_text())
    part = ds.split("train").subset(shots["train"])
    trained, _ = load_classifier(run / "last.pt", device=torch.device("cpu"))
    fresh = tiny()
    fresh.set_findings(FINDINGS, **trained.model.templates)
    losses = []
    for classifier in (Classifier(fresh.eval()), trained):
        logits, _, _ = classifier.split_logits(part, Preprocess(classifier.preprocess_cfg))
        losses.append(multilabel.masked_bce(torch.from_numpy(logits), torch.from_numpy(part.labels)).item())
    assert losses[1] < losses[0] - 0.02, losses


# ------------------------------------------------------------------------------------------- downstream
def test_checkpoint_round_trip(run):
    model = load_checkpoint(run / "best.pt")
    assert model.multi_label and model.class_names == FINDINGS
    again_dir = run.parent / "again.pt"
    nearl_rt.save_checkpoint(model, again_dir)
    again = load_checkpoint(again_dir)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().classify(x), again.eval().classify(x))
    assert again.templates == model.templates and again.prompts == model.prompts


def test_evaluate_auroc_matches_sklearn_on_saved_output(run, planted, tmp_path, capsys):
    preds = tmp_path / "preds.csv"
    code, out, err = cli(evaluate, [run, "--data", planted, "--data-classes", NAMES, "--predictions", preds,
                                    "--bootstrap", "1000", "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert "macro_auroc" in out and "hamming_loss" in out and "AUROC 95%" in out
    report = json.loads((tmp_path / "r.json").read_text())
    m = report["results"][str(run)]
    images, labels, probs = multilabel.read_predictions(preds, FINDINGS)
    assert len(images) == 48 and (labels != -1).all()
    for f, name in enumerate(FINDINGS):
        assert m["per_finding"][name]["auroc"] == pytest.approx(roc_auc_score(labels[:, f], probs[:, f]), abs=1e-12)
        assert m["per_finding"][name]["auprc"] == pytest.approx(average_precision_score(labels[:, f], probs[:, f]),
                                                                abs=1e-12)
        assert m["per_finding"][name]["threshold_fitted"]  # fitted on the validation shots at training
    assert m["macro_auroc"] == pytest.approx(np.mean([m["per_finding"][n]["auroc"] for n in FINDINGS]))
    with open(preds, newline="") as f:
        row = next(csv.DictReader(f))
    decided = [n for n in FINDINGS if float(row[f"prob_{n}"]) >= m["per_finding"][n]["threshold"]]
    assert row["findings"] == ";".join(decided)


def test_thresholds_fitted_on_validation_by_rule(run, planted):
    classifier, _ = load_classifier(run, device=torch.device("cpu"))
    ds = read_dataset(planted, classes=FINDINGS)
    m, _ = evaluate.evaluate_findings(classifier, ds, "test", operating_point=OperatingPointRule.parse(
        "sensitivity=1"), resamples=0)
    val = evaluate.score_findings(classifier, ds, "val")
    probs = classifier.calibration.probabilities(val.logits)
    for f, name in enumerate(FINDINGS):  # the highest threshold that keeps every validation positive
        assert m["per_finding"][name]["threshold"] == pytest.approx(probs[val.labels[:, f] == 1, f].min())


@pytest.fixture(scope="module")
def onnx_findings(run, tmp_path_factory):
    """The run's best.pt exported (its per-finding thresholds in the metadata)."""
    from nearl_rt.export.onnx import export_model
    classifier, _ = load_classifier(run, device=torch.device("cpu"))
    return export_model(classifier.model, tmp_path_factory.mktemp("onnx") / "findings.onnx",
                        calibration=classifier.calibration), classifier


def test_predict_and_export_parity(run, planted, onnx_findings, tmp_path, capsys):
    code, out, err = cli(predict, [run, planted, "--split", "test", "--limit", "3", "--explain", tmp_path / "maps"],
                         capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "input,rank,class,probability,decision" and len(lines) == 1 + 3 * 3
    assert len(list((tmp_path / "maps").glob("*.npy"))) == 3  # saliency of each image's most probable finding
    onnx_path, classifier = onnx_findings
    meta = read_metadata(onnx_path)
    assert meta["labels"] == "multi" and meta["class_names"] == FINDINGS and set(meta["thresholds"]) == set(FINDINGS)
    session = NearlSession(onnx_path)
    assert session.multi_label
    images, _ = planted_multilabel(5, seed=9)
    x = session.preprocess(list(images))
    logits, probs = session.run(x)
    with torch.no_grad():
        ref = classifier.model.eval().classify(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-ref)), atol=1e-5)
    decided = session.predict(list(images), decision=True)
    for (findings, pairs), p in zip(decided, probs):
        assert findings == [n for n, pn in zip(FINDINGS, p) if pn >= session.thresholds[n]]
        assert len(pairs) == 3
    # evaluate scores the exported file as it is served: the checkpoint's per-finding metrics
    ds = read_dataset(planted, classes=FINDINGS)
    from_file, _ = evaluate.evaluate_findings(load_classifier(onnx_path)[0], ds, "test", resamples=0)
    from_ckpt, _ = evaluate.evaluate_findings(classifier, ds, "test", resamples=0)
    for name in FINDINGS:
        assert from_file["per_finding"][name]["auroc"] == pytest.approx(from_ckpt["per_finding"][name]["auroc"], abs=1e-3)
        assert from_file["per_finding"][name]["threshold"] == from_ckpt["per_finding"][name]["threshold"]


def test_cpp_client_and_triton_repository(onnx_findings, tmp_path):
    """nearl_client prints NearlSession's per-finding probabilities and decisions; the Triton repository labels
    its probs with the findings."""
    import subprocess
    from nearl_rt.serving.triton_repository import Options, write_repository
    from tests.cpp_build import cpp_build
    onnx_path, _ = onnx_findings
    model_dir = write_repository(onnx_path, tmp_path / "repo", Options(gpu=False))
    assert (model_dir / "labels.txt").read_text().splitlines() == FINDINGS
    session = NearlSession(onnx_path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(4).standard_normal((4, 3, 32, 32)).astype(np.float32)
    raw = tmp_path / "batch.f32"
    x.tofile(raw)
    proc = subprocess.run([str(cpp_build() / "nearl_client"), str(onnx_path), "--top-k", "0", "--findings",
                           "--threads", "1", str(raw)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _, probs = session.run(x)
    rows: dict = {}
    decided = {}
    for line in proc.stdout.strip().splitlines():
        image, rank, value, *name = line.split("\t") + [""]
        if rank == "findings":
            decided[image] = [f for f in value.split(";") if f]
        else:
            rows.setdefault(image, {})[name[0]] = float(value)
    for i, p in enumerate(probs):
        key = f"{raw}[{i}]"
        np.testing.assert_allclose([rows[key][f] for f in FINDINGS], p, rtol=0, atol=1e-6)
        assert decided[key] == [f for f, pf in zip(FINDINGS, p) if pf >= session.thresholds[f]]
    single = subprocess.run([str(cpp_build() / "nearl_client"), str(onnx_path), "--findings", str(raw)],
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0


def test_sweep_compares_methods_on_findings(planted, tmp_path, capsys):
    from nearl_rt import sweep
    out = tmp_path / "sweep"
    code, stdout, err = cli(sweep, ["--data", planted, "--classes", NAMES, "--methods", "nearl,linear_probe,zeroshot",
                                    "--shots", "2", "--seeds", "0", "--bootstrap", "0", "--out", out, "--preset", "tiny",
                                    "--steps", "3", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    table = (out / "results.md").read_text()
    assert "pipeline check" in table and "### macro AUROC" in table and "### Hamming loss (lower is better)" in table
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary) == {"nearl", "linear_probe", "zeroshot"}
    _, labels, probs = multilabel.read_predictions(out / "runs" / "zeroshot_k2_s0" / "predictions.csv", FINDINGS)
    expected = np.mean([roc_auc_score(labels[:, f], probs[:, f]) for f in range(3)])
    assert summary["zeroshot"]["2"]["macro_auroc"]["mean"] == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["bidirectional", "text_cacheable"])
def test_triton_backend_scores_findings_as_torch(mode, monkeypatch):
    """The masked BCE of pair-prompt logits and its adapter gradients: backend triton (interpreter) == torch."""
    monkeypatch.delenv("NEARL_RT_BACKEND", raising=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[1, -1, 0], [0, 1, -1]])
    out = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = tiny(mode, backend=backend)
        for p in model.adapter_parameters():  # a non-zero update, so that the adapters matter
            torch.nn.init.normal_(p, std=0.05)
        model.set_findings(FINDINGS)
        loss = multilabel.masked_bce(model(x, model.class_tokens), labels)
        loss.backward()
        out[backend] = (loss.detach(), [p.grad.clone() for p in model.adapter_parameters()])
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-6)
    for got, ref in zip(out["triton"][1], out["torch"][1]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_calibrate_and_save_pretrained_keep_findings(run, planted, tmp_path, capsys):
    import shutil
    ckpt = tmp_path / "best.pt"
    shutil.copy(run / "best.pt", ckpt)
    code, out, err = cli(__import__("nearl_rt.calibrate", fromlist=["x"]), [
        ckpt, "--data", planted, "--data-classes", NAMES, "--split", "val", "--operating-point", "specificity=1"], capsys)
    assert code == 0, err
    assert "per finding (temperature 1)" in out
    classifier, _ = load_classifier(ckpt, device=torch.device("cpu"))
    assert classifier.calibration.multi_label and classifier.calibration.operating_point == "specificity=1"
    val = evaluate.score_findings(classifier, read_dataset(planted, classes=FINDINGS), "val")
    probs = classifier.calibration.probabilities(val.logits)
    for f, name in enumerate(FINDINGS):  # the lowest threshold above every negative
        negatives = probs[val.labels[:, f] == 0, f]
        assert classifier.calibration.thresholds[name] > negatives.max()
    folder = nearl_rt.load_checkpoint(ckpt).save_pretrained(tmp_path / "shared")
    again = nearl_rt.from_pretrained(folder)
    assert again.multi_label and again.class_names == FINDINGS and again.prompts == load_checkpoint(ckpt).prompts


def test_int8_gates_count_finding_decisions():
    from nearl_rt.export.quantize import Gates, ImageSet, QuantizationError, gate_report
    ref = np.array([[0.9, 0.2, 0.6], [0.1, 0.7, 0.4]])
    labels = np.array([[1, 0, -1], [0, 1, 0]])
    report = gate_report(ref, ref + 0.01, ImageSet(np.zeros((2, 3, 4, 4), np.float32), labels), Gates(), "int8",
                         multi_label=True)
    assert report["top1_agreement"] == 1.0 and report["accuracy"]["fp32"] == 1.0
    flipped = ref.copy()
    flipped[1, 2] = 0.55  # one of six (image, finding) decisions changes
    with pytest.raises(QuantizationError, match=r"decision agreement 83.3% < 99.0% \(1 of 6 \(image, finding\) decisions changed\)"):
        gate_report(ref, flipped, ImageSet(np.zeros((2, 3, 4, 4), np.float32)), Gates(), "int8", multi_label=True)


def test_csv_manifest_end_to_end(tmp_path, capsys):
    """Planted images as PNG files behind a manifest with blank (unknown) and -1 (uncertain) cells: zero-shot
    training, then evaluation on the known labels only; --uncertain zeros makes the -1 cells known."""
    from PIL import Image
    rows = []
    for split, count, seed in (("train", 24, 0), ("val", 24, 1), ("test", 12, 2)):
        images, labels = planted_multilabel(count, seed)
        for i, (im, y) in enumerate(zip(images, labels)):
            name = f"{split}/{i}.png"
            (tmp_path / split).mkdir(exist_ok=True)
            Image.fromarray(im).save(tmp_path / name)
            cells = [str(v) for v in y]
            if split == "test" and i < 3:
                cells[0], cells[1] = "", "-1"  # effusion unknown, cardiomegaly uncertain
            rows.append(",".join([name, split, *cells]))
    manifest = tmp_path / "findings.csv"
    manifest.write_text("path,split," + NAMES + "\n" + "\n".join(rows) + "\n")
    code, _, err = cli(train, ["--data", manifest, "--preset", "tiny", "--shots", "2", "--method", "zeroshot",
                               "--device", "cpu", "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    known = {}
    for policy in ("ignore", "zeros"):
        code, out, err = cli(evaluate, [tmp_path / "run", "--data", manifest, "--uncertain", policy, "--bootstrap", "0",
                                        "--json", tmp_path / f"{policy}.json"], capsys)
        assert code == 0, err
        per = json.loads((tmp_path / f"{policy}.json").read_text())["results"][str(tmp_path / "run")]["per_finding"]
        known[policy] = [per[f]["known"] for f in FINDINGS]
    assert known == {"ignore": [9, 9, 12], "zeros": [9, 12, 12]}


@pytest.mark.parametrize("method", ["coop", "tip_adapter", "kgcoop"])
def test_single_label_methods_refuse_findings_in_one_line(planted, method, tmp_path, capsys):
    """The registered methods other than multilabel.METHODS score classes, not findings: train and sweep say so."""
    code, _, err = cli(train, ["--data", planted, "--classes", ",".join(FINDINGS), "--preset", "tiny", "--shots", "1",
                               "--method", method, "--out", tmp_path / "o"], capsys)
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    assert code == 2 and len(lines) == 1, err
    assert f"--method {method} are single-label only (multi-label methods: nearl, zeroshot, linear_probe)" in lines[0]
    assert not (tmp_path / "o").exists()
    from nearl_rt import sweep
    code, _, err = cli(sweep, ["--data", planted, "--classes", ",".join(FINDINGS), "--methods", f"nearl,{method}",
                               "--shots", "1", "--seeds", "0", "--out", tmp_path / "s", "--preset", "tiny"], capsys)
    assert code == 2 and f"the methods ['{method}'] are single-label only" in err, err


def test_int8_export_keeps_the_findings(onnx_findings, planted, tmp_path):
    """Dynamic int8 of a multi-label export: same findings and thresholds in the metadata, per-finding sigmoid
    probabilities [B, F] close to the fp32 file's on planted images, gates counted per (image, finding) decision."""
    from nearl_rt.export.quantize import Gates, ImageSet, quantize
    onnx_path, _ = onnx_findings
    fp32 = NearlSession(onnx_path)
    images, labels = planted_multilabel(24, seed=5)
    x = fp32.preprocess(list(images))
    out = tmp_path / "findings.int8.onnx"
    # the tiny random model's logits are a few units: int8 moves a probability by < 0.1 (the gate checks it)
    report = quantize(onnx_path, out, verification=ImageSet(x, labels.astype(np.int64), "planted"),
                      gates=Gates(min_agreement=0.9, max_accuracy_change=10.0, max_prob_diff=0.1))
    meta = read_metadata(out)
    assert meta["labels"] == "multi" and meta["class_names"] == FINDINGS and meta["precision"] == "int8"
    assert meta["thresholds"] == read_metadata(onnx_path)["thresholds"]
    int8 = NearlSession(out)
    assert int8.multi_label
    probs8, probs32 = int8.run(x)[1], fp32.run(x)[1]
    assert probs8.shape == (24, len(FINDINGS))
    assert np.abs(probs8 - probs32).max() <= 0.1 and np.abs(probs8 - probs32).max() > 0  # quantised, not a copy
    assert report["top1_agreement"] >= 0.9


@pytest.mark.parametrize("labels", [[[0.7, 1.0], [0.0, 1.0]], [[1.0, np.nan], [0.0, 1.0]], [0.5, 1.0]])
def test_non_integer_npz_labels_are_refused_not_truncated(labels, tmp_path):
    path = tmp_path / "soft.npz"
    np.savez(path, train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.array(labels, np.float32))
    with pytest.raises(DataError, match=r"soft.npz: train_labels holds non-integer values \(e.g. (0.7|nan|0.5)"):
        read_dataset(path)
