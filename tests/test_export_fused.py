"""The fused export (export_model(fused=True), --fused): onnxruntime's fused transformer ops, same results.

Block by block, each fused form (run eagerly: the custom ops have PyTorch implementations) equals the block's own
forward on random weights (LayerNorm affines, LayerScales, biases all non-trivial); the exported file equals the
unfused PyTorch model on fresh inputs (float32: summation order only, the plain export's 1e-4), holds the fused
nodes, and its dynamic int8 version quantises the attention too.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import nearl_rt
from nearl_rt.core.cli import run_cli
from nearl_rt.core.metadata import read_metadata
from nearl_rt.export import onnx as export_onnx
from nearl_rt.export.fused import fused_forward, fused_towers
from nearl_rt.export.onnx import export_model
from tests.export_cases import exported, exported_int8, tiny_model
from tests.helpers import CLASSES, TINY_PRESETS

MODES = ["bidirectional", "text_cacheable"]


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def _check_form(block, x, *args, causal=False, **kwargs):
    forward = fused_forward(block, causal)
    assert forward is not None, f"{type(block).__name__} has no fused form"
    with torch.no_grad():
        ref = block(x, *args, **kwargs)
        ref = ref[0] if isinstance(ref, tuple) else ref
        got = forward(x, *args, **kwargs)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5 * (ref.abs().max() + 1)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("layer_scale", [None, 0.3])
def test_openclip_block_form(act, layer_scale):
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock
    block = _randomise(ResidualAttentionBlock(24, 3, ls_init_value=layer_scale,
                                              act_layer=nn.GELU if act == "gelu" else QuickGELU), seed=1)
    x = torch.randn(2, 7, 24)
    _check_form(block, x)
    causal = torch.full((7, 7), float("-inf")).triu(1)  # the text tower's additive mask
    _check_form(block, x, attn_mask=causal, causal=True)


@pytest.mark.parametrize("layer_scale", [None, 0.2])
def test_timm_block_form(layer_scale):
    from timm.models.vision_transformer import Block
    _check_form(_randomise(Block(24, 4, qkv_bias=True, init_values=layer_scale), seed=2), torch.randn(3, 5, 24))


def test_bert_layer_form():
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer
    layer = _randomise(BertLayer(BertConfig(hidden_size=24, num_attention_heads=3, intermediate_size=40)), seed=3)
    mask = torch.zeros(2, 1, 1, 6)
    mask[0, ..., 4:] = torch.finfo(torch.float32).min  # padded keys of the first row (nearl_rt.towers.hf_bert)
    _check_form(layer, torch.randn(2, 6, 24), attention_mask=mask)


def test_other_layouts_keep_their_forward():
    from open_clip.transformer import ResidualAttentionBlock
    from timm.models.vision_transformer import Block
    assert fused_forward(ResidualAttentionBlock(16, 2, act_layer=nn.SiLU)) is None
    assert fused_forward(Block(16, 2, qk_norm=True)) is None
    assert fused_forward(nn.Linear(4, 4)) is None


def _ort(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("mode", MODES)
def test_fused_export_matches_pytorch(mode, preset):
    model, path = tiny_model(mode, preset), exported(mode, preset=preset, fused=True)
    session = _ort(path)
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(200 + batch))
        with torch.no_grad():
            ref = model.classify(images)
        logits, probs = session.run(["logits", "probs"], {"images": images.numpy()})
        assert np.abs(logits - ref.numpy()).max() <= 1e-4
        np.testing.assert_allclose(probs, ref.softmax(-1).numpy(), atol=1e-5, rtol=0)
    nodes = onnx.load(str(path)).graph.node
    ops = [n.op_type for n in nodes if n.domain == "com.microsoft"]
    blocks = len(model.vision_tower.blocks) + (len(model.text_tower.blocks) if mode == "bidirectional" else 0)
    assert ops.count("Attention") == blocks and ops.count("BiasGelu") == blocks
    assert ops.count("SkipLayerNormalization") >= blocks
    # NEARL's ops in their graph forms: no scaled_dot_product_attention decomposition (its NaN guard) is left
    assert "IsNaN" not in [n.op_type for n in nodes]
    assert read_metadata(path)["graph"] == "fused" and read_metadata(exported(mode, preset=preset))["graph"] == "plain"
    assert model.backend == "torch"  # the trace's backend override is undone


def test_fused_towers_restore_the_blocks_and_leave_others_alone():
    model = nearl_rt.build_model("tiny", interaction="text_cacheable", backend="torch")
    odd = model.vision_tower.blocks[0]
    odd.mlp.gelu = nn.SiLU()  # a layout without a fused form: traced as it is
    with fused_towers(model) as done:
        assert done == {"fused": 3, "kept": ["ResidualAttentionBlock"]}
        assert "forward" in vars(model.vision_tower.blocks[1]) and "forward" not in vars(odd)
    assert not any("forward" in vars(b) for b in list(model.vision_tower.blocks) + list(model.text_tower.blocks))


def test_partly_fused_export_still_matches(tmp_path):
    model = tiny_model("text_cacheable")
    odd = nearl_rt.build_model("tiny", interaction="text_cacheable", backend="torch")
    odd.load_adapter_state_dict(model.adapter_state_dict())
    odd.set_classes(CLASSES, model.templates)
    odd.vision_tower.blocks[1].mlp.gelu = nn.SiLU()
    path = export_model(odd.eval(), tmp_path / "odd.onnx", fused=True)  # verified inside
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Attention") == 1


def test_fused_refuses_fp16(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        export_model(tiny_model("text_cacheable"), tmp_path / "x.onnx", fused=True, fp16=True)


@pytest.mark.parametrize("mode", MODES)
def test_fused_dynamic_int8_quantises_attention(mode):
    path = exported_int8(mode, fused=True)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "QAttention" in ops and "Attention" not in ops
    meta = read_metadata(path)
    assert meta["graph"] == "fused" and "Attention" in meta["quantization"]["quantized_ops"]
    images = np.random.default_rng(7).standard_normal((4, 3, 32, 32), dtype=np.float32)
    ref = _ort(exported(mode, fused=True)).run(["probs"], {"images": images})[0]
    got = _ort(path).run(["probs"], {"images": images})[0]
    assert np.abs(got - ref).max() < 0.02  # int8 rounding, not another model


def test_cli_fused(tmp_path, capsys):
    ckpt = nearl_rt.save_checkpoint(tiny_model("text_cacheable"), tmp_path / "ckpt.pt")
    rc = run_cli(export_onnx.main, [str(ckpt), "--fused", "-o", str(tmp_path / "m.onnx")], prog="export.onnx")
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert read_metadata(tmp_path / "m.onnx")["graph"] == "fused"
    rc = run_cli(export_onnx.main, [str(ckpt), "--fused", "--fp16", "-o", str(tmp_path / "h.onnx")], prog="export.onnx")
    assert rc == 2 and "float32" in capsys.readouterr().err and not (tmp_path / "h.onnx").exists()
