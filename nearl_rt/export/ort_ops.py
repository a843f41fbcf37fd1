"""onnxruntime's fused transformer ops (domain com.microsoft) as PyTorch custom ops, for the fused export.

Each op is a `torch.library.custom_op` (namespace `nearl_ort`) with a PyTorch implementation, and
`TRANSLATIONS` maps it to the onnxruntime contrib node the exporter writes in its place:

| custom op | ONNX node (com.microsoft) | computes |
|---|---|---|
| `attention(x, w, b, key_mask, heads, causal)` | `Attention` | self-attention with its QKV projection: x [B, S, D] @ w [D, 3D] + b, `heads` heads, scaled by 1/sqrt(D/heads); `key_mask` int32 [B, S] (1: attend; None: all) as its `mask_index`, `causal` as `unidirectional` |
| `skip_layer_norm(x, skip, gamma, beta, bias, eps)` | `SkipLayerNormalization` | (LN(x + skip + bias), x + skip + bias) |
| `bias_gelu(x, bias)` | `BiasGelu` | erf-GELU(x + bias) |
| `quick_gelu(x, alpha)` | `QuickGelu` | x * sigmoid(alpha * x) (OpenAI CLIP's activation, alpha = 1.702) |

onnxruntime implements all four on its CPU and CUDA providers, and OpenVINO reads them. Masks are Attention's
`mask_index` and `unidirectional`, not its additive `attention_bias` input: onnxruntime's int8 quantiser drops
that input when it turns Attention into QAttention (onnxruntime/quantization/operators/attention.py), which would
unmask the text. The schemas are registered with `onnx.defs` once (the exporter and onnx.checker look ops up
there), with every input, output and attribute the nodes written here use.
"""
from __future__ import annotations

from typing import Optional

import onnx
import onnx.defs
import torch
import torch.nn.functional as F
from onnxscript import values
from onnxscript._internal.values import Op

DOMAIN = "com.microsoft"
QUICK_GELU_ALPHA = 1.702  # open_clip's QuickGELU: x * sigmoid(1.702 x)


def _register_schemas() -> dict[str, Op]:
    """Minimal onnx.defs schemas of the contrib nodes written here (registered once per process)."""
    D = onnx.defs
    single, optional = D.OpSchema.FormalParameterOption.Single, D.OpSchema.FormalParameterOption.Optional
    A = D.OpSchema.AttrType
    specs = {  # name: (inputs, number of required inputs, outputs, attributes); "mask_index" is int32
        "Attention": (("input", "weights", "bias", "mask_index"), 3, ("output",),
                      (("num_heads", A.INT), ("unidirectional", A.INT))),
        "SkipLayerNormalization": (("input", "skip", "gamma", "beta", "bias"), 3,
                                   ("output", "mean", "inv_std_var", "input_skip_bias_sum"), (("epsilon", A.FLOAT),)),
        "BiasGelu": (("A", "B"), 2, ("C",), ()),
        "QuickGelu": (("X",), 1, ("Y",), (("alpha", A.FLOAT),)),
    }
    ops = {}
    for name, (inputs, required, outputs, attributes) in specs.items():
        if not D.has(name, DOMAIN):
            param = D.OpSchema.FormalParameter
            D.register_schema(D.OpSchema(
                name, DOMAIN, 1, f"onnxruntime contrib op {name} (the inputs nearl-rt writes)",
                inputs=[param(n, "M" if n == "mask_index" else "T", param_option=single if i < required else optional)
                        for i, n in enumerate(inputs)],
                outputs=[param(n, "T", param_option=single if i == 0 else optional) for i, n in enumerate(outputs)],
                type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors"),
                                  ("M", ["tensor(int32)"], "key mask")],
                attributes=[D.OpSchema.Attribute(a, t, "", required=False) for a, t in attributes]))
        ops[name] = Op(values.Opset(DOMAIN, 1), name)
    return ops


_OPS = _register_schemas()


@torch.library.custom_op("nearl_ort::attention", mutates_args=())
def attention(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, key_mask: Optional[torch.Tensor], heads: int,
              causal: bool) -> torch.Tensor:
    B, S, D = x.shape
    q, k, v = (t.view(B, S, heads, D // heads).transpose(1, 2) for t in (x @ w + b).split(D, dim=-1))
    mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    if causal:
        tril = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        mask = tril if mask is None else mask & tril
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, S, D)


@attention.register_fake
def _(x, w, b, key_mask, heads, causal):
    return torch.empty_like(x)


@torch.library.custom_op("nearl_ort::skip_layer_norm", mutates_args=())
def skip_layer_norm(x: torch.Tensor, skip: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                    bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + skip + bias
    return F.layer_norm(total, (total.shape[-1],), gamma, beta, eps), total


@skip_layer_norm.register_fake
def _(x, skip, gamma, beta, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("nearl_ort::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)


@bias_gelu.register_fake
def _(x, bias):
    return torch.empty_like(x)


@torch.library.custom_op("nearl_ort::quick_gelu", mutates_args=())
def quick_gelu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return x * torch.sigmoid(alpha * x)


@quick_gelu.register_fake
def _(x, alpha):
    return torch.empty_like(x)


def _attention_onnx(x, w, b, key_mask=None, heads: int = 1, causal: bool = False):
    # the scale is Attention's default, 1/sqrt(head size); a masked key's score gets its mask_filter_value, -1e4
    return _OPS["Attention"](x, w, b, key_mask, num_heads=heads, unidirectional=int(causal))


def _skip_layer_norm_onnx(x, skip, gamma, beta, bias, eps: float):
    out, _, _, total = _OPS["SkipLayerNormalization"](x, skip, gamma, beta, bias, epsilon=eps)
    return out, total


def _bias_gelu_onnx(x, bias):
    return _OPS["BiasGelu"](x, bias)


def _quick_gelu_onnx(x, alpha: float):
    return _OPS["QuickGelu"](x, alpha=alpha)


TRANSLATIONS = {
    torch.ops.nearl_ort.attention.default: _attention_onnx,
    torch.ops.nearl_ort.skip_layer_norm.default: _skip_layer_norm_onnx,
    torch.ops.nearl_ort.bias_gelu.default: _bias_gelu_onnx,
    torch.ops.nearl_ort.quick_gelu.default: _quick_gelu_onnx,
}

