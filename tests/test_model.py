"""The reference NEARL-CLIP model: identity at init, orthogonal updates, frozen backbone, modes."""
import pytest
import torch

import nearl_rt
from tests.helpers import (CLASSES, TINY_PRESETS, assert_orthogonal, frozen_clip_logits, oca_update_stats,
                           perturb_adapters, tiny, tiny_inputs)

MODES = ["bidirectional", "text_cacheable"]


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("zero_init", ["scale", "out_proj"])
def test_untrained_model_equals_frozen_clip_tiny(mode, zero_init, preset):
    """The frozen model's own encode_image / encode_text (open_clip CLIP, or TimmModel + HFTextEncoder)."""
    model = tiny(mode, preset, zero_init=zero_init)
    images, tokens = tiny_inputs(batch=5, preset=preset)
    with torch.no_grad():
        ours, ref = model(images, tokens), frozen_clip_logits(model.backbone, images, tokens)
    assert ours.shape == (5, len(CLASSES))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_untrained_vit_b16_equals_frozen_clip(mode):
    model = nearl_rt.build_model("vit_b16", interaction=mode)
    images = torch.randn(2, 3, 224, 224)
    tokens = nearl_rt.tokenize(["a chest x-ray of normal lungs.", "a chest x-ray showing pneumonia."])
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens), frozen_clip_logits(model.backbone, images, tokens),
                                   rtol=0, atol=1e-5)


@pytest.mark.slow
def test_vit_b16_update_is_orthogonal_to_each_token():
    """At the real widths (768 image, 512 text), per token, cos(F' - F, F) ~ 0."""
    model = perturb_adapters(nearl_rt.build_model("vit_b16"), scale=1.0)
    seen = oca_update_stats(model, torch.randn(1, 3, 224, 224), nearl_rt.tokenize(["normal", "pneumonia"]))
    assert {w for w, _, _ in seen} == {768, 512} and len(seen) == 24
    assert_orthogonal(seen)


def test_ablation_orthogonal_false_is_not_orthogonal():
    model = perturb_adapters(tiny(orthogonal=False), scale=1.0)
    cos = []
    model.oca_v[0].register_forward_hook(
        lambda m, a, o: cos.append(torch.nn.functional.cosine_similarity(o - a[0], a[0], dim=-1).abs().max()))
    with torch.no_grad():
        model(*tiny_inputs())
    assert cos[0] > 1e-2


@pytest.mark.slow
def test_vit_b16_trainable_parameter_count():
    model = nearl_rt.build_model("vit_b16")
    n = model.num_trainable_parameters()
    assert 1_400_000 <= n <= 1_520_000, n
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert sum(p.numel() for p in model.backbone.parameters()) > 140_000_000


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("mode", MODES)
def test_backbone_frozen_and_every_adapter_parameter_trains(mode, preset):
    model = tiny(mode, preset)
    model.train()
    assert not model.backbone.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    images, tokens = tiny_inputs(batch=4, preset=preset)
    labels = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2, weight_decay=0.1)
    got_grad = {name: False for name, _ in model.named_parameters() if _.requires_grad}
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images, tokens), labels)
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                got_grad[name] |= bool(p.grad is not None and p.grad.abs().sum() > 0)
            else:
                assert p.grad is None, f"frozen {name} received a gradient"
        opt.step()
    assert all(got_grad.values()), [k for k, v in got_grad.items() if not v]
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"


@pytest.mark.parametrize("preset, context", [("tiny", 77), ("tiny_bert", 64)])
@pytest.mark.parametrize("mode", MODES)
def test_trimmed_prompts_equal_full_context(mode, preset, context):
    """Exact through the causal mask (CLIP) or the key-padding mask of every layer (BERT)."""
    model = perturb_adapters(tiny(mode, preset))
    images, tokens = tiny_inputs(preset=preset)
    with torch.no_grad():
        trimmed = model(images, tokens)
        model.trim_prompts = False
        full = model(images, tokens)
    assert model.prompt_batch(tokens).tokens.shape[1] == tokens.shape[1] == context
    model.trim_prompts = True
    assert model.prompt_batch(tokens).tokens.shape[1] < 20
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-5)


def test_text_features_depend_on_images_only_in_bidirectional_mode():
    images, tokens = tiny_inputs(batch=2, seed=1)
    other, _ = tiny_inputs(batch=2, seed=2)
    torch.manual_seed(3)
    for mode, depends in (("text_cacheable", False), ("bidirectional", True)):
        model = perturb_adapters(tiny(mode))
        with torch.no_grad():
            _, t1 = model.encode(images, tokens)
            _, t2 = model.encode(other, tokens)
        if depends:
            assert (t1 - t2).abs().max() > 1e-3, "bidirectional text features must read the image"
        else:
            assert torch.equal(t1, t2)


@pytest.mark.parametrize("mode", MODES)
def test_logits_do_not_depend_on_the_rest_of_the_batch(mode):
    model = perturb_adapters(tiny(mode))
    images, tokens = tiny_inputs(batch=7)
    with torch.no_grad():
        full = model(images, tokens)
        for i in (0, 3, 6):
            torch.testing.assert_close(model(images[i:i + 1], tokens), full[i:i + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(images[2:5].flip(0), tokens), full[2:5].flip(0), rtol=1e-5, atol=1e-5)


def test_classify_uses_the_class_set_and_caches_text_until_weights_change():
    model = perturb_adapters(tiny("text_cacheable"))
    model.set_classes(CLASSES[:2], template="a chest x-ray of {}.")
    assert model.prompts == [f"a chest x-ray of {c}." for c in CLASSES[:2]]
    images, _ = tiny_inputs()
    with torch.no_grad():
        logits = model.classify(images)
        torch.testing.assert_close(logits, model(images, model.tokenize(model.prompts)), rtol=0, atol=1e-6)
        first = model._text_cache[1]
        model.classify(images)
        assert model._text_cache[1] is first, "text stream recomputed although nothing changed"
        model.oca_t[0].scale.add_(0.25)
        changed = model.classify(images)
    assert model._text_cache[1] is not first
    torch.testing.assert_close(changed, model(images, model.class_tokens).detach(), rtol=0, atol=1e-6)
    model.set_classes(["a", "b", "c"])
    assert model._text_cache is None and model.classify(images).shape == (3, 3)


@pytest.mark.parametrize("bad, msg", [([], "non-empty"), (["a", "a"], "unique"), (["a", " "], "non-empty"),
                                      ("normal", "non-empty list")])
def test_set_classes_rejects_bad_names(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tiny().set_classes(bad)


def test_set_classes_rejects_bad_template_and_classify_needs_classes():
    model = tiny()
    with pytest.raises(ValueError, match="exactly one"):
        model.set_classes(["a", "b"], template="no placeholder")
    with pytest.raises(RuntimeError, match="set_classes"):
        model.classify(torch.randn(1, 3, 32, 32))


def test_bad_inputs_and_options_fail_clearly():
    model = tiny()
    images, tokens = tiny_inputs()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(images[:, :1], tokens)
    with pytest.raises(ValueError, match="tokens must be"):
        model(images, tokens[0])
    with pytest.raises(ValueError, match="unknown preset"):
        nearl_rt.build_model("vit_h14")
    with pytest.raises(ValueError, match="unknown config option"):
        nearl_rt.build_model("tiny", ocarank=3)
    with pytest.raises(ValueError, match="interaction"):
        nearl_rt.build_model("tiny", interaction="sideways")
    with pytest.raises(ValueError, match="backend"):
        nearl_rt.build_model("tiny", backend="cuda")


def test_random_backbone_warns():
    with pytest.warns(nearl_rt.RandomBackboneWarning, match="meaningless"):
        nearl_rt.build_model("tiny")


def test_tokenize_matches_open_clip_and_backend_env_override(monkeypatch):
    import open_clip
    from nearl_rt import kernels
    toks = nearl_rt.tokenize(["a photo of a lung.", "x"])
    assert toks.dtype == torch.long and toks.shape == (2, 77)
    assert torch.equal(toks, open_clip.get_tokenizer("ViT-B-16")(["a photo of a lung.", "x"]))
    monkeypatch.setenv("NEARL_RT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="NEARL_RT_BACKEND"):
        kernels.resolve_backend("torch", torch.device("cpu"))
    monkeypatch.setenv("NEARL_RT_BACKEND", "torch")
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_and_stays_close(dtype):
    model = perturb_adapters(tiny())
    images, tokens = tiny_inputs()
    with torch.no_grad():
        ref = model(images, tokens)
        half = model.to(dtype)(images, tokens)
    assert half.dtype == dtype and torch.isfinite(half).all()
    # logits are scaled cosines (|logit| <= ~14); half precision keeps ~3 significant digits
    torch.testing.assert_close(half.float(), ref, rtol=0, atol=0.15 if dtype == torch.bfloat16 else 0.05)
