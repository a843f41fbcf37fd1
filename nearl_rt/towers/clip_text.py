"""open_clip CLIP's own causal text transformer: EOT pooling after ln_final, `text_projection`.

The causal mask keeps every real token blind to the padding after it, so trimming the prompts to
the longest EOT + 1 changes nothing, and one [n, n] mask serves every row.
"""
from __future__ import annotations

import torch
from open_clip.model import CLIP
from torch import nn

from nearl_rt.core.errors import BackboneError
from nearl_rt.towers import PromptBatch


def accepts(backbone) -> bool:
    return isinstance(backbone, CLIP)


def tower(backbone, name: str) -> "ClipText":
    return ClipText(backbone, name)


class ClipText:
    def __init__(self, clip: CLIP, name: str):
        if clip.text_pool_type not in ("argmax", "eos"):
            raise BackboneError(f"backbone {name}: text pooling {clip.text_pool_type!r} is not supported (argmax or eos)")
        if clip.attn_mask is None or not clip.transformer.batch_first:
            raise BackboneError(f"backbone {name}: NEARL-CLIP needs open_clip's causal, batch_first text transformer")
        self.clip = clip
        self.blocks = list(clip.transformer.resblocks)
        self.width = clip.transformer.width
        proj = clip.text_projection
        self.output_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        self.vocab_size = clip.vocab_size
        self.context_length = clip.context_length
        self.token_embedding = clip.token_embedding

    def prompts(self, tokens: torch.Tensor, trim: bool) -> PromptBatch:
        if self.clip.text_pool_type == "argmax":
            eot = tokens.argmax(dim=-1)
        else:
            eot = (tokens == self.clip.text_eos_id).int().argmax(dim=-1)
        n = int(eot.max()) + 1 if trim else tokens.shape[1]
        valid = torch.arange(n, device=tokens.device)[None, :] <= eot[:, None]
        return PromptBatch(tokens=tokens[:, :n], pool=eot, valid=valid)

    def embed(self, p: PromptBatch, dtype: torch.dtype, context=None) -> tuple[torch.Tensor, torch.Tensor]:
        clip, n = self.clip, p.tokens.shape[1]
        t = clip.token_embedding(p.tokens).to(dtype)
        if context is not None:
            t = context(t)
        return t + clip.positional_embedding[:n].to(dtype), clip.attn_mask[:n, :n].to(dtype)

    def repeat_mask(self, mask: torch.Tensor, times: int) -> torch.Tensor:
        return mask  # the causal mask is the same for every row

    def block(self, layer: int, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.blocks[layer](t, attn_mask=mask)

    def features(self, t: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        pooled = clip.ln_final(t[torch.arange(t.shape[0], device=t.device), pool])
        proj = clip.text_projection
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
