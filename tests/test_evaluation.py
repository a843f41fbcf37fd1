"""Evaluation a clinician would accept (docs/evaluation.md): operating points, calibration, bootstrap intervals,
per-image output. Metrics against scikit-learn and brute-force definitions; the calibrated probabilities through
checkpoint -> ONNX -> NearlSession; evaluate / calibrate / train end to end on the bundled chest X-rays; bad input."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import softmax
from sklearn import metrics as skm

import nearl_rt
from nearl_rt import __main__ as nearl_main
from nearl_rt import calibrate, evaluate, predict, train
from nearl_rt.calibration import (ECE_BINS, TEMPERATURE_BOUNDS, Calibration, CalibrationError, OperatingPointRule,
                                  expected_calibration_error, fit_calibration, fit_temperature, fit_threshold)
from nearl_rt.checkpoint import update_extra
from nearl_rt.classifier import load_classifier
from nearl_rt.core.session import NearlSession
from nearl_rt.demo import DEMO_DATA
from nearl_rt.export.onnx import export_checkpoint
from nearl_rt.metrics import (auroc_batch, average_precision_batch, bootstrap_intervals, classification_metrics,
                              evaluation_metrics, operating_point_metrics)
from tests.helpers import cli, perturb_adapters, tiny
from tests.test_data import make_tree


def scores_with_signal(rng, n, classes=2, signal=1.5, scale=1.0):
    """labels [n] and logits [n, C] whose true class gets +signal: an imperfect classifier."""
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + signal * np.eye(classes)[labels]
    return labels, scale * logits


# ------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", range(6))
def test_batched_auroc_and_average_precision_equal_scikit_learn(seed):
    """The forms the bootstrap recomputes for many resamples at once equal scikit-learn, ties included."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 90))
    positive = rng.random(n) < rng.uniform(0.15, 0.85)
    positive[:2] = [True, False]
    scores = rng.random((4, n)).round(int(rng.integers(1, 3)))  # rounding makes ties
    for row, auc, ap in zip(scores, auroc_batch(scores, positive), average_precision_batch(scores, positive)):
        assert auc == pytest.approx(skm.roc_auc_score(positive, row), abs=1e-12)
        assert ap == pytest.approx(skm.average_precision_score(positive, row), abs=1e-12)


def test_auprc_per_class_and_macro_are_scikit_learns():
    rng = np.random.default_rng(3)
    labels, logits = scores_with_signal(rng, 120, classes=4)
    probs = softmax(logits, axis=1)
    m = classification_metrics(labels, probs, list("abcd"))
    per_class = [skm.average_precision_score(labels == c, probs[:, c]) for c in range(4)]
    assert m["per_class_auprc"] == dict(zip("abcd", per_class))
    assert m["auprc"] == np.mean(per_class)


def test_operating_point_metrics_by_hand_and_by_scikit_learn():
    positive = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.6, 0.2, 0.7, 0.4, 0.1, 0.6])
    m = operating_point_metrics(positive, scores, 0.6)  # decided positive: 0.9, 0.6, 0.7, 0.6 (>= 0.6)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 2, 1)
    assert m["sensitivity"] == 2 / 3 and m["specificity"] == 2 / 4 and m["ppv"] == 2 / 4 and m["npv"] == 2 / 3
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    decided = scores >= 0.6
    assert m["f1"] == skm.f1_score(positive, decided) and m["ppv"] == skm.precision_score(positive, decided)
    assert operating_point_metrics(positive, scores, 0.95)["ppv"] is None  # nothing decided positive


def test_bootstrap_interval_contains_the_estimate_narrows_with_more_images_and_repeats():
    rng = np.random.default_rng(0)
    widths = []
    for n in (120, 1920):
        labels, logits = scores_with_signal(rng, n)
        probs = softmax(logits, axis=1)
        m = classification_metrics(labels, probs, ["a", "b"])
        point = {**m, **operating_point_metrics(labels == 1, probs[:, 1], 0.5)}
        ci = bootstrap_intervals(labels, probs, {1: 0.5}, resamples=1000, seed=7)
        intervals = {**{k: ci[k] for k in ("accuracy", "balanced_accuracy", "auc", "auprc")}, **ci["per_class"][1]}
        assert set(ci["per_class"][1]) == {"auc", "auprc", "sensitivity", "specificity"}
        for key, (low, high) in intervals.items():
            value = point[key] if key in ("sensitivity", "specificity") else m[key]
            assert low <= value <= high, (n, key, low, value, high)
        widths.append({k: hi - lo for k, (lo, hi) in intervals.items()})
        again = bootstrap_intervals(labels, probs, {1: 0.5}, resamples=1000, seed=7)
        other = bootstrap_intervals(labels, probs, {1: 0.5}, resamples=1000, seed=8)
        assert again == ci and other != ci
    for key in widths[0]:  # 16x the images: about 4x narrower
        assert widths[1][key] < 0.5 * widths[0][key], key


def test_bootstrap_resamples_within_each_class():
    """Two positives among 200 images: a plain bootstrap would draw resamples without any (AUROC undefined);
    a stratified one keeps both in every resample, so the interval exists."""
    rng = np.random.default_rng(1)
    labels = np.zeros(200, int)
    labels[:2] = 1
    probs = softmax(rng.normal(size=(200, 2)), axis=1)
    ci = bootstrap_intervals(labels, probs, resamples=1000, seed=0)
    assert all(np.isfinite(ci["auc"])) and all(np.isfinite(ci["per_class"][1]["auprc"]))


def test_bootstrap_of_a_class_with_one_image_or_of_one_class():
    """A class with one test image stays in every resample (as it is); a test set of one class has no AUROC;
    one image per class leaves nothing to resample (no intervals rather than an error)."""
    rng = np.random.default_rng(2)
    labels = np.array([1] + [0] * 59)
    probs = softmax(rng.normal(size=(60, 2)), axis=1)
    ci = bootstrap_intervals(labels, probs, {1: 0.5})
    auc = skm.roc_auc_score(labels == 1, probs[:, 1])
    assert ci["auc"][0] <= auc <= ci["auc"][1] and ci["auc"][0] < ci["auc"][1]
    sensitivity = float(probs[0, 1] >= 0.5)
    assert ci["per_class"][1]["sensitivity"] == [sensitivity, sensitivity]
    only = bootstrap_intervals(np.zeros(30, int), softmax(rng.normal(size=(30, 2)), axis=1))
    assert "auc" not in only and only["accuracy"][0] <= only["accuracy"][1]
    assert bootstrap_intervals(np.array([0, 1]), probs[:2]) == {"per_class": {}}
    m = evaluation_metrics(np.array([0, 1]), rng.normal(size=(2, 2)), ["a", "b"])
    assert m["ci95"] == {} and m["num_images"] == 2


# --------------------------------------------------------------------------------------- calibration
def brute_ece(labels, probs):
    """15 equal-width bins [k/15, (k+1)/15), the last one closed, by explicit loops."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for k in range(ECE_BINS):
        lo, hi = k / ECE_BINS, (k + 1) / ECE_BINS
        inside = [i for i in range(len(conf)) if lo <= conf[i] < hi or (k == ECE_BINS - 1 and conf[i] == 1.0)]
        if inside:
            acc = np.mean([pred[i] == labels[i] for i in inside])
            total += len(inside) / len(conf) * abs(acc - np.mean(conf[inside]))
    return total


@pytest.mark.parametrize("seed", range(3))
def test_ece_is_its_definition(seed):
    rng = np.random.default_rng(seed)
    labels, logits = scores_with_signal(rng, 300, classes=3, scale=2.0)
    probs = softmax(logits, axis=1)
    probs[:3] = [[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [8 / 15, 7 / 15, 0.0]]  # confidences on bin edges
    assert expected_calibration_error(labels, probs) == pytest.approx(brute_ece(labels, probs), abs=1e-12)


def test_temperature_undoes_over_and_under_confidence_and_keeps_the_argmax():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 3)) * 1.5
    labels = np.array([rng.choice(3, p=p) for p in softmax(true_logits, axis=1)])  # calibrated by construction
    fit, held = slice(0, 2000), slice(2000, None)
    for factor in (3.0, 1 / 3):  # over-confident (logits scaled up), under-confident
        logits = factor * true_logits
        t = fit_temperature(logits[fit], labels[fit])
        assert t == pytest.approx(factor, rel=0.15)
        before = expected_calibration_error(labels[held], softmax(logits[held], axis=1))
        after = expected_calibration_error(labels[held], softmax(logits[held] / t, axis=1))
        assert after < 0.5 * before, (factor, before, after)
        assert (softmax(logits / t, axis=1).argmax(1) == logits.argmax(1)).all()


def test_the_prior_keeps_a_tiny_separable_fit_set_finite():
    """8 perfectly separated images: the NLL alone falls as T -> 0; the prior on ln T stops it well above the
    bound, and with 100x the images the data moves T further down."""
    labels = np.array([0, 1] * 4)
    logits = np.stack([1.0 - labels, labels.astype(float)], 1) * 2.0
    few, many = fit_temperature(logits, labels), fit_temperature(np.tile(logits, (100, 1)), np.tile(labels, 100))
    assert TEMPERATURE_BOUNDS[0] * 2 < few < 1.0 and many < few


@pytest.mark.parametrize("seed", range(4))
def test_each_rule_picks_the_threshold_its_definition_names(seed):
    """On the images it was fitted on: youden maximises sensitivity + specificity; sensitivity=X reaches X with
    the highest possible threshold; specificity=X reaches X with the lowest one (brute force over every image's
    score as a candidate)."""
    rng = np.random.default_rng(seed)
    labels, logits = scores_with_signal(rng, int(rng.integers(20, 200)))
    positive, scores = labels == 1, softmax(logits, axis=1)[:, 1]
    rates = {t: operating_point_metrics(positive, scores, t) for t in np.unique(scores)}
    youden = fit_threshold(positive, scores, OperatingPointRule.parse("youden"))
    best_j = max(r["sensitivity"] + r["specificity"] for r in rates.values())
    assert rates[youden]["sensitivity"] + rates[youden]["specificity"] == pytest.approx(best_j)
    for target in (0.95, 0.8, 1.0):
        t = fit_threshold(positive, scores, OperatingPointRule.parse(f"sensitivity={target}"))
        assert rates[t]["sensitivity"] >= target
        assert all(r["sensitivity"] < target for u, r in rates.items() if u > t)
    for target in (0.9, 0.5):
        t = fit_threshold(positive, scores, OperatingPointRule.parse(f"specificity={target}"))
        assert rates[t]["specificity"] >= target
        assert all(r["specificity"] < target for u, r in rates.items() if u < t)


def test_rules_parse_and_bad_ones_say_what_works():
    assert str(OperatingPointRule.parse("sensitivity=0.95")) == "sensitivity=0.95"
    assert OperatingPointRule.parse(" specificity=.9 ") == OperatingPointRule("specificity", 0.9)
    for bad in ("youdon", "sensitivity=1.5", "specificity=0", "sensitivity", "recall=0.9", "sensitivity=-0.1"):
        with pytest.raises(CalibrationError, match="is not a rule: use youden, sensitivity=X or specificity=X"):
            OperatingPointRule.parse(bad)


def test_nothing_is_fitted_on_images_of_one_class():
    logits = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(CalibrationError, match=r"no images of class\(es\) \['b'\].*use a labelled split with images"):
        fit_calibration(logits, np.zeros(10, int), ["a", "b"], OperatingPointRule("youden"))
    with pytest.raises(CalibrationError, match="no threshold reaches specificity=1"):
        fit_threshold(np.array([0, 1, 1, 0], bool), np.array([0.9, 0.5, 0.4, 0.1]), OperatingPointRule("specificity", 1.0))


def test_stored_calibration_is_applied_and_checked():
    cal = Calibration.from_dict({"temperature": 2.0, "operating_point": "youden", "thresholds": {"b": 0.4}})
    logits = np.array([[0.0, 2.0]])
    np.testing.assert_allclose(cal.probabilities(logits), softmax(logits / 2.0, axis=1))
    assert Calibration.from_dict(None).probabilities(logits).tolist() == softmax(logits, axis=1).tolist()
    for bad in ({"temperature": -1}, {"temperature": float("nan")}, {"temperature": 1.0, "thresholds": {"b": 2}},
                {"thresholds": {}}):
        with pytest.raises(CalibrationError, match="recalibrate it with `python -m nearl_rt.calibrate`"):
            Calibration.from_dict(bad, "x.pt")


# ------------------------------------------------- checkpoint -> ONNX -> NearlSession, int8 included
def test_temperature_and_threshold_survive_checkpoint_onnx_session_and_int8(tmp_path):
    from nearl_rt.export.quantize import Gates, quantize
    model = perturb_adapters(tiny(backend="torch"), seed=5).eval()
    model.set_classes(["normal", "pneumonia"], "a chest x-ray showing {}.")
    ckpt = nearl_rt.save_checkpoint(model, tmp_path / "c.pt")
    stored = Calibration(1.7, "sensitivity=0.9", {"pneumonia": 0.3125}, {"split": "val", "images": 12})
    update_extra(ckpt, {"calibration": stored.to_dict()})
    path, _ = export_checkpoint(ckpt, tmp_path / "c.onnx")
    int8 = tmp_path / "c.int8.onnx"
    quantize(path, int8, gates=Gates(min_agreement=0.0, max_accuracy_change=100.0))
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = softmax(model.classify(x).double().numpy() / 1.7, axis=1)
    for file in (path, int8):
        session = NearlSession(file, providers=["CPUExecutionProvider"])
        assert (session.temperature, session.operating_point, session.thresholds) == (1.7, "sensitivity=0.9",
                                                                                       {"pneumonia": 0.3125})
        logits, probs = session.run(x.numpy())
        np.testing.assert_allclose(probs, softmax(logits.astype(np.float64) / 1.7, axis=1), atol=1e-6)
        assert np.abs(probs - softmax(logits.astype(np.float64), axis=1)).max() > 1e-3  # T is really applied
        if file == path:
            np.testing.assert_allclose(probs, reference, atol=1e-5)
        pixels = [np.random.default_rng(i).integers(0, 256, (40, 36), dtype=np.uint8) for i in range(4)]
        decided = session.predict(pixels, decision=True)
        positive = session.run(session.preprocess(pixels))[1][:, 1]
        assert [d for d, _ in decided] == ["pneumonia" if p >= 0.3125 else "normal" for p in positive]
        assert [pairs for _, pairs in decided] == session.predict(pixels)


def test_decision_needs_a_binary_model_with_a_threshold():
    from tests.export_cases import exported, exported_calibrated
    for path, match in ((exported("bidirectional"), "is for binary models"),
                        (exported_calibrated("bidirectional"), "is for binary models")):
        with pytest.raises(ValueError, match=match):
            NearlSession(path).predict([np.zeros((8, 8), np.uint8)], decision=True)
    assert NearlSession(exported("bidirectional")).temperature == 1.0


# ------------------------------------------------------- train -> calibrate -> evaluate, end to end
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny run on the bundled X-rays (4 shots, 1 epoch): train calibrates it on its 8 validation shots."""
    out = tmp_path_factory.mktemp("evaluation") / "run"
    args = train.build_parser().parse_args(["--data", str(DEMO_DATA), "--preset", "tiny", "--shots", "4", "--epochs",
                                            "1", "--batch-size", "4", "--out", str(out), "--no-progress"])
    with pytest.warns(nearl_rt.RandomBackboneWarning):
        train.run(args)
    return out


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_train_stores_the_calibration_fitted_on_its_validation_shots(demo_run, capsys):
    # the final model (what the sweep scores and the demo exports) is calibrated like best.pt
    last = Calibration.from_dict(torch.load(demo_run / "last.pt", weights_only=True)["extra"]["calibration"])
    assert last.temperature > 0 and last.fitted_on["split"] == "val" and last.fitted_on["images"] == 8
    extra = torch.load(demo_run / "best.pt", weights_only=True)["extra"]
    cal = Calibration.from_dict(extra["calibration"])
    assert cal.operating_point == "youden" and set(cal.thresholds) == {"pneumonia"} and cal.temperature > 0
    assert cal.fitted_on["split"] == "val" and cal.fitted_on["images"] == 8
    assert json.loads((demo_run / "run.json").read_text())["operating_point"] == "youden"
    rc, out, _ = cli(nearl_main, ["info", demo_run / "best.pt", "--json"], capsys)
    assert rc == 0 and json.loads(out)["calibration"] == cal.to_dict()


def test_evaluate_numbers_are_scikit_learns_on_its_predictions_csv(demo_run, tmp_path, capsys):
    """Every reported metric recomputed from the per-image CSV with scikit-learn (and the ECE by its
    definition) is exactly the reported one; the plots are written; the intervals bracket the estimates."""
    csv_path, plots, out_json = tmp_path / "p.csv", tmp_path / "plots", tmp_path / "e.json"
    rc, out, err = cli(evaluate, [demo_run, "--data", DEMO_DATA, "--predictions", csv_path, "--plots", plots,
                                  "--json", out_json], capsys)
    assert rc == 0, err
    m = json.loads(out_json.read_text())["results"][str(demo_run)]
    rows = read_csv(csv_path)
    names = m["class_names"]
    labels = np.array([names.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in names] for r in rows])
    logits = np.array([[float(r[f"logit_{c}"]) for c in names] for r in rows])
    assert len(rows) == m["num_images"] == 16 and rows[0]["image"].endswith(".png")
    np.testing.assert_allclose(probs, softmax(logits / m["temperature"], axis=1), rtol=0, atol=1e-15)
    assert [r["predicted"] for r in rows] == [names[i] for i in logits.argmax(1)]  # the argmax of the raw logits
    preds = probs.argmax(1)
    assert m["accuracy"] == skm.accuracy_score(labels, preds)
    assert m["balanced_accuracy"] == skm.balanced_accuracy_score(labels, preds)
    assert m["macro_f1"] == skm.f1_score(labels, preds, average="macro")
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, preds).tolist()
    assert m["auc"] == np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in range(2)])
    assert m["auprc"] == np.mean([skm.average_precision_score(labels == c, probs[:, c]) for c in range(2)])
    assert m["ece"] == pytest.approx(brute_ece(labels, softmax(logits, axis=1)), abs=1e-12)
    assert m["ece_calibrated"] == pytest.approx(brute_ece(labels, probs), abs=1e-12)
    point = m["per_class"]["pneumonia"]
    stored = Calibration.from_dict(torch.load(demo_run / "best.pt", weights_only=True)["extra"]["calibration"])
    assert point["threshold"] == stored.thresholds["pneumonia"] and m["temperature"] == stored.temperature
    decided = probs[:, 1] >= point["threshold"]
    positive = labels == 1
    assert point["sensitivity"] == skm.recall_score(positive, decided)
    assert point["specificity"] == skm.recall_score(positive, decided, pos_label=False)
    assert point["ppv"] == skm.precision_score(positive, decided, zero_division=np.nan) or point["ppv"] is None
    tn, fp, fn, tp = skm.confusion_matrix(positive, decided).ravel()
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (tp, fp, tn, fn)
    assert [r["decision"] for r in rows] == [names[int(d)] for d in decided]
    assert "threshold" not in m["per_class"]["normal"]  # binary: the positive class's operating point only
    for key, (low, high) in m["ci95"].items():
        assert low <= m[key] <= high, key
    for key, (low, high) in point["ci95"].items():
        assert low <= point[key] <= high, key
    assert m["bootstrap"]["resamples"] == 1000 and m["random_backbone"] is True
    assert "sensitivity" in out and "] (TP " not in out and "[" in out.split("accuracy:")[1].splitlines()[0]
    for name in ("roc.png", "pr.png", "reliability.png"):
        with Image.open(plots / name) as im:
            assert im.format == "PNG" and im.size[0] > 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "p.csv", "plots"]  # no temporary files left


def test_an_operating_point_rule_fitted_now_reaches_its_target_on_its_split(demo_run, tmp_path, capsys):
    out_json = tmp_path / "e.json"
    rc, out, err = cli(evaluate, [demo_run, "--data", DEMO_DATA, "--split", "val", "--operating-point",
                                  "sensitivity=0.75", "--bootstrap", "0", "--json", out_json], capsys)
    assert rc == 0 and "fitted on the val split it is evaluated on" in err
    m = json.loads(out_json.read_text())["results"][str(demo_run)]
    assert m["operating_point"] == "sensitivity=0.75" and "fitted now on the val split, 8 images" in \
        m["calibration"]["operating_point"]
    assert m["per_class"]["pneumonia"]["sensitivity"] >= 0.75 and "ci95" not in m
    stored = torch.load(demo_run / "best.pt", weights_only=True)["extra"]["calibration"]
    assert stored["operating_point"] == "youden"  # evaluate stores nothing


def test_calibrate_refits_an_existing_run_and_the_export_carries_it(demo_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    rc, out, err = cli(calibrate, [run, "--data", DEMO_DATA, "--operating-point", "sensitivity=0.95"], capsys)
    assert rc == 0, err
    assert "temperature" in out and "operating point sensitivity=0.95: p(pneumonia) >= " in out
    classifier, extra = load_classifier(run)
    cal = classifier.calibration
    assert cal.operating_point == "sensitivity=0.95" and cal.fitted_on["images"] == 8
    # on the split it was fitted on, the rule holds
    scored = evaluate.score_split_of(classifier, nearl_rt.data.read_dataset(DEMO_DATA), classifier.class_names, "val")
    decided = cal.probabilities(scored.logits)[:, 1] >= cal.thresholds["pneumonia"]
    assert skm.recall_score(scored.labels == 1, decided) >= 0.95
    # the export carries the same temperature and threshold, and evaluates like its checkpoint
    path, _ = export_checkpoint(run / "best.pt", tmp_path / "m.onnx")
    session = NearlSession(path)
    assert (session.temperature, session.thresholds) == (cal.temperature, cal.thresholds)
    reports = {}
    for name in (run, path):
        rc, _, err = cli(evaluate, [name, "--data", DEMO_DATA, "--json", tmp_path / "e.json"], capsys)
        assert rc == 0, err
        reports[name] = json.loads((tmp_path / "e.json").read_text())["results"][str(name)]
    a, b = reports.values()
    assert a["per_class"]["pneumonia"]["threshold"] == b["per_class"]["pneumonia"]["threshold"]
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["auc"] == pytest.approx(b["auc"], abs=1e-6)
    assert a["ece_calibrated"] == pytest.approx(b["ece_calibrated"], abs=1e-5)


def test_predict_decides_at_the_stored_threshold(demo_run, tmp_path, capsys):
    rc, _, err = cli(predict, [demo_run, DEMO_DATA / "test", "--decision", "--topk", "2", "--output",
                               tmp_path / "p.json"], capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "p.json").read_text())
    threshold = load_classifier(demo_run)[0].calibration.thresholds["pneumonia"]
    assert len(results) == 16
    for r in results:
        p = {t["class"]: t["probability"] for t in r["top"]}
        assert r["decision"] == ("pneumonia" if p["pneumonia"] >= threshold else "normal")
    rc, out, _ = cli(predict, [demo_run, DEMO_DATA / "test", "--decision", "--limit", "2"], capsys)
    assert rc == 0 and out.splitlines()[0] == "input,rank,class,probability,decision"


def test_an_uncalibrated_checkpoint_reports_temperature_one_and_no_operating_point(demo_run, tmp_path, capsys):
    ckpt = tmp_path / "old.pt"
    shutil.copyfile(demo_run / "best.pt", ckpt)
    update_extra(ckpt, {"calibration": None})  # as checkpoints written before calibration existed
    rc, out, err = cli(evaluate, [ckpt, "--data", DEMO_DATA, "--json", tmp_path / "e.json"], capsys)
    assert rc == 0, err
    m = json.loads((tmp_path / "e.json").read_text())["results"][str(ckpt)]
    assert m["temperature"] == 1.0 and m["ece"] == m["ece_calibrated"] and m["operating_point"] is None
    assert all("threshold" not in v for v in m["per_class"].values())
    assert "the model is not calibrated" in out and "operating point: none (no stored threshold" in out
    rc, _, err = cli(predict, [ckpt, DEMO_DATA / "test", "--decision"], capsys)
    assert rc == 2 and "stores no decision threshold for 'pneumonia'" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_writes_nothing(demo_run, tmp_path, capsys):
    one_class = make_tree(make_tree(tmp_path / "one", {"normal": 2, "pneumonia": 2}, "train"), {"normal": 3}, "val")
    ckpt = demo_run / "best.pt"
    before = ckpt.read_bytes()
    cases = [
        (evaluate, [demo_run, "--data", DEMO_DATA, "--operating-point", "youdon"], "is not a rule: use youden"),
        (evaluate, [demo_run, "--data", DEMO_DATA, "--predictions", tmp_path / "missing" / "p.csv"],
         "directory .*missing does not exist"),
        (evaluate, [demo_run, "--data", DEMO_DATA, "--plots", tmp_path / "missing" / "plots"], "does not exist"),
        (evaluate, [demo_run, "--data", DEMO_DATA, "--bootstrap", "100"], "at least 1000 resamples"),
        (evaluate, [demo_run, demo_run, "--data", DEMO_DATA, "--predictions", tmp_path / "p.csv"],
         "evaluate one checkpoint"),
        (evaluate, [demo_run, "--data", one_class, "--split", "train", "--operating-point", "sensitivity=0.9"],
         r"no images of class 'pneumonia'"),
        (calibrate, [demo_run, "--data", DEMO_DATA, "--operating-point", "sensitivity=2"], "is not a rule"),
        (calibrate, [demo_run, "--data", one_class], r"no images of class\(es\) \['pneumonia'\]"),
        (calibrate, [tmp_path / "m.onnx", "--data", DEMO_DATA], "calibrate its checkpoint, then export it again"),
        (train, ["--data", DEMO_DATA, "--preset", "tiny", "--shots", "2", "--out", tmp_path / "t", "--operating-point",
                 "specificity"], "is not a rule"),
    ]
    for module, argv, match in cases:
        rc, _, err = cli(module, argv, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert __import__("re").search(match, err), (match, err)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]
