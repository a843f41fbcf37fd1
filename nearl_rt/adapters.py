"""The trainable parts of NEARL-CLIP: the USEformer synergy step and the OCA adapters."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nearl_rt import kernels
from nearl_rt.config import NearlConfig


def _trunc_normal(*shape, std: float) -> nn.Parameter:
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=std, a=-2 * std, b=2 * std))


class OCA(nn.Module):
    """Orthogonal Cross-Attention Adapter for one modality at one layer (math: nearl_rt/kernels/oca.py)."""

    def __init__(self, width: int, config: NearlConfig):
        super().__init__()
        r, ds = config.oca_rank, config.synergy_dim
        self.w_q = _trunc_normal(width, r, std=width ** -0.5)
        self.w_k = _trunc_normal(ds, r, std=ds ** -0.5)
        self.w_v = _trunc_normal(ds, r, std=ds ** -0.5)
        zero_out = config.zero_init == "out_proj"
        self.w_o = nn.Parameter(torch.zeros(r, width)) if zero_out else _trunc_normal(r, width, std=r ** -0.5)
        # W_o = 0 (default) makes the update exactly zero at init with s = 1, and W_o receives a gradient from
        # the first step on; zero_init="scale" keeps a random W_o and starts s at 0 instead.
        self.scale = nn.Parameter(torch.tensor(1.0 if zero_out else 0.0))
        self.eps = config.oca_eps
        self.orthogonal = config.orthogonal
        self.keep_parallel = config.keep_parallel

    def forward(self, x: torch.Tensor, z: torch.Tensor, group: torch.Tensor, backend: str) -> torch.Tensor:
        """x: [R, N, D] tokens; z: [G, M, d_s] synergy; group: [R] which z each sequence reads."""
        r = self.w_k.shape[1]
        kv = z @ kernels.derived("oca_kv", lambda wk, wv: torch.cat((wk, wv), 1), self.w_k, self.w_v)  # one matmul
        k, v = kv[..., :r], kv[..., r:]
        return kernels.oca(x, group, k, v, self.w_q, self.w_o, self.scale, backend=backend, eps=self.eps,
                           orthogonal=self.orthogonal, keep_parallel=self.keep_parallel)


class USEformer(nn.Module):
    """Unified Synergy Embedding Transformer: M queries that read both towers at every layer.

    USE_step(Z, X, T, l):  Q  = Z + e_l
                           Z' = Z + W_o MHA(LN(Q), K, K),  K = [LN(X) W_dv ; LN(T) W_dt]
                           Z  = Z' + MLP(LN(Z'))
    Weights are shared across steps; only e_l is per step.
    """

    def __init__(self, vision_width: int, text_width: int, layers: int, config: NearlConfig):
        super().__init__()
        M, ds = config.num_queries, config.synergy_dim
        self.heads = config.synergy_heads
        self.seeds = _trunc_normal(M, ds, std=0.02)
        self.step_embed = _trunc_normal(layers, ds, std=0.02)
        self.ln_x = nn.LayerNorm(vision_width)
        self.down_x = nn.Linear(vision_width, ds, bias=False)
        self.ln_t = nn.LayerNorm(text_width)
        self.down_t = nn.Linear(text_width, ds, bias=False)
        self.ln_q = nn.LayerNorm(ds)
        self.q_proj = nn.Linear(ds, ds)
        self.k_proj = nn.Linear(ds, ds)
        self.v_proj = nn.Linear(ds, ds)
        self.out_proj = nn.Linear(ds, ds)
        self.ln_mlp = nn.LayerNorm(ds)
        hidden = int(round(config.synergy_mlp_ratio * ds))
        self.mlp = nn.Sequential(nn.Linear(ds, hidden), nn.GELU(), nn.Linear(hidden, ds))

    def initial(self, groups: int) -> torch.Tensor:
        return self.seeds.unsqueeze(0).expand(groups, -1, -1)

    def step(self, z: torch.Tensor, layer: int, x: Optional[torch.Tensor], t: torch.Tensor,
             t_valid: torch.Tensor, backend: str) -> torch.Tensor:
        """z: [G, M, d_s]; x: [G, Nx, Dv] or None; t: [G or 1, Nt, Dt]; t_valid: [G or 1, Nt]."""
        q = self.q_proj(self.ln_q(z + self.step_embed[layer]))
        img = (self.ln_x.weight, self.ln_x.bias, self.down_x.weight) if x is not None else (None, None, None)
        o = kernels.use_attention(q, x, t, t_valid, *img, self.ln_t.weight, self.ln_t.bias, self.down_t.weight,
                                  self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias,
                                  heads=self.heads, backend=backend)
        z = z + self.out_proj(o)
        return z + self.mlp(self.ln_mlp(z))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build_adapters(config: NearlConfig, vision_width: int, text_width: int, layers: int) -> dict[str, nn.Module]:
    """The trainable modules, keyed by the prefix their weights carry in checkpoints."""
    return {"use": USEformer(vision_width, text_width, layers, config),
            "oca_v": nn.ModuleList(OCA(vision_width, config) for _ in range(layers)),
            "oca_t": nn.ModuleList(OCA(text_width, config) for _ in range(layers))}


def expected_adapter_shapes(config: NearlConfig) -> dict[str, tuple]:
    """Adapter tensor shapes for `config`, from its backbone's architecture alone (built on the meta device)."""
    from nearl_rt.backbone import meta_backbone
    from nearl_rt.core.errors import BackboneError
    from nearl_rt.towers import build_towers
    try:
        vision, text = build_towers(meta_backbone(config.backbone), config.backbone)
    except BackboneError as e:
        raise ValueError(str(e)) from None
    with torch.device("meta"):
        mods = build_adapters(config, vision.width, text.width, len(vision.blocks))
    return {f"{name}.{k}": tuple(v.shape) for name, m in mods.items() for k, v in m.state_dict().items()}


def state_mismatch(expected: dict[str, tuple], state: dict[str, torch.Tensor]):
    """None if `state` has exactly the expected names and shapes, else a message saying what differs."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or shapes):
        return None
    return (f"adapter weights do not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(shapes)} with another shape "
            f"(e.g. {shapes[:2]})")


__all__ = ["OCA", "USEformer", "count_parameters"]


def perturb_adapters(model, seed: int = 0, scale: float = 0.5, noise: float = 0.1):
    """Give every adapter parameter a non-trivial random value, in place (an untrained model is the frozen backbone,
    which tests exports, kernels and benchmarks nothing of the adapters): OCA scales `scale`, every other adapter
    parameter + noise * N(0, 1) drawn from `seed`. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_state_dict().items():
            if name.endswith("scale"):
                p.fill_(scale)
            else:
                p.add_(noise * torch.randn(p.shape, generator=g).to(p.dtype))
    return model
