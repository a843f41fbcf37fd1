"""The peer few-shot methods (nearl_rt.methods): CLIP-Adapter, Tip-Adapter(-F), LP++ (feature heads), KgCoOp,
CoCoOp, BiomedCoOp (prompt learners), on both tiny backbones (open_clip CLIP text, and BiomedCLIP's BERT text):
their definitions at ratio / alpha 0 or at initialisation, training, parameter counts, checkpoints, bad input."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nearl_rt
from nearl_rt import sweep, train
from nearl_rt.classifier import Classifier, frozen_image_features, load_classifier
from nearl_rt.coop import attach_context, coop_template
from nearl_rt.core.errors import NearlError
from nearl_rt.feature_fit import CLIP_ADAPTER, FITS, text_head_args
from nearl_rt.feature_heads import ClipAdapterHead, TipAdapterHead, cache_affinity
from nearl_rt.methods import METHODS, REGISTRY, expand_methods, get_method, trainable_count
from nearl_rt.prompt_learners import build_context
from tests.helpers import CLASSES, TINY_PRESETS, cli, tiny

FEATURE_METHODS = [m for m in METHODS if REGISTRY[m].kind == "features"]
PROMPT_METHODS = ["kgcoop", "cocoop", "biomedcoop"]
TEMPLATE = "a photo of a {}."  # what CoOp's 4 context vectors start from


def _model(preset):
    model = tiny("text_cacheable", preset).eval()
    model.set_classes(CLASSES, TEMPLATE)
    return model


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _shots(k=4, seed=0):
    """k random images per class and their labels (class-major)."""
    return _images(k * len(CLASSES), seed), np.repeat(np.arange(len(CLASSES)), k)


def _descriptions(path):
    path.write_text(json.dumps({c: [f"an image of {c} number {i}" for i in range(4)] + ["{} seen on a scan"]
                                for c in CLASSES}))
    return str(path)


def _prompt_model(preset, method, tmp_path):
    model = _model(preset)
    files = _descriptions(tmp_path / "desc.json") if method == "biomedcoop" else None
    attach_context(model, build_context(method, model, CLASSES, 4, seed=0, descriptions_file=files))
    model.set_classes(CLASSES, coop_template(4))
    return model


# ------------------------------------------------------------------------------ definitions at 0 / init
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_clip_adapter_ratio_0_and_tip_adapter_alpha_0_are_zero_shot(preset):
    model, images = _model(preset), _images(5, seed=3)
    with torch.no_grad():
        zero_shot = model.classify(images)
        feats = frozen_image_features(model, images)
        adapter = ClipAdapterHead(*text_head_args(model), ratio=0.0)
        torch.nn.init.normal_(adapter.adapter[0].weight)  # any adapter: ratio 0 ignores it
        keys = F.normalize(torch.randn(6, feats.shape[1]), dim=-1)
        tip = TipAdapterHead(*text_head_args(model), keys=keys, values=F.one_hot(torch.arange(6) % 3, 3).float(),
                             alpha=0.0, beta=5.0)
        # the same float32 features and products in another order: a few ulps of logits of size ~logit scale
        for head in (adapter, tip):
            torch.testing.assert_close(Classifier(model, head.kind, head).logits(images), zero_shot,
                                       rtol=1e-5, atol=1e-5)
        adapter.ratio, tip.alpha = 0.5, 1.0
        assert (adapter(feats) - zero_shot).abs().max() > 1e-3 and (tip(feats) - zero_shot).abs().max() > 1e-3


def test_tip_adapter_cache_affinity_is_its_numpy_definition():
    rng = np.random.default_rng(7)
    f, keys = rng.standard_normal((5, 16)), rng.standard_normal((9, 16))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = np.eye(3)[rng.integers(0, 3, 9)]
    for beta in (0.5, 1.0, 5.5):
        expected = np.exp(-beta * (1.0 - f @ keys.T))  # float64
        got = cache_affinity(torch.from_numpy(f).float(), torch.from_numpy(keys).float(), beta).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)  # float32 products, exp of values <= 2 beta
        head = TipAdapterHead(torch.zeros(3, 16), 1.0, None, torch.from_numpy(keys), torch.from_numpy(values),
                              alpha=2.0, beta=beta)
        np.testing.assert_allclose(head(torch.from_numpy(f).float()).double().numpy(), 2.0 * expected @ values,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("method", ["kgcoop", "cocoop"])
def test_prompt_learners_at_initialisation_are_zero_shot(preset, method, tmp_path):
    model, images = _prompt_model(preset, method, tmp_path), _images(4, seed=5)
    reference = _model(preset)
    with torch.no_grad():
        got = Classifier(model, method).logits(images)
        # CoCoOp runs the text tower per image (B x C rows): the same float32 sums, batched differently
        torch.testing.assert_close(got, reference.classify(images), rtol=1e-5, atol=1e-5)
        if method == "kgcoop":  # the learned prompt starts on the hand-crafted one: no penalty
            assert model.prompt_context.extra_loss(model, images, got).abs() < 1e-6


@pytest.mark.parametrize("n", [2, 4, 6])
def test_kgcoop_reference_is_the_hand_crafted_prompt_for_any_context_length(n):
    """KgCoOp pulls the learned prompt towards "a photo of a {}.", also when the context is not 4 tokens long
    (its learned context then starts from placeholder tokens, the reference does not)."""
    from nearl_rt.prompt_learners import class_features_with
    model = _model("tiny")
    context = build_context("kgcoop", model, CLASSES, n, seed=0)
    with torch.no_grad():
        want = class_features_with(_model("tiny"), CLASSES, "a photo of a {}.")
    torch.testing.assert_close(context.reference, want.float(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("method", [m for m in FEATURE_METHODS if m != "tip_adapter"])
def test_feature_heads_lower_the_training_loss(preset, method, monkeypatch):
    """The published settings; CLIP-Adapter's (SGD at 0.01, 20 one-step epochs here) barely move a random
    tiny backbone's loss, so its learning rate is raised to show the descent."""
    monkeypatch.setitem(CLIP_ADAPTER, "lr", 1.0)
    model = _model(preset)
    (tx, ty), (vx, vy) = _shots(4, seed=1), _shots(2, seed=2)
    head, fitted = FITS[method](model, tx, ty, vx, vy, seed=0)
    assert fitted["train_loss_last"] < fitted["train_loss_first"] - 1e-3, fitted
    if method == "tip_adapter_f":  # the keys moved away from the cached features
        assert (head.keys - frozen_image_features(model, tx)).abs().max() > 1e-4


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_learners_lower_the_training_loss(preset, method, tmp_path):
    model = _prompt_model(preset, method, tmp_path)
    classifier = Classifier(model, method)
    images, labels = _shots(2, seed=4)
    labels = torch.from_numpy(labels)
    if method == "cocoop":  # move the meta-net off its zero start so both of its layers train
        torch.nn.init.normal_(model.prompt_context.meta_net[2].weight, std=0.01)
    params = list(model.prompt_context.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)  # train's default
    losses = []
    for _ in range(10):
        logits = classifier.logits(images)
        loss = F.cross_entropy(logits, labels)
        extra = model.prompt_context.extra_loss(model, images, logits)
        loss = loss if extra is None else loss + extra
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


# --------------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_trainable_parameter_counts_are_the_papers_formulas(preset, tmp_path):
    model = _model(preset)
    E, D, C, K = model.embed_dim, model.text_tower.width, len(CLASSES), 4
    (tx, ty), (vx, vy) = _shots(K), _shots(2, seed=2)

    def formula(name):
        return trainable_count(name, embed_dim=E, text_width=D, classes=C, shots=K, context=4)

    for method in FEATURE_METHODS:
        head, _ = FITS[method](model, tx, ty, vx, vy, seed=0)
        assert sum(p.numel() for p in head.parameters() if p.requires_grad) == formula(method), method
    expected = {"clip_adapter": 2 * E * (E // 4), "tip_adapter": 0, "tip_adapter_f": K * C * E,
                "lpplusplus": C * E + 2 * C, "kgcoop": 4 * D, "biomedcoop": 4 * D,
                "cocoop": 4 * D + E * (E // 16) + E // 16 + (E // 16) * D + D}
    assert {m: formula(m) for m in expected} == expected
    for method in PROMPT_METHODS:
        learner = _prompt_model(preset, method, tmp_path)
        assert sum(p.numel() for p in learner.prompt_context.parameters()) == formula(method), method


# ------------------------------------------------------------------------------------- checkpoints
def _fitted(preset, method, tmp_path, scale):
    """(model, classifier) of a method away from its initialisation: a feature head fitted on shots, or a prompt
    learner whose parameters moved by `scale` x N(0, 1) (so a round trip or an export that dropped them fails)."""
    if method in FEATURE_METHODS:
        model = _model(preset)
        head, _ = FITS[method](model, *_shots(2), *_shots(1, seed=2), seed=0)
        return model, Classifier(model, method, head)
    model = _prompt_model(preset, method, tmp_path)
    with torch.no_grad():
        for p in model.prompt_context.parameters():
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, Classifier(model, method)


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("method", FEATURE_METHODS + PROMPT_METHODS)
def test_checkpoints_round_trip(preset, method, tmp_path):
    images = _images(3, seed=9)
    model, classifier = _fitted(preset, method, tmp_path, 0.01)
    with torch.no_grad():
        before = classifier.logits(images)
    nearl_rt.save_checkpoint(model, tmp_path / "m.pt", extra=classifier.checkpoint_extra())
    loaded, extra = load_classifier(tmp_path / "m.pt")
    assert loaded.method == method and extra["method"] == method
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(images), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------- registry, bad input
def test_registry_names_every_method_once():
    assert set(METHODS) == {"nearl", "zeroshot", "linear_probe", "coop", "kgcoop", "cocoop", "biomedcoop",
                            "clip_adapter", "tip_adapter", "tip_adapter_f", "lpplusplus"}
    assert expand_methods("all") == list(METHODS)
    assert [m for m in METHODS if REGISTRY[m].generalises] == ["nearl", "zeroshot", "coop", "kgcoop", "cocoop",
                                                                "biomedcoop"]
    with pytest.raises(NearlError, match="unknown method 'prograd'; use one of nearl, "):
        get_method("prograd")


def test_biomedcoop_without_its_descriptions_file_is_one_line(pneumonia_npz, tmp_path, capsys):
    base = ["--data", pneumonia_npz, "--preset", "tiny", "--shots", "1", "--method", "biomedcoop", "--no-progress"]
    for extra, message in (([], "--method biomedcoop needs --class-descriptions FILE.json"),
                           (["--class-descriptions", str(tmp_path / "none.json")], "none.json: no such file")):
        rc, _, err = cli(train, [*base, "--out", str(tmp_path / "run"), *extra], capsys)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


def test_unknown_method_on_the_command_line_is_one_line(pneumonia_npz, tmp_path, capsys):
    rc, _, err = cli(train, ["--data", pneumonia_npz, "--shots", "1", "--method", "prograd", "--out",
                             str(tmp_path / "run")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "unknown method 'prograd'; use one of nearl, zeroshot, linear_probe, coop, kgcoop, cocoop" in err


def test_unknown_method_in_a_checkpoint_is_one_line(tmp_path):
    model = _model("tiny")
    nearl_rt.save_checkpoint(model, tmp_path / "m.pt", extra={"method": "prograd"})
    with pytest.raises(NearlError, match=r"records an unknown method 'prograd'; expected one of nearl, "):
        load_classifier(tmp_path / "m.pt")


def test_sweep_all_methods_runs_every_method(pneumonia_npz, tmp_path, capsys):
    """Every registered method trains, is scored and gets its table row (one K, one seed, 1 epoch, 24 test images);
    rerunning resumes (nothing runs twice)."""
    descriptions = tmp_path / "desc.json"
    descriptions.write_text(json.dumps({c: [f"a chest x-ray with {c}", f"{c} on a radiograph"]
                                        for c in ("normal", "pneumonia")}))
    args = ["--data", pneumonia_npz, "--methods", "all", "--shots", "1", "--seeds", "0", "--out", tmp_path / "sw",
            "--eval-limit", "24", "--bootstrap", "0", "--preset", "tiny", "--epochs", "1", "--no-progress",
            "--class-descriptions", descriptions]
    rc, printed, _ = cli(sweep, args, capsys)
    assert rc == 0 and f"{len(METHODS)} of {len(METHODS)} runs done" in printed, printed
    rows = [line.split("|")[1].strip() for line in (tmp_path / "sw" / "results.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert rows[:len(METHODS)] == list(METHODS)
    rc, printed, _ = cli(sweep, args, capsys)
    assert rc == 0 and printed.count("finished earlier, skipped") == len(METHODS)


# ------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("preset,method", [("tiny", "clip_adapter"), ("tiny_bert", "tip_adapter_f"),
                                           ("tiny_bert", "kgcoop")])  # one export per graph kind: ~10 s each
def test_export_parity(preset, method, tmp_path):
    """export.onnx writes the feature heads and the (image-independent) prompt learners; onnxruntime's logits on
    fresh images match the checkpoint's classifier (export_model's own float64 check passed to write the file)."""
    import onnxruntime as ort
    from nearl_rt.core.metadata import read_metadata
    from nearl_rt.export.onnx import export_checkpoint
    model, classifier = _fitted(preset, method, tmp_path, 0.05)
    nearl_rt.save_checkpoint(model, tmp_path / "m.pt", extra=classifier.checkpoint_extra())
    path, _ = export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    images = _images(5, seed=11)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        expected = classifier.logits(images).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # float32, another operator order
    assert read_metadata(path)["method"] == method


def test_export_refuses_cocoop_in_one_line(tmp_path):
    from nearl_rt.export.onnx import ExportError, export_checkpoint
    model = _prompt_model("tiny", "cocoop", tmp_path)
    nearl_rt.save_checkpoint(model, tmp_path / "m.pt", extra=Classifier(model, "cocoop").checkpoint_extra())
    with pytest.raises(ExportError, match="is a cocoop checkpoint: its prompts depend on each image") as e:
        export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    assert "\n" not in str(e.value) and not (tmp_path / "m.onnx").exists()


def test_base_to_novel_sweep_of_all_methods_runs_those_that_generalise(tmp_path, capsys):
    from tests.test_data import make_tree
    data = tmp_path / "d"
    for split, n in (("train", 2), ("val", 1), ("test", 2)):
        make_tree(data, {c: n for c in ("cyst", "solid", "mixed", "calcified")}, split)
    descriptions = tmp_path / "desc.json"
    descriptions.write_text(json.dumps({c: [f"an ultrasound of a {c} nodule"] for c in ("calcified", "cyst")}))
    rc, printed, err = cli(sweep, ["--data", data, "--methods", "all", "--shots", "1",
                                   "--seeds", "0", "--out", tmp_path / "sw", "--base-to-novel", "--preset", "tiny",
                                   "--epochs", "1", "--batch-size", "4", "--no-progress", "--class-descriptions",
                                   descriptions], capsys)
    generalise = [m for m in METHODS if REGISTRY[m].generalises]
    assert rc == 0 and f"{len(generalise)} of {len(generalise)} runs done" in printed, err
    assert "leaving out linear_probe, clip_adapter, tip_adapter, tip_adapter_f, lpplusplus" in printed
    results = json.loads((tmp_path / "sw" / "results.json").read_text())
    for r in results["runs"]:  # every generalising method scored the novel classes it never saw
        assert r["metrics"]["novel"]["class_names"] == ["mixed", "solid"], r["method"]
