"""The fused export (`python -m export.onnx CKPT --fused`): the frozen towers' blocks as onnxruntime's fused
transformer ops, for serving on onnxruntime's CPU provider.

The plain export traces the backbone's own modules; `torch.onnx` writes each attention as some 25 nodes
(projections, reshapes, transposes, a softmax) that onnxruntime's optimizer does not recognise, GELU as
five elementwise nodes and every residual add and LayerNorm apart. During a fused trace every block whose
layout is known is run by a forward built from nearl_rt.export.ort_ops instead (same weights, same math):

    pre-LN block (open_clip ResidualAttentionBlock, timm Block):
        a      = Attention(LN1(x))                       QKV projection + attention, one node
        h, x1  = SkipLayerNormalization(a W_o, x, b_o)   residual add + LN2, one node
        y      = x1 + BiasGelu(h W_fc, b_fc) W_proj + b_proj
    post-LN block (Hugging Face BertLayer):
        h  = SkipLayerNormalization(Attention(x) W_o, x, b_o)
        y  = SkipLayerNormalization(BiasGelu(h W_i, b_i) W_o2, h, b_o2)

LayerScale factors are folded into the projections that feed them. Masks become Attention's own: the CLIP
text tower's causal mask its `unidirectional`, BERT's key padding its `mask_index` (nearl_rt.export.ort_ops says
why not an additive bias). A block of another layout (a qk-norm, a gated attention, cross-attention, another
activation) keeps its own forward: the fused graph is then only partly fused, never different. The file is
verified against the unchanged PyTorch model like every export.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch import nn

from nearl_rt.export import ort_ops

Forward = Callable[..., torch.Tensor]


def _t(w: torch.Tensor) -> torch.Tensor:
    """A Linear weight [out, in] as the right operand of x @ W: [in, out]."""
    return w.detach().t().contiguous()


def _bias(linear: nn.Linear) -> torch.Tensor:
    return linear.bias.detach() if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


def _scale(module: nn.Module) -> Optional[torch.Tensor]:
    """A LayerScale's gamma (open_clip and timm name it so), None for nn.Identity, else unsupported."""
    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if not isinstance(gamma, torch.Tensor):
        raise _Unsupported(f"{type(module).__name__} as a layer scale")
    return gamma.detach()


class _Unsupported(Exception):
    """A block whose layout the fused forms do not cover (it keeps its own forward)."""



def _projection(linear: nn.Linear, gamma: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [in, out], b) of `linear` followed by a LayerScale gamma (folded in)."""
    w, b = _t(linear.weight), _bias(linear)
    return (w, b) if gamma is None else (w * gamma, b * gamma)


def _activation(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """act(x + bias) as fused ops: erf-GELU or QuickGELU."""
    if type(module) is nn.GELU and module.approximate == "none":
        return ort_ops.bias_gelu
    if type(module).__name__ == "QuickGELU":  # open_clip's x * sigmoid(1.702 x)
        return lambda x, b: ort_ops.quick_gelu(x + b, ort_ops.QUICK_GELU_ALPHA)
    if type(module).__name__ == "GELUActivation" and not getattr(module, "use_gelu_python", False):
        return ort_ops.bias_gelu  # transformers' exact GELU (hidden_act "gelu")
    raise _Unsupported(f"activation {type(module).__name__}")


def _pre_ln(ln1: nn.LayerNorm, qkv: tuple, heads: int, out: tuple, ln2: nn.LayerNorm, fc: tuple,
            act, proj: tuple) -> Forward:
    """The forward of a pre-LN block from its parts (each projection as (W [in, out], b))."""
    (w_qkv, b_qkv), (w_o, b_o), (w_fc, b_fc), (w_proj, b_proj) = qkv, out, fc, proj
    g2, beta2, eps2 = ln2.weight.detach(), ln2.bias.detach(), float(ln2.eps)

    def forward(x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        a = ort_ops.attention(ln1(x), w_qkv, b_qkv, None, heads, causal)
        h, x = ort_ops.skip_layer_norm(a @ w_o, x, g2, beta2, b_o, eps2)
        return x + (act(h @ w_fc, b_fc) @ w_proj + b_proj)
    return forward


def _openclip_block(block, causal: bool) -> Forward:
    from open_clip.transformer import ResidualAttentionBlock
    if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
        raise _Unsupported(type(block).__name__)
    attn = block.attn
    if not (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.batch_first
            and attn.bias_k is None and not attn.add_zero_attn):
        raise _Unsupported("attention layout")
    w_in = attn.in_proj_weight.detach()
    b_in = attn.in_proj_bias.detach() if attn.in_proj_bias is not None else w_in.new_zeros(w_in.shape[0])
    act = _activation(block.mlp.gelu)
    forward = _pre_ln(block.ln_1, (_t(w_in), b_in), attn.num_heads,
                      _projection(attn.out_proj, _scale(block.ls_1)), block.ln_2,
                      (_t(block.mlp.c_fc.weight), _bias(block.mlp.c_fc)), act,
                      _projection(block.mlp.c_proj, _scale(block.ls_2)))

    def block_forward(q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None or (attn_mask is not None) != causal:
            raise ValueError(f"the fused form of this block was built for {'the causal mask' if causal else 'no mask'}"
                              f"; it was called with {'a' if attn_mask is not None else 'no'} mask")
        return forward(q_x, causal)  # the mask is open_clip's causal one (checked by fused_towers)
    return block_forward


def _timm_block(block, causal: bool) -> Forward:
    from timm.layers import Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block
    if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
        raise _Unsupported(type(block).__name__)
    attn, mlp = block.attn, block.mlp
    if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm, mlp.norm)) \
            or attn.gate is not None or attn.attn_dim != attn.qkv.in_features:
        raise _Unsupported("attention layout")
    forward = _pre_ln(block.norm1, (_t(attn.qkv.weight), _bias(attn.qkv)), attn.num_heads,
                      _projection(attn.proj, _scale(block.ls1)), block.norm2,
                      (_t(mlp.fc1.weight), _bias(mlp.fc1)), _activation(mlp.act),
                      _projection(mlp.fc2, _scale(block.ls2)))

    if causal:
        raise _Unsupported("a causal timm tower")

    def block_forward(x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("the fused form of a timm block takes no mask")
        return forward(x)
    return block_forward


def _bert_layer(layer, causal: bool) -> Forward:
    from transformers.models.bert.modeling_bert import BertLayer
    if causal or type(layer) is not BertLayer or layer.is_decoder or getattr(layer, "add_cross_attention", False) \
            or layer.chunk_size_feed_forward:
        raise _Unsupported(type(layer).__name__)
    self_attn, attn_out = layer.attention.self, layer.attention.output
    if getattr(self_attn, "position_embedding_type", "absolute") != "absolute":
        raise _Unsupported("relative position attention")
    q, k, v = self_attn.query, self_attn.key, self_attn.value
    w_qkv = torch.cat([_t(q.weight), _t(k.weight), _t(v.weight)], dim=1)
    b_qkv = torch.cat([_bias(q), _bias(k), _bias(v)])
    heads = self_attn.num_attention_heads
    w_o, b_o = _projection(attn_out.dense, None)
    ln1 = attn_out.LayerNorm
    w_i, b_i = _projection(layer.intermediate.dense, None)
    act = _activation(layer.intermediate.intermediate_act_fn)
    w_o2, b_o2 = _projection(layer.output.dense, None)
    ln2 = layer.output.LayerNorm

    def layer_forward(hidden_states, attention_mask=None, *args, **kwargs):
        x = hidden_states
        keys = None  # additive key-padding mask [rows, 1, 1, n] (nearl_rt.towers.hf_bert) -> Attention's [rows, n]
        if attention_mask is not None:
            keys = (attention_mask[:, 0, 0, :] == 0).to(torch.int32)
        a = ort_ops.attention(x, w_qkv, b_qkv, keys, heads, False)
        h, _ = ort_ops.skip_layer_norm(a @ w_o, x, ln1.weight.detach(), ln1.bias.detach(), b_o, float(ln1.eps))
        y, _ = ort_ops.skip_layer_norm(act(h @ w_i, b_i) @ w_o2, h, ln2.weight.detach(), ln2.bias.detach(), b_o2,
                                       float(ln2.eps))
        return y
    return layer_forward


_FUSED_FORMS = (_openclip_block, _timm_block, _bert_layer)


def fused_forward(block: nn.Module, causal: bool = False) -> Optional[Forward]:
    """The fused forward of a frozen tower's block, or None when its layout is not one of the fused forms.
    causal: the block is called with open_clip's causal mask (the CLIP text tower), which becomes Attention's
    `unidirectional`."""
    for form in _FUSED_FORMS:
        try:
            return form(block, causal)
        except _Unsupported:
            continue
        except ImportError:  # timm / transformers absent: no such block can exist either
            continue
    return None


def _causal_text(model) -> bool:
    """Whether the text tower calls its blocks with open_clip's causal mask (-inf above the diagonal, 0 elsewhere)."""
    clip = getattr(model.text_tower, "clip", None)
    mask = getattr(clip, "attn_mask", None)
    if not isinstance(mask, torch.Tensor):
        return False
    causal = torch.full_like(mask, float("-inf")).triu(1)
    return bool(torch.equal(mask, causal))


@contextmanager
def fused_towers(model):
    """Within the context, every block of `model`'s two towers that has a fused form runs it (the block's
    own forward is restored afterwards). Yields {"fused": n, "kept": names of the blocks left as they are}."""
    causal = _causal_text(model)
    blocks = [(b, False) for b in model.vision_tower.blocks] + [(b, causal) for b in model.text_tower.blocks]
    patched, kept = [], []
    try:
        with torch.no_grad():
            for block, block_causal in blocks:
                forward = fused_forward(block, block_causal)
                if forward is None:
                    kept.append(type(block).__name__)
                    continue
                block.forward = forward
                patched.append(block)
        yield {"fused": len(patched), "kept": kept}
    finally:
        for block in patched:
            del block.forward
