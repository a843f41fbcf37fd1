"""Backbone loading from local weights files (never a download) and checkpoint identity checks."""
import pytest
import torch
from safetensors.torch import save_file

import nearl_rt
from nearl_rt.backbone import build_backbone
from nearl_rt.core.hashing import sha256_file
from tests.helpers import perturb_adapters, tiny_inputs


@pytest.fixture(scope="module")
def source_clip():
    model, _ = build_backbone("nearl-tiny", init_seed=123)
    return model


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fmt", ["state_dict", "wrapped", "ddp_prefix", "safetensors"])
def test_load_open_clip_weights_file(source_clip, tmp_path, fmt):
    sd = source_clip.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        obj = {"state_dict": sd, "epoch": 3} if fmt == "wrapped" else sd
        if fmt == "ddp_prefix":
            obj = {"module." + k: v for k, v in sd.items()}
        torch.save(obj, path)
    model = nearl_rt.build_model("tiny", pretrained=path)
    _assert_same_weights(model.backbone, source_clip)
    ident = model.backbone_identity
    assert ident.sha256 == sha256_file(path) and ident.path == str(path) and ident.init_seed is None
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_openai_torchscript_archive_loads_with_quick_gelu(source_clip, tmp_path):
    images, tokens = tiny_inputs(batch=1)
    source_clip.output_dict = False
    traced = torch.jit.trace(source_clip, (images, tokens), strict=False, check_trace=False)
    traced.save(tmp_path / "openai.pt")
    model = nearl_rt.build_model("tiny", pretrained=tmp_path / "openai.pt")
    assert model.config.quick_gelu and model.backbone_identity.quick_gelu
    _assert_same_weights(model.backbone, source_clip)


def test_bad_weights_files_fail_clearly(source_clip, tmp_path):
    with pytest.raises(nearl_rt.BackboneError, match="not found.*never downloads"):
        nearl_rt.build_model("tiny", pretrained=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk" * 100)
    with pytest.raises(nearl_rt.BackboneError, match="cannot read backbone weights"):
        nearl_rt.build_model("tiny", pretrained=tmp_path / "junk.pt")
    vit_b32, _ = build_backbone("ViT-B-32")
    torch.save(vit_b32.state_dict(), tmp_path / "b32.pt")
    with pytest.raises(nearl_rt.BackboneError, match="does not fit open_clip model nearl-tiny"):
        nearl_rt.build_model("tiny", pretrained=tmp_path / "b32.pt")


def test_checkpoint_remembers_and_checks_its_backbone_weights(source_clip, tmp_path):
    weights = tmp_path / "clip.pt"
    torch.save(source_clip.state_dict(), weights)
    model = perturb_adapters(nearl_rt.build_model("tiny", pretrained=weights))
    model.set_classes(["normal", "pneumonia"])
    ckpt = nearl_rt.save_checkpoint(model, tmp_path / "ckpt.pt")
    images, _ = tiny_inputs()
    with torch.no_grad():
        want = model.classify(images)
        # the recorded path is found again; an explicit copy elsewhere works too
        assert torch.equal(nearl_rt.load_checkpoint(ckpt).classify(images), want)
        moved = tmp_path / "moved.pt"
        weights.rename(moved)
        assert torch.equal(nearl_rt.load_checkpoint(ckpt, pretrained=moved).classify(images), want)
    with pytest.raises(nearl_rt.CheckpointError, match="pass pretrained=PATH"):
        nearl_rt.load_checkpoint(ckpt)
    other, _ = build_backbone("nearl-tiny", init_seed=7)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(nearl_rt.CheckpointError, match="not the ones .* trained on"):
        nearl_rt.load_checkpoint(ckpt, pretrained=tmp_path / "other.pt")
