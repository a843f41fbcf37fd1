"""The full-size `biomedclip` preset with random weights (timm ViT-B/16 + PubMedBERT, 768/768 wide), built once:
parameter counts, identity at init in both modes, exact prompt trimming, orthogonal updates, a frozen backbone
under training, the fused ops on its 768-wide BERT text tokens and key-padding mask, and ONNX export parity."""
import copy

import pytest
import torch

import nearl_rt
from nearl_rt.kernels import oca_reference, use_attention_reference
from nearl_rt.kernels.oca_triton import oca_triton
from nearl_rt.kernels.use_attention_triton import use_attention_triton
from nearl_rt.export.onnx import check_float32_error, export_model
from nearl_rt.core.session import NearlSession
from nearl_rt.backbone import build_backbone
from tests.helpers import assert_orthogonal, frozen_clip_logits, oca_update_stats, perturb_adapters
from tests.test_kernels_oca import OCA_PARAMS, assert_fused_matches

pytestmark = pytest.mark.slow
MODES = ["bidirectional", "text_cacheable"]
PROMPTS = ["a chest x-ray of normal lungs.", "a chest x-ray showing pneumonia."]


@pytest.fixture(scope="module")
def frozen():
    """The random backbone, built once (~5 s, 196M parameters): (config, backbone, identity)."""
    config = nearl_rt.preset_config("biomedclip")
    return (config, *build_backbone(config.backbone))


def nearl(frozen, mode="bidirectional", **overrides):
    """A fresh untrained NearlCLIP on the shared backbone (overrides: NearlConfig fields)."""
    config, backbone, identity = frozen
    return nearl_rt.NearlCLIP(config.replace(interaction=mode, **overrides), backbone, identity, backend="torch")


@pytest.fixture(scope="module")
def inputs(frozen):
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, 3, 224, 224, generator=g), nearl_rt.tokenize(PROMPTS, backbone=frozen[2])


def test_parameter_counts(frozen):
    model = nearl(frozen)
    assert model.config.oca_rank == 26
    assert model.num_trainable_parameters() == 1_453_976  # in the paper's 1.40M-1.52M band
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == model.num_trainable_parameters()
    assert sum(p.numel() for p in model.backbone.parameters()) == 195_902_721  # the model card's 196M
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert (model.vision_tower.width, model.text_tower.width, len(model.text_tower.blocks)) == (768, 768, 12)


@pytest.mark.parametrize("mode", MODES)
def test_untrained_model_equals_frozen_biomedclip(frozen, inputs, mode):
    images, tokens = inputs
    assert tokens.shape == (2, 256)
    with torch.no_grad():
        ours, ref = nearl(frozen, mode)(images, tokens), frozen_clip_logits(frozen[1], images, tokens)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_trimmed_prompts_equal_the_full_256_tokens(frozen, inputs, mode):
    """Exact in float64 (the padding is masked out of every key set); float32 rounds differently for 11 and
    256 keys. The adapters keep a random init (zero_init="scale": W_o random) with scales 0.5 (a non-trivial
    update): the tiny tests' extra weight noise makes this 12-layer, 768-wide model ill-conditioned in float32
    (1.5e-4 from float64)."""
    images, tokens = inputs[0][:1], inputs[1]
    model = perturb_adapters(nearl(frozen, mode, zero_init="scale"), noise=0.0)
    with torch.no_grad():
        trimmed = model(images, tokens)
        assert model.prompt_batch(tokens).tokens.shape[1] < 20
        model.trim_prompts = False
        full = model(images, tokens)
        assert (trimmed - frozen_clip_logits(frozen[1], images, tokens)).abs().max() > 1e-3  # adapters act
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-5)


def test_update_is_orthogonal_to_each_token(frozen, inputs):
    model = perturb_adapters(nearl(frozen, zero_init="scale"), scale=1.0, noise=0.0)
    seen = oca_update_stats(model, inputs[0][:1], inputs[1])
    assert {w for w, _, _ in seen} == {768} and len(seen) == 24
    assert_orthogonal(seen)


def test_backbone_bit_identical_after_optimizer_steps(frozen, inputs):
    model = perturb_adapters(nearl(frozen, zero_init="scale"), noise=0.0).train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-3, weight_decay=0.1)
    moved = {id(p): p.detach().clone() for p in model.adapter_parameters()}
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs[0][:1], inputs[1]), torch.tensor([1])).backward()
        opt.step()
    model.eval()
    assert all(not torch.equal(p, moved[id(p)]) for p in model.adapter_parameters())
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"


def test_fused_ops_on_bert_text_tokens(frozen, inputs):
    """The Triton OCA and USE attention on what they see in this model: 768-wide BERT tokens after layer 0
    (padding included) with BERT's key-padding mask as the text `valid` mask; output and every gradient
    within the kernel tests' tolerance rule."""
    model = perturb_adapters(nearl(frozen), seed=7)
    images, tokens = inputs
    with torch.no_grad():
        p = model.prompt_batch(tokens)
        t, mask = model.embed_prompts(p)
        t = model.text_tower.block(0, t, mask)
        x = model.vision_tower.block(0, model.vision_tower.embed(images[:1]))
        use, oca = model.use, model.oca_t[0]
        q = use.q_proj(use.ln_q(use.initial(1) + use.step_embed[0]))
        z = use.initial(1)
    C, n = p.tokens.shape
    assert not p.valid.all() and p.valid[:, 0].all()  # real padding to mask
    use_args = dict(q=q, x=x, t=t.reshape(1, C * n, -1), t_valid=p.valid.reshape(1, C * n),
                    ln_x_w=use.ln_x.weight, ln_x_b=use.ln_x.bias, w_dx=use.down_x.weight,
                    ln_t_w=use.ln_t.weight, ln_t_b=use.ln_t.bias, w_dt=use.down_t.weight,
                    w_k=use.k_proj.weight, b_k=use.k_proj.bias, w_v=use.v_proj.weight, b_v=use.v_proj.bias)
    use_args = {k: v.detach() for k, v in use_args.items()}
    params = [k for k in use_args if k != "t_valid"]
    assert_fused_matches(use_attention_triton, use_attention_reference, use_args, params, torch.float32,
                         heads=use.heads)
    oca_args = dict(x=t, group=torch.zeros(C, dtype=torch.long), k=(z @ oca.w_k), v=(z @ oca.w_v), w_q=oca.w_q,
                    w_o=oca.w_o, scale=oca.scale)
    oca_args = {k: v.detach() for k, v in oca_args.items()}
    assert_fused_matches(oca_triton, oca_reference, oca_args, OCA_PARAMS, torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_export_parity(frozen, mode, tmp_path):
    """Full-size BiomedCLIP with non-trivial adapters to ONNX in both modes: export_model's own verification
    passes, and NearlSession's logits on three other images are within the export's float32 error bound of a
    float64 copy of the model (this random-weight model is ill-conditioned: float32 PyTorch is itself ~1e-4-1e-3
    off it; docs/export.md#verification)."""
    model = perturb_adapters(nearl(frozen, mode), seed=2).eval()
    model.set_classes(["normal", "pneumonia"], "a chest x-ray showing {}.")
    path = export_model(model, tmp_path / "biomedclip.onnx")
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ref32 = model.classify(images).double()
        ref64 = copy.deepcopy(model).double().classify(images.double())
    session = NearlSession(path, providers=["CPUExecutionProvider"])
    assert session.metadata["backbone"] == model.backbone_identity.name
    got = session.run(images.numpy())[0]
    figures = check_float32_error(got, ref32.numpy(), ref64.numpy())  # raises ExportError beyond the bound
    assert figures["rms_error"]["onnxruntime"] <= figures["bound"]["rms"]
