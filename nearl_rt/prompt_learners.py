"""Prompt learners beyond CoOp (nearl_rt.coop), on the frozen backbone (NEARL's adapters stay at their zero update):

- KgCoOp (Yao et al., CVPR 2023): CoOp's context, trained with CE + w * (1 - mean_c cos(t_c, t0_c)): t_c the learned
  prompt's text feature of class c, t0_c the hand-crafted prompt's ("a photo of a {}.") frozen one.
- CoCoOp (Zhou et al., CVPR 2022): the context of image x is v + pi(x), pi = Linear(h -> D)(ReLU(Linear(E -> h)(f)))
  on the image's frozen feature f (h = E // 16): the text tower runs for every (image, class) pair. The meta-net's
  last layer starts at zero (here; CoCoOp draws it at random), so an untrained CoCoOp scores exactly as CoOp's
  "a photo of a" start, i.e. zero-shot.
- BiomedCoOp (Koleilat et al., CVPR 2025): CoOp's context, trained with CE + l1 * MSE(t, mean of the class
  descriptions' frozen text features) + l2 * KL(zero-shot logits over the descriptions kept by a robust z-score
  (|z| <= tau) || learned logits). The descriptions come from a user file (nothing is downloaded).

Settings: the repositories' configs (docs/protocols.md names the files).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nearl_rt.classifier import frozen_image_features
from nearl_rt.coop import INIT_TEXT, PromptContext, init_context
from nearl_rt.core.errors import NearlError
from nearl_rt.methods import cocoop_hidden

KGCOOP_WEIGHT = 8.0  # KgCoOp's W (KgCoOp configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml; BiomedCoOp's base2new)
# BiomedCoOp's settings for its chest X-ray set (configs/trainers/BiomedCoOp/few_shot/covid.yaml)
BIOMEDCOOP = {"sccm": 0.5, "kdsp": 2.0, "tau": 1.5, "prompts": 50}


def class_features_with(model, class_names, template) -> torch.Tensor:
    """Frozen per-prompt text features [C * P, E] of `template` for `class_names` (the model's classes are set to
    them; the caller sets its own afterwards)."""
    model.set_classes(class_names, template)
    with torch.no_grad():
        return model.encode_text_stream(model.class_tokens).features.float()


class KgCoOpContext(PromptContext):
    def __init__(self, vectors: torch.Tensor, reference: torch.Tensor, weight: float = KGCOOP_WEIGHT):
        super().__init__(vectors)
        self.register_buffer("reference", reference.detach().float().clone(), persistent=False)
        self.weight = weight

    def extra_loss(self, model, images, logits):
        learned = model.encode_text_stream(model.class_tokens).features.float()
        return self.weight * (1.0 - F.cosine_similarity(learned, self.reference, dim=-1, eps=1e-7).mean())


class BiomedCoOpContext(PromptContext):
    def __init__(self, vectors: torch.Tensor, descriptions: torch.Tensor, settings: Optional[dict] = None):
        super().__init__(vectors)
        self.register_buffer("descriptions", descriptions.detach().float().clone(), persistent=False)  # [C, P, E]
        self.settings = dict(BIOMEDCOOP if settings is None else settings)

    def selected(self, model, image_features: torch.Tensor) -> torch.Tensor:
        """BiomedCoOp's selective prompting: per description index p, the batch mean of the best class logit;
        descriptions whose robust z-score (median, MAD), standardised, exceeds tau are left out; returns the
        kept descriptions' mean feature per class [C, E] (all of them when the scores cannot be standardised)."""
        d = self.descriptions
        scale = model.backbone.logit_scale.exp()
        scores = torch.stack([(scale * image_features @ d[:, p].t()).max(-1).values.mean() for p in range(d.shape[1])])
        median = scores.median()
        z = (scores - median) / (scores - median).abs().median()
        keep = ((z - z.mean()) / z.std()).abs() <= self.settings["tau"]
        if d.shape[1] < 2 or not bool(keep.any()):
            keep = torch.ones_like(keep)
        return F.normalize(d[:, keep].mean(1), dim=-1)

    def extra_loss(self, model, images, logits):
        s = self.settings
        learned = model.encode_text_stream(model.class_tokens).features.float()
        with torch.no_grad():
            f = frozen_image_features(model, images).float()
            zero_shot = model.backbone.logit_scale.exp() * f @ self.selected(model, f).t()
        target = F.normalize(self.descriptions.mean(1), dim=-1)
        sccm = F.mse_loss(learned, target) * s["sccm"]
        kdsp = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(zero_shot, -1), reduction="sum",
                        log_target=True) / logits.numel() * s["kdsp"]
        return sccm + kdsp


class CoCoOpContext(PromptContext):
    conditional = True

    def __init__(self, vectors: torch.Tensor, embed_dim: int):
        super().__init__(vectors)
        hidden, width = cocoop_hidden(embed_dim), self.ctx.shape[1]
        self.meta_net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, width))
        nn.init.zeros_(self.meta_net[2].weight)
        nn.init.zeros_(self.meta_net[2].bias)

    def classify(self, model, image_features: torch.Tensor) -> torch.Tensor:
        """Logits [B, C]: every image's prompts carry its own context v + pi(f_b)."""
        text = model.text_tower
        p = model.prompt_batch(model.class_tokens)
        B, (C, T), n = image_features.shape[0], p.tokens.shape, self.length
        ctx = self.ctx[None] + self.meta_net(image_features.float())[:, None]  # [B, n, D]

        def conditioned(embeddings: torch.Tensor) -> torch.Tensor:  # [C, T, D] -> [B * C, T, D]
            e = embeddings.unsqueeze(0).expand(B, -1, -1, -1)
            c = ctx.to(e.dtype)[:, None].expand(-1, C, -1, -1)
            return torch.cat([e[:, :, :1], c, e[:, :, 1 + n:]], dim=2).reshape(B * C, T, -1)

        t, mask = text.embed(p, model.dtype, conditioned)
        mask = text.repeat_mask(mask, B)
        for layer in range(len(text.blocks)):
            t = text.block(layer, t, mask)
        txt = F.normalize(text.features(t, p.pool.repeat(B)), dim=-1).view(B, C, -1)
        return model.scaled_logits_paired(image_features.to(txt.dtype), txt)

    def checkpoint_entries(self) -> dict:
        return {**super().checkpoint_entries(),
                "cocoop_meta_net": {k: v.detach().cpu().clone() for k, v in self.meta_net.state_dict().items()}}


def read_descriptions(path: Optional[str], class_names: list, limit: int = BIOMEDCOOP["prompts"]) -> dict:
    """{class: [description, ...]} from a JSON file (BiomedCoOp's per-class prompt sets), the first `limit` per
    class and the same number for every class; one clear line for a missing or unusable file."""
    if not path:
        raise NearlError("--method biomedcoop needs --class-descriptions FILE.json ({\"class name\": [\"description\", "
                         "...]}, e.g. BiomedCoOp's LLM prompt sets); nothing is downloaded")
    file = Path(path)
    if not file.is_file():
        raise NearlError(f"--class-descriptions {path}: no such file (a JSON object {{class name: [description, ...]}})")
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NearlError(f"--class-descriptions {path} is not JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise NearlError(f"--class-descriptions {path} must hold an object {{class name: [description, ...]}}")
    missing = [c for c in class_names if not (isinstance(data.get(c), list) and data[c]
                                              and all(isinstance(d, str) and d.strip() for d in data[c]))]
    if missing:
        raise NearlError(f"--class-descriptions {path} has no list of descriptions for class(es) {missing}")
    count = min([limit] + [len(data[c]) for c in class_names])
    return {c: [d.replace("{}", c) for d in data[c][:count]] for c in class_names}


def build_context(method: str, model, class_names: list, n: int, seed: int,
                  descriptions_file: Optional[str] = None) -> PromptContext:
    """The initial context of a prompt learner for `model` (its classes are left to the caller to set)."""
    start = init_context(model, n, seed)
    if method == "coop":
        return start
    if method == "kgcoop":
        # the hand-crafted prompt's text features, whatever the context length (coop_template(n) is "X X ... {}."
        # for n != 4)
        return KgCoOpContext(start.ctx, class_features_with(model, class_names, INIT_TEXT + " {}."))
    if method == "cocoop":
        return CoCoOpContext(start.ctx, model.embed_dim)
    if method == "biomedcoop":
        per_class = read_descriptions(descriptions_file, class_names)
        count = len(per_class[class_names[0]])
        feats = class_features_with(model, class_names, per_class)
        return BiomedCoOpContext(start.ctx, feats.view(len(class_names), count, -1))
    raise NearlError(f"{method} is not a prompt learner")


def context_from_checkpoint(method: str, ctx: torch.Tensor, extra: dict, model) -> PromptContext:
    """The inference context a checkpoint stores (training-only targets are not needed to score)."""
    if method != "cocoop":
        return PromptContext(ctx)
    context = CoCoOpContext(ctx, model.embed_dim)
    context.meta_net.load_state_dict(extra["cocoop_meta_net"])
    return context

