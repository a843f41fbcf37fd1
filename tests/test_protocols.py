"""The evaluation protocols: prompt ensembles, CoOp, base-to-novel, scoring any class set, the linear probe's
C search, and the K-shot sweep (tiny preset; the sweep on the real chest X-rays)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression

import nearl_rt
import nearl_rt.data
import nearl_rt.export.onnx as export_onnx
from nearl_rt.export.graph import export_module
from nearl_rt.export.onnx import export_model
from nearl_rt import evaluate, predict, sweep, train
from nearl_rt.classifier import load_classifier
from nearl_rt.coop import attach_context, coop_template, init_context
from nearl_rt.data import Preprocess
from nearl_rt.linear_probe import select_c, softmax_head
from nearl_rt.evaluate import read_predictions
from nearl_rt.metrics import bootstrap_intervals, harmonic_mean
from nearl_rt.prompts import TemplateError, load_templates, shipped_template_sets
from tests.helpers import CLASSES, TINY_PRESETS, perturb_adapters, tiny, tiny_inputs
from tests.test_data import make_tree
from tests.helpers import cli, labels_npz

MODES = ["bidirectional", "text_cacheable"]
QUICK = ["--preset", "tiny", "--epochs", "1", "--batch-size", "4", "--no-progress"]


# ------------------------------------------------------------------------------------ prompt ensembles
def _ensemble_reference(model, images, per_class_counts):
    """Logits from the per-prompt features, averaged by hand (normalised mean per class)."""
    with torch.no_grad():
        img, txt = model.encode(images, model.class_tokens)           # txt [B, P, E], per prompt
    chunks = torch.split(txt, per_class_counts, dim=1)
    cls = torch.stack([F.normalize(c.mean(1), dim=-1) for c in chunks], dim=1)
    return model.backbone.logit_scale.exp() * torch.einsum("be,bce->bc", img, cls)


@pytest.mark.parametrize("mode", MODES)
def test_ensemble_is_the_normalised_mean_and_one_template_is_the_single_template(mode):
    model = perturb_adapters(tiny(mode), seed=5).eval()
    images, _ = tiny_inputs(batch=3)
    with torch.no_grad():
        model.set_classes(CLASSES, "a scan of {}.")
        single = model.classify(images)
        model.set_classes(CLASSES, ["a scan of {}."])
        torch.testing.assert_close(model.classify(images), single, rtol=0, atol=0)
        model.set_classes(CLASSES, ["a scan of {}.", "an x-ray showing {} in the chest.", "{}"])
        got = model.classify(images)
        assert got.shape == (3, len(CLASSES)) and len(model.class_tokens) == 3 * len(CLASSES)
        # float32 everywhere; the two sides differ only in summation order
        torch.testing.assert_close(got, _ensemble_reference(model, images, [3] * len(CLASSES)), rtol=1e-5, atol=1e-5)
        assert (got - single).abs().max() > 1e-3  # the ensemble really changes the scores
        # BiomedCoOp-style per-class prompts, a different number per class
        per_class = {c: [f"prompt {i} about {c}" for i in range(n)] for c, n in zip(CLASSES, (1, 3, 2))}
        model.set_classes(CLASSES, per_class)
        torch.testing.assert_close(model.classify(images), _ensemble_reference(model, images, [1, 3, 2]),
                                   rtol=1e-5, atol=1e-5)
        # the ONNX graph module pools the same way
        torch.testing.assert_close(export_module(model)(images)[0], model.classify(images), rtol=1e-5, atol=1e-5)


def test_ensemble_survives_checkpoint_and_onnx_export(tmp_path):
    model = perturb_adapters(tiny("text_cacheable", backend="torch"), seed=2).eval()
    model.set_classes(CLASSES, load_templates("xray"))
    nearl_rt.save_checkpoint(model, tmp_path / "c.pt")
    back = nearl_rt.load_checkpoint(tmp_path / "c.pt")
    images, _ = tiny_inputs(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(back.classify(images), model.classify(images), rtol=0, atol=0)
    assert back.templates == load_templates("xray")
    path = export_model(back, tmp_path / "m.onnx")  # verified against the PyTorch graph module inside
    import onnxruntime as ort
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"images": images.numpy()})[0]
    np.testing.assert_allclose(logits, model.classify(images).detach().numpy(), atol=1e-4)


def test_template_files(tmp_path):
    for name in ("xray", "ct", "mri", "histology", "dermoscopy", "fundus"):
        assert name in shipped_template_sets()
        templates = load_templates(name)
        assert len(templates) >= 3 and all(t.count("{}") == 1 for t in templates)
    (tmp_path / "t.txt").write_text("# comment\n\na photo of {}.\n  an image of {}.  \n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a photo of {}.", "an image of {}."]
    (tmp_path / "t.json").write_text(json.dumps({"glioma": ["An MRI of a glioma.", "irregular mass"],
                                                 "normal": ["A normal brain MRI."]}))
    per_class = load_templates(str(tmp_path / "t.json"))
    assert per_class["glioma"] == ["An MRI of a glioma.", "irregular mass"]
    model = tiny()
    model.set_classes(["glioma", "normal"], per_class)
    assert model.prompts == ["An MRI of a glioma.", "irregular mass", "A normal brain MRI."]
    with pytest.raises(TemplateError, match="no prompts for class"):
        model.set_classes(["glioma", "meningioma"], per_class)
    assert load_templates("a radiograph of {}.") == "a radiograph of {}."
    for text, match in (("", "holds no templates"), ("# only a comment\n", "holds no templates"),
                        ("no placeholder here\n", "exactly one")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(TemplateError, match=match):
            load_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(TemplateError, match="neither a shipped set"):
        load_templates("nonexistent-set")


# ------------------------------------------------------------------------------------------------ CoOp
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_coop_starts_as_zero_shot_and_trains_only_its_context(preset):
    """Also on the BERT text tower, whose context goes through BertEmbeddings(inputs_embeds=...)."""
    model = tiny("text_cacheable", preset)
    images, _ = tiny_inputs(batch=4, preset=preset)
    model.set_classes(CLASSES, "a photo of a {}.")
    with torch.no_grad():
        zero_shot = model.classify(images)
    attach_context(model, init_context(model))
    model.set_classes(CLASSES, coop_template(4))
    with torch.no_grad():  # the context starts as the embeddings of "a photo of a"
        torch.testing.assert_close(model.classify(images), zero_shot, rtol=1e-6, atol=1e-6)
    opt = torch.optim.AdamW(model.prompt_context.parameters(), lr=0.05)
    labels = torch.tensor([0, 1, 2, 1])
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(images, model.class_tokens), labels)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.adapter_parameters())
        assert model.prompt_context.ctx.grad.abs().max() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_coop_run_checkpoint_evaluate_predict(pneumonia_npz, tmp_path, capsys):
    run = tmp_path / "coop"
    rc, out, _ = cli(train, ["--data", pneumonia_npz, "--out", run, "--method", "coop", "--shots", "4",
                             "--preset", "tiny", "--epochs", "2", "--batch-size", "4", "--lr", "0.05",
                             "--no-progress"], capsys)
    assert rc == 0 and "coop on tiny: 160 trainable parameters" in out  # 4 context vectors x width 40
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["extra"]["method"] == "coop" and ckpt["extra"]["coop_context"].shape == (4, 40)
    classifier, _ = load_classifier(run)
    init = init_context(classifier.model).ctx
    assert (classifier.model.prompt_context.ctx - init).abs().max() > 1e-3  # trained away from "a photo of a"
    data = np.load(pneumonia_npz)
    x = Preprocess(classifier.model.preprocess_cfg).eval([Image.fromarray(a).convert("RGB")
                                                          for a in data["test_images"][:3]])
    with torch.no_grad():  # calibrated at the end of training
        probs = (classifier.logits(x).double() / classifier.calibration.temperature).softmax(-1)
    rc, out, _ = cli(predict, [run, pneumonia_npz, "--limit", "3"], capsys)
    top = [float(r.split(",")[3]) for r in out.strip().splitlines()[1:]]
    assert rc == 0
    np.testing.assert_allclose(top, probs.max(-1).values.numpy(), atol=1e-5)
    rc, out, _ = cli(evaluate, [run, "--data", pneumonia_npz, "--limit", "20"], capsys)
    assert rc == 0 and "accuracy" in out
    rc, _, err = cli(export_onnx, [run / "best.pt", "-o", tmp_path / "c.onnx"], capsys)
    assert rc == 0, err  # the learned context is in the exported graph's constant class text stream
    import onnxruntime as ort
    best, _ = load_classifier(run / "best.pt")
    got = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, best.logits(x).numpy(), rtol=1e-4, atol=1e-4)  # float32, other op order


# ------------------------------------------------------------------------------------ base-to-novel
def _four_class_tree(root):
    classes = {"cyst": 3, "solid": 3, "mixed": 3, "calcified": 3}
    make_tree(root, classes, "train")
    make_tree(root, {c: 2 for c in classes}, "val")
    make_tree(root, {"cyst": 2, "solid": 3, "mixed": 2, "calcified": 4}, "test")
    return root


def test_base_to_novel_trains_on_base_and_reports_base_novel_hm(tmp_path, capsys):
    data = _four_class_tree(tmp_path / "d")  # class order (sorted folders): calcified, cyst, mixed, solid
    run = tmp_path / "b2n"
    rc, out, _ = cli(train, ["--data", data, "--out", run, "--shots", "2", "--base-to-novel", *QUICK], capsys)
    assert rc == 0 and "(2 shots x 2 classes)" in out
    shots = json.loads((run / "shots.json").read_text())
    assert shots["base_classes"] == ["calcified", "cyst"] and shots["novel_classes"] == ["mixed", "solid"]
    assert all(re.search(r"/(train|val)/(calcified|cyst)/", p) for p in shots["train_images"] + shots["val_images"])
    assert nearl_rt.load_checkpoint(run / "best.pt").class_names == ["calcified", "cyst"]
    rc, out, _ = cli(evaluate, [run, "--data", data, "--base-to-novel", "--json", tmp_path / "e.json"], capsys)
    assert rc == 0 and "harmonic mean accuracy" in out
    m = json.loads((tmp_path / "e.json").read_text())["results"][str(run)]
    assert m["base"]["class_names"] == ["calcified", "cyst"] and m["base"]["num_images"] == 4 + 2
    assert m["novel"]["class_names"] == ["mixed", "solid"] and m["novel"]["num_images"] == 2 + 3
    a, b = m["base"]["accuracy"], m["novel"]["accuracy"]
    assert m["hm_accuracy"] == pytest.approx(0 if a + b == 0 else 2 * a * b / (a + b))
    # scoring any class set: --classes gives the novel part's numbers, in any order of the names
    rc, _, _ = cli(evaluate, [run, "--data", data, "--classes", "mixed,solid", "--json", tmp_path / "n.json"], capsys)
    novel = json.loads((tmp_path / "n.json").read_text())["results"][str(run)]
    assert rc == 0 and novel["confusion_matrix"] == m["novel"]["confusion_matrix"]
    rc, _, _ = cli(evaluate, [run, "--data", data, "--classes", "solid,mixed", "--json", tmp_path / "r.json"], capsys)
    flipped = json.loads((tmp_path / "r.json").read_text())["results"][str(run)]
    assert np.array(flipped["confusion_matrix"])[::-1, ::-1].tolist() == novel["confusion_matrix"]
    # explicit base classes: novel = the rest
    rc, out, _ = cli(train, ["--data", data, "--out", tmp_path / "b2", "--shots", "1", "--base-classes", "solid,cyst",
                             "--method", "zeroshot", *QUICK], capsys)
    assert rc == 0
    assert json.loads((tmp_path / "b2" / "shots.json").read_text())["novel_classes"] == ["calcified", "mixed"]


# --------------------------------------------------------------------------------------- linear probe
@pytest.mark.parametrize("classes", [2, 4])
def test_linear_probe_head_reproduces_scikit_learn(classes):
    rng = np.random.default_rng(classes)
    x = rng.normal(size=(6 * classes, 12)) + np.repeat(rng.normal(size=(classes, 12)), 6, axis=0)
    y = np.repeat(np.arange(classes), 6)
    clf = LogisticRegression(C=3.0, max_iter=1000).fit(x, y)
    w, b = softmax_head(clf, classes)
    assert w.shape == (classes, 12) and b.shape == (classes,)
    probs = torch.from_numpy(x @ w.T + b).softmax(-1).numpy()
    np.testing.assert_allclose(probs, clf.predict_proba(x), atol=1e-10)  # float64 both sides


def test_linear_probe_c_search_picks_the_validation_best():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    def draw(n):
        y = np.arange(n) % 3
        return centres[y] * 0.6 + rng.normal(size=(n, 16)), y
    (tx, ty), (vx, vy) = draw(12), draw(30)
    best, tried = select_c(tx, ty, vx, vy, 3)
    assert -6 <= best <= 6 and len(tried) <= 7 + 2 * 4
    acc = {c: a for c, (a, _) in tried.items()}
    assert acc[best] == max(acc.values())  # nothing tried scored better on the validation shots
    assert min(acc.values()) < acc[best]   # and C mattered (a very small C predicts one class)


# ---------------------------------------------------------------------------------------------- sweep
def test_sweep_on_real_xrays_writes_outputs_and_resumes(pneumonia_npz, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--data", pneumonia_npz, "--methods", "nearl,linear_probe", "--shots", "1,2", "--seeds", "0,1",
            "--out", out, "--eval-limit", "24", "--preset", "tiny", "--epochs", "2", "--batch-size", "2",
            "--no-progress"]
    rc, printed, _ = cli(sweep, [*args, "--max-runs", "3"], capsys)  # interrupted after 3 runs
    assert rc == 0 and "stopping after 3 run(s)" in printed and "3 of 8 runs done" in printed
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/best.pt")}
    assert sorted(finished) == ["nearl_k1_s0", "nearl_k1_s1", "nearl_k2_s0"]
    # a run interrupted mid-training (one of its two epochs done), as a killed sweep leaves it
    rc, _, _ = cli(train, ["--data", pneumonia_npz, "--method", "nearl", "--shots", "2", "--seed", "1", "--out",
                           out / "runs" / "nearl_k2_s1", "--device", "auto", "--preset", "tiny", "--epochs", "2",
                           "--batch-size", "2", "--no-progress", "--stop-after", "1"], capsys)
    assert rc == 0
    rc, printed, _ = cli(sweep, args, capsys)
    assert rc == 0 and printed.count("finished earlier, skipped") == 3
    assert "nearl_k2_s1: resuming" in printed and "resuming" in printed and "8 of 8 runs done, ETA 0m00s" in printed
    assert {n: (out / "runs" / n / "best.pt").stat().st_mtime_ns for n in finished} == finished  # not rerun
    assert len((out / "runs" / "nearl_k2_s1" / "metrics.jsonl").read_text().splitlines()) == 2

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 8 and {(r["method"], r["shots"], r["seed"]) for r in runs} == {
        (m, k, s) for m in ("nearl", "linear_probe") for k in (1, 2) for s in (0, 1)}
    assert all(r["metrics"]["num_images"] == 24 for r in runs)
    for m in ("nearl", "linear_probe"):
        for k in (1, 2):
            accs = [r["metrics"]["accuracy"] for r in runs if r["method"] == m and r["shots"] == k]
            cell = results["summary"][m][str(k)]
            assert cell["runs"] == 2 and cell["accuracy"]["mean"] == pytest.approx(np.mean(accs))
            assert cell["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    # a run's metrics are what `evaluate` says about its last.pt (the final model)
    assert {r["checkpoint"] for r in runs} == {"last.pt"} and results["settings"]["checkpoint"] == "last"
    for one in (r for r in runs if r["shots"] == 2 and r["seed"] == 1):
        last = f"{one['run_dir']}/last.pt"
        rc, _, _ = cli(evaluate, [last, "--data", pneumonia_npz, "--limit", "24", "--json", tmp_path / "e.json"],
                       capsys)
        assert json.loads((tmp_path / "e.json").read_text())["results"][last]["accuracy"] == \
            one["metrics"]["accuracy"]

    md = (out / "results.md").read_text()
    assert "pipeline check" in md and "8 of 8 runs, each scored through its last.pt" in md
    table = md.split("### accuracy")[1].split("###")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["nearl", "linear_probe"]
    for col in (2, 3):  # the best mean per K column is bold
        cells = [r.split("|")[col].strip() for r in rows]
        means = [float(c.strip("*").split(" ± ")[0]) for c in cells]
        assert [c.startswith("**") for c in cells] == [mean == max(means) for mean in means]
    assert all(f"### {name}" in md for name in ("balanced accuracy", "macro-F1", "AUROC", "AUPRC"))
    # every run wrote its per-image predictions; AUROC / AUPRC cells add the 95 % interval of the seed mean,
    # one stratified bootstrap of the test images applied to both seeds' predictions
    cell = [r for r in runs if r["method"] == "linear_probe" and r["shots"] == 2]
    read = [read_predictions(Path(r["run_dir"]) / "predictions.csv", r["metrics"]["class_names"]) for r in cell]
    for (_, labels, probs), r in zip(read, cell):
        assert r["metrics"]["auprc"] == np.mean([skm.average_precision_score(labels == c, probs[:, c]) for c in (0, 1)])
    interval = bootstrap_intervals(read[0][1], np.stack([p for _, _, p in read]))
    for key, title in (("auc", "AUROC"), ("auprc", "AUPRC")):
        summary = results["summary"]["linear_probe"]["2"][key]
        assert summary["ci95"] == interval[key] and interval[key][0] <= summary["mean"] <= interval[key][1]
        assert "[{:.3f}, {:.3f}]".format(*interval[key]) in md.split(f"### {title}")[1].split("###")[0]
    png = (out / "accuracy_vs_shots.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with Image.open(out / "accuracy_vs_shots.png") as im:
        assert im.width > 2 * im.height  # two panels side by side: accuracy and macro-F1


def test_sweep_base_to_novel_reports_base_novel_hm(tmp_path, capsys):
    data, out = _four_class_tree(tmp_path / "d"), tmp_path / "sweep"
    rc, printed, _ = cli(sweep, ["--data", data, "--methods", "zeroshot,coop", "--shots", "1", "--seeds", "0",
                                 "--out", out, "--base-to-novel", *QUICK], capsys)
    assert rc == 0 and "2 of 2 runs done" in printed
    results = json.loads((out / "results.json").read_text())
    for r in results["runs"]:
        shots = json.loads((tmp_path / r["run_dir"] / "shots.json").read_text())
        assert shots["base_classes"] == ["calcified", "cyst"], r["run_dir"]  # trained on the base half only
        m = r["metrics"]
        assert m["base"]["class_names"] == ["calcified", "cyst"] and m["novel"]["class_names"] == ["mixed", "solid"]
        assert m["hm_accuracy"] == pytest.approx(harmonic_mean(m["base_accuracy"], m["novel_accuracy"]))
        assert results["summary"][r["method"]]["1"]["hm_accuracy"]["mean"] == m["hm_accuracy"]
    md = (out / "results.md").read_text()
    assert all(f"### {name}" in md for name in ("base accuracy", "novel accuracy",
                                                  "harmonic mean (base, novel accuracy)", "hm_macro_f1"))


# ------------------------------------------------------------------------------------------ bad input
BAD = {
    "unknown method": (sweep, lambda t: [*_sweep_base(t), "--methods", "nearl,prograd"], "unknown or repeated method"),
    "K above a class's count": (sweep, lambda t: ["--data", labels_npz(t / "x.npz", [0] * 20 + [1] * 6), "--out", t / "out",
                                                  "--shots", "1,8", "--methods", "zeroshot", "--split", "train"],
                                "--shots 8 is larger than class 'class 1' has: 6 image"),
    "linear probe in a base-to-novel sweep": (sweep, lambda t: [*_sweep_base(t), "--methods", "zeroshot,linear_probe",
                                                                "--base-to-novel"], "linear_probe cannot run --base-to-novel"),
    "sweep sets --seed itself": (sweep, lambda t: [*_sweep_base(t), "--seed", "3"], "--seed is set by the sweep"),
    "empty template file": (train, lambda t: [*_train_base(t), "--templates", _write(t / "empty.txt", "\n")],
                            "empty.txt holds no templates"),
    "novel class also a base class": (train, lambda t: [*_train_base(t), "--base-classes", "cyst,solid",
                                                        "--novel-classes", "solid,mixed"],
                                      r"\['solid'\] are both base and novel classes"),
}


def _write(path, text):
    path.write_text(text)
    return path


def _sweep_base(t):
    return ["--data", _four_class_tree(t / "d"), "--out", t / "out", "--shots", "1"]


def _train_base(t):
    return ["--data", _four_class_tree(t / "d"), "--out", t / "out", "--shots", "1", *QUICK]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(case, tmp_path, capsys):
    module, make, match = BAD[case]
    rc, _, err = cli(module, make(tmp_path), capsys)
    assert rc == 2 and err.startswith(f"{module.__name__}: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()  # nothing written


def test_biomedcoop_split_json_and_class_name_file(tmp_path):
    """BiomedCoOp's split_<Dataset>.json (CoOp's format): [relpath, label, classname] per image, class folders
    named with underscores, labels in any order; a class-name file names the labels in order."""
    from tests.test_data import write_png
    root = tmp_path / "OCT"
    names = {0: "choroidal neovascularization", 1: "diabetic macular edema", 2: "drusen", 3: "normal OCT scan"}
    split = {}
    for part, n in (("train", 2), ("val", 1), ("test", 1)):
        split[part] = []
        for label in (3, 0, 2, 1):  # not sorted, as in their files
            for i in range(n):
                rel = f"{names[label].replace(' ', '_')}/{part}{i}_{label}.png"
                write_png(root / rel, label * 10 + i)
                split[part].append([rel, label, names[label]])
    (tmp_path / "split_OCT.json").write_text(json.dumps(split))
    ds = nearl_rt.data.read_dataset(tmp_path / "split_OCT.json", root)
    assert ds.class_names == [names[i] for i in range(4)]
    assert sorted(ds.split("train").labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    from nearl_rt.classsets import split_base_novel
    assert split_base_novel(ds.class_names) == ([names[0], names[1]], [names[2], names[3]])
    (tmp_path / "classnames.txt").write_text("# label order\nCNV\nDME\n\nDRUSEN\nNORMAL\n")
    renamed = nearl_rt.data.read_dataset(tmp_path / "split_OCT.json", root,
                                         nearl_rt.data.parse_classes(str(tmp_path / "classnames.txt")))
    assert renamed.class_names == ["CNV", "DME", "DRUSEN", "NORMAL"]
