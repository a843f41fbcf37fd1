"""Backbones from a model download folder (the hub's file layout, as BiomedCLIP is downloaded), offline:
loading, old config keys, the folder's own tokenizer, checkpoints that find the folder again, and one clear
line for every broken folder."""
import json
import shutil
import socket

import pytest
import torch

import nearl_rt
from nearl_rt import evaluate, train
from nearl_rt.backbone import CONFIG_DIR, HF_DIR, build_backbone
from nearl_rt.core.hashing import sha256_file
from nearl_rt.core.cli import run_cli
from tests.helpers import CLASSES, frozen_clip_logits, perturb_adapters
from tests.test_data import make_tree

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def source():
    """The backbone a fabricated download holds (seeded differently from the preset's random init)."""
    model, _ = build_backbone("nearl-tiny-bert", init_seed=321)
    return model


def fabricate(dest, source_model, *, old_keys=False):
    """`source_model` saved as the hub serves open_clip models: weights .bin (with the position_ids
    buffer that older transformers saved), open_clip_config.json, tokenizer files. The vocabulary is
    the shipped test vocabulary with its words in reverse order, so its ids differ."""
    dest.mkdir(parents=True)
    state = dict(source_model.state_dict())
    state["text.transformer.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(state, dest / "open_clip_pytorch_model.bin")
    model_cfg = json.loads((CONFIG_DIR / "nearl-tiny-bert.json").read_text())
    if old_keys:
        text = model_cfg["text_cfg"]
        text["proj"], text["pooler_type"] = text.pop("hf_proj_type"), text.pop("hf_pooler_type")
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": MEAN, "std": STD}}
    (dest / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    vocab = (HF_DIR / "test-vocab" / "vocab.txt").read_text().split()
    (dest / "vocab.txt").write_text("\n".join(vocab[:5] + vocab[5:][::-1]) + "\n")
    shutil.copy(HF_DIR / "test-vocab" / "tokenizer_config.json", dest)
    return dest


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nearl-rt tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("old_keys", [False, True])
def test_download_folder_loads_offline_and_matches(source, tmp_path, old_keys, no_network):
    folder = fabricate(tmp_path / "BiomedCLIP", source, old_keys=old_keys)
    model = nearl_rt.build_model("tiny_bert", pretrained=folder)
    want, got = source.state_dict(), model.backbone.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert type(model.backbone.text.pooler).__name__ == "ClsLastHiddenStatePooler"  # not mean pooling
    ident = model.backbone_identity
    assert ident.sha256 == sha256_file(folder / "open_clip_pytorch_model.bin") and ident.path == str(folder)
    assert list(model.preprocess_cfg["mean"]) == MEAN and list(model.preprocess_cfg["std"]) == STD
    # the folder's own tokenizer, whatever names it: the model's, nearl_rt.tokenize's, not the test vocabulary
    tokens = model.tokenize(CLASSES)
    assert torch.equal(tokens, nearl_rt.tokenize(CLASSES, backbone=folder))
    assert torch.equal(tokens, nearl_rt.tokenize(CLASSES, backbone=ident))
    assert not torch.equal(tokens, nearl_rt.tokenize(CLASSES, backbone="nearl-tiny-bert"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens), frozen_clip_logits(source, images, tokens), rtol=0, atol=1e-5)


def _break(folder, case, source_model):
    cfg_path = folder / "open_clip_config.json"
    cfg = json.loads(cfg_path.read_text())
    if case == "no weights":
        (folder / "open_clip_pytorch_model.bin").unlink()
    elif case == "foreign weights":
        clip, _ = build_backbone("nearl-tiny")
        torch.save(clip.state_dict(), folder / "open_clip_pytorch_model.bin")
    elif case == "not json":
        cfg_path.write_text('{"model_cfg": {"embed_dim": 48,')
    elif case == "no model_cfg":
        cfg_path.write_text(json.dumps(cfg["model_cfg"]))
    elif case == "unknown option":
        cfg["model_cfg"]["text_cfg"]["pooler"] = "cls"
        cfg_path.write_text(json.dumps(cfg))
    elif case == "other architecture":
        cfg["model_cfg"]["vision_cfg"]["timm_pool"] = "avg"
        cfg_path.write_text(json.dumps(cfg))
    elif case == "no tokenizer":
        (folder / "vocab.txt").unlink()
    elif case == "no config":
        cfg_path.unlink()
    return folder / "open_clip_pytorch_model.bin" if case == "weights file alone" else folder


BROKEN = {
    "no weights": r"holds no weights file \(looked for open_clip_model.safetensors, .*open_clip_pytorch_model.bin",
    "foreign weights": r"does not fit open_clip model nearl-tiny-bert: \d+ missing keys \(e.g. \['text.proj.*"
                       r"\d+ unexpected keys \(e.g. \['",
    "not json": r"open_clip_config.json is not valid JSON",
    "no model_cfg": r"open_clip_config.json has no 'model_cfg' entry",
    "unknown option": r"text_cfg is not an open_clip CLIPTextCfg \(.*'pooler'",
    "other architecture": r"describes another architecture than the preset's backbone nearl-tiny-bert "
                          r"\(vision_cfg.timm_pool: 'avg' vs ''",
    "no tokenizer": r"holds no tokenizer files \(tokenizer.json or vocab.txt",
    "no config": r"has no open_clip_config.json; expected the files of an open_clip hub model",
    "weights file alone": r"has a Hugging Face text tower whose tokenizer comes with the weights: pass pretrained= "
                          r"the download folder",
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_download_folder_fails_in_one_clear_line(source, tmp_path, case):
    pretrained = _break(fabricate(tmp_path / "dl", source), case, source)
    with pytest.raises(nearl_rt.BackboneError, match=BROKEN[case]) as info:
        nearl_rt.build_model("tiny_bert", pretrained=pretrained)
    assert "\n" not in str(info.value)


def test_checkpoint_records_the_folder_and_rebuilds_from_it(source, tmp_path):
    folder = fabricate(tmp_path / "dl", source)
    model = perturb_adapters(nearl_rt.build_model("tiny_bert", interaction="text_cacheable", pretrained=folder))
    model.set_classes(CLASSES)
    ckpt = nearl_rt.save_checkpoint(model, tmp_path / "ckpt.pt")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model.classify(images)
        loaded = nearl_rt.load_checkpoint(ckpt)
        assert loaded.backbone_identity == model.backbone_identity
        assert torch.equal(loaded.class_tokens, model.class_tokens)  # tokenized by the folder's vocabulary again
        assert torch.equal(loaded.classify(images), want)
        moved = folder.rename(tmp_path / "moved")
        with pytest.raises(nearl_rt.CheckpointError, match="pass pretrained=PATH to that file"):
            nearl_rt.load_checkpoint(ckpt)
        assert torch.equal(nearl_rt.load_checkpoint(ckpt, pretrained=moved).classify(images), want)
    other = fabricate(tmp_path / "other", build_backbone("nearl-tiny-bert", init_seed=5)[0])
    with pytest.raises(nearl_rt.CheckpointError, match="not the ones .* trained on"):
        nearl_rt.load_checkpoint(ckpt, pretrained=other)


def test_clis_take_the_download_folder(source, tmp_path, capsys):
    folder = fabricate(tmp_path / "dl", source)
    data = make_tree(tmp_path / "d", {"cyst": 2, "solid": 2}, "train")
    make_tree(data, {"cyst": 2, "solid": 2}, "val")
    run = tmp_path / "run"
    argv = ["--data", data, "--out", run, "--preset", "tiny_bert", "--pretrained", folder, "--shots", "2",
            "--epochs", "1", "--no-progress"]
    assert run_cli(train.main, [str(a) for a in argv], prog="train") == 0
    moved = folder.rename(tmp_path / "moved")
    argv = [run, "--data", data, "--split", "val", "--pretrained", moved]
    assert run_cli(evaluate.main, [str(a) for a in argv], prog="evaluate") == 0
    out = capsys.readouterr().out
    assert "accuracy" in out.lower()
