"""A Hugging Face BERT text tower inside open_clip's HFTextEncoder (BiomedCLIP's PubMedBERT).

Bidirectional: every layer masks the padding out of the keys, so trimming the prompts to the longest
real prompt stays exact (positions count from 0, right-trimming moves no real token). The mask is
additive float [rows, 1, 1, n] (0 / dtype min): BertLayer reads it correctly on transformers 4.x and
5.x, eager and SDPA (a bool mask is added as 1.0 by 5.x's eager attention). Pooling is the CLS
token's last hidden state (BERT is post-LN: no final norm), then open_clip's projection (`proj`).
"""
from __future__ import annotations

import torch
from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, HFTextEncoder

from nearl_rt.core.errors import BackboneError
from nearl_rt.towers import PromptBatch


def accepts(backbone) -> bool:
    return isinstance(getattr(backbone, "text", None), HFTextEncoder)


def tower(backbone, name: str) -> "BertText":
    return BertText(backbone.text, name)


class BertText:
    def __init__(self, encoder: HFTextEncoder, name: str):
        config, bert = encoder.config, encoder.transformer
        if config.model_type != "bert" or config.is_decoder:
            raise BackboneError(f"backbone {name}: Hugging Face text model {config.model_type!r} is not supported; "
                                f"NEARL-CLIP runs on BERT encoders (BiomedCLIP, QuiltNet-B-16-PMB)")
        cls_pooled = isinstance(encoder.pooler, ClsLastHiddenStatePooler) or (
            isinstance(encoder.pooler, ClsPooler) and getattr(bert, "pooler", None) is None)
        if not cls_pooled or encoder.pooler.cls_token_position != 0:
            raise BackboneError(f"backbone {name}: text pooling {type(encoder.pooler).__name__} is not supported; "
                                f"NEARL-CLIP reads the CLS token's last hidden state (cls_last_hidden_state_pooler)")
        self.encoder, self.bert = encoder, bert
        self.blocks = list(bert.encoder.layer)
        self.width = config.hidden_size
        self.output_dim = encoder.output_dim
        self.vocab_size = config.vocab_size
        self.context_length = config.max_position_embeddings
        self.pad_id = config.pad_token_id
        self.token_embedding = bert.embeddings.word_embeddings

    def prompts(self, tokens: torch.Tensor, trim: bool) -> PromptBatch:
        real = tokens != self.pad_id  # what HFTextEncoder.forward passes as attention_mask
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        n = int(torch.where(real, positions, -1).max()) + 1 if trim else tokens.shape[1]
        pool = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return PromptBatch(tokens=tokens[:, :n], pool=pool, valid=real[:, :n])

    def embed(self, p: PromptBatch, dtype: torch.dtype, context=None) -> tuple[torch.Tensor, torch.Tensor]:
        if context is None:
            t = self.bert.embeddings(input_ids=p.tokens)
        else:  # BertEmbeddings adds positions, token types and its LayerNorm to whatever word embeddings it gets
            t = self.bert.embeddings(inputs_embeds=context(self.token_embedding(p.tokens)))
        t = t.to(dtype)
        mask = torch.zeros(p.valid.shape, dtype=dtype, device=t.device).masked_fill(~p.valid, torch.finfo(dtype).min)
        return t, mask[:, None, None, :]

    def repeat_mask(self, mask: torch.Tensor, times: int) -> torch.Tensor:
        return mask.repeat(times, 1, 1, 1)

    def block(self, layer: int, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.blocks[layer](t, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out  # a tuple on transformers 4.x, a tensor on 5.x

    def features(self, t: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        return self.encoder.proj(t[torch.arange(t.shape[0], device=t.device), pool])
