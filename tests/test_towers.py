"""Tower adapters on the tiny BERT + timm ViT preset: orthogonal updates, adapter shapes without weights,
token checks, and one clear error for every backbone NEARL-CLIP cannot drive."""
import importlib.util
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import nearl_rt
from nearl_rt.adapters import expected_adapter_shapes
from nearl_rt.backbone import HF_DIR, build_backbone, create_open_clip, model_config
from nearl_rt.towers import build_towers
from tests.helpers import assert_orthogonal, oca_update_stats, perturb_adapters, tiny, tiny_inputs


def test_tiny_bert_towers_and_widths():
    model = tiny(preset="tiny_bert")
    assert type(model.backbone).__name__ == "CustomTextCLIP"
    assert type(model.vision_tower).__name__ == "TimmVision" and type(model.text_tower).__name__ == "BertText"
    assert (model.vision_tower.width, model.text_tower.width, len(model.vision_tower.blocks)) == (64, 40, 2)
    assert model.embed_dim == 48 and model.preprocess_cfg["size"] == (32, 32)


@pytest.mark.parametrize("mode", ["bidirectional", "text_cacheable"])
def test_tiny_bert_update_is_orthogonal_to_each_token(mode):
    model = perturb_adapters(tiny(mode, "tiny_bert"), scale=1.0)
    seen = oca_update_stats(model, *tiny_inputs(batch=2, preset="tiny_bert"))
    assert sorted({w for w, _, _ in seen}) == [40, 64] and len(seen) == 4
    assert_orthogonal(seen)


@pytest.mark.parametrize("preset", ["tiny", "tiny_bert"])
def test_expected_adapter_shapes_need_no_weights(preset):
    """What read_checkpoint checks a file against: the shapes of a real build, from a meta-device build."""
    model = tiny(preset=preset, oca_rank=5)
    assert expected_adapter_shapes(model.config) == {k: tuple(v.shape) for k, v in model.adapter_state_dict().items()}


def test_tokens_of_another_tokenizer_fail_clearly():
    model = tiny(preset="tiny_bert")
    images, clip_tokens = tiny_inputs(preset="tiny")  # CLIP ids (up to 49407), 77 long
    with pytest.raises(ValueError, match=r"do not fit nearl-tiny-bert's text tower \(at most 64 tokens.*model.tokenize"):
        model(images, clip_tokens)
    with pytest.raises(ValueError, match=r"ids < 512"):
        model(images, clip_tokens[:, :64])


def _bert_dir(tmp_path, **changes):
    config = json.loads((HF_DIR / "nearl-tiny-bert" / "config.json").read_text())
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _tiny_bert_with(text_changes: dict):
    cfg = model_config("nearl-tiny-bert")
    cfg["text_cfg"].update(text_changes)
    return create_open_clip("nearl-tiny-bert", cfg, False, 0)


def test_unequal_depths_fail_clearly(tmp_path):
    backbone = _tiny_bert_with({"hf_model_name": str(_bert_dir(tmp_path, num_hidden_layers=3))})
    with pytest.raises(nearl_rt.BackboneError, match="2 vision and 3 text layers.*same depth"):
        build_towers(backbone, "deep-text")


def test_unsupported_towers_fail_clearly(tmp_path):
    with pytest.raises(nearl_rt.BackboneError, match="image tower Linear is not supported"):
        build_towers(SimpleNamespace(visual=nn.Linear(2, 2)), "odd")
    clip, _ = build_backbone("nearl-tiny")
    with pytest.raises(nearl_rt.BackboneError, match="text tower Linear is not supported"):
        build_towers(SimpleNamespace(visual=clip.visual, text=nn.Linear(2, 2)), "odd")
    with pytest.raises(nearl_rt.BackboneError, match="pooling MeanPooler is not supported.*CLS"):
        build_towers(_tiny_bert_with({"hf_pooler_type": "mean_pooler"}), "mean-pooled")
    with pytest.raises(nearl_rt.BackboneError, match="'roberta' is not supported"):
        build_towers(_tiny_bert_with({"hf_model_name": str(_bert_dir(tmp_path, model_type="roberta"))}), "roberta")


def test_unknown_hf_text_model_and_missing_transformers_fail_clearly(monkeypatch, tmp_path):
    from nearl_rt.backbone import offline_config
    cfg = model_config("nearl-tiny-bert")
    cfg["text_cfg"]["hf_model_name"] = "someone/other-bert"
    with pytest.raises(nearl_rt.BackboneError, match="'someone/other-bert' needs its Hugging Face config.json"):
        offline_config(cfg, "a config")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else find_spec(n, *a))
    with pytest.raises(nearl_rt.BackboneError, match=r"needs the transformers package: pip install 'nearl-rt\[hf\]'"):
        nearl_rt.build_model("tiny_bert")
    assert nearl_rt.build_model("tiny").num_trainable_parameters() > 0  # CLIP presets need no transformers


def test_tokenize_without_a_folder_uses_the_test_vocabulary_and_warns():
    with pytest.warns(nearl_rt.RandomBackboneWarning, match="test vocabulary stands in.*backbone=DIR"):
        toks = nearl_rt.tokenize(["Normal lungs.", "pneumonia"], backbone="nearl-tiny-bert")
    vocab = (HF_DIR / "test-vocab" / "vocab.txt").read_text().split("\n")
    ids = {w: vocab.index(w) for w in ("[CLS]", "[SEP]", "normal", "lungs", ".", "pneumonia")}
    assert toks.shape == (2, 64) and toks[:, 6:].eq(0).all()
    assert toks[0, :5].tolist() == [ids[w] for w in ("[CLS]", "normal", "lungs", ".", "[SEP]")]
    assert toks[1, :3].tolist() == [ids["[CLS]"], ids["pneumonia"], ids["[SEP]"]]
    model = tiny(preset="tiny_bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model warned once already, when it was built
        assert torch.equal(model.tokenize(["Normal lungs.", "pneumonia"]), toks)
