"""CoOp (Zhou et al., IJCV 2022): learned context vectors in front of the class name, on the frozen backbone.

The prompt of class c is `[SOT] v_1 ... v_n <class c tokens> . [EOT]`: the embeddings of n placeholder
tokens after SOT are replaced by the learned vectors v (one set shared by all classes). The default
n = 4 starts from the embeddings of "a photo of a", so an untrained CoOp model scores exactly like the
zero-shot prompt "a photo of a {}.". The vectors live in `PromptContext`, attached to the model as
`model.prompt_context` (applied to the text tower's token embeddings); a checkpoint stores them in
`extra["coop_context"]`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nearl_rt.core.errors import NearlError

DEFAULT_CONTEXT = 4
INIT_TEXT = "a photo of a"


class PromptContext(nn.Module):
    """n learned context vectors [n, width] replacing the token embeddings at positions 1..n. Subclasses
    (nearl_rt.prompt_learners) add a training regulariser (`extra_loss`) or image-conditioned prompts
    (`conditional`: the classifier calls `classify(model, image_features)`)."""

    conditional = False

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        if vectors.dim() != 2 or vectors.shape[0] < 1:
            raise ValueError(f"context vectors must be [n >= 1, width], got {tuple(vectors.shape)}")
        self.ctx = nn.Parameter(vectors.detach().clone().float())

    @property
    def length(self) -> int:
        return self.ctx.shape[0]

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings [C, n_tokens, width] with positions 1..n replaced by the context."""
        n = self.length
        ctx = self.ctx.to(embeddings.dtype).unsqueeze(0).expand(embeddings.shape[0], -1, -1)
        return torch.cat([embeddings[:, :1], ctx, embeddings[:, 1 + n:]], dim=1)

    def extra_loss(self, model, images: torch.Tensor, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """A method's term added to the cross-entropy in training (None: CoOp has none)."""
        return None

    def checkpoint_entries(self) -> dict:
        """What a checkpoint's extra stores of the context."""
        return {"coop_context": self.ctx.detach().cpu().clone()}


def placeholder(n: int) -> str:
    """The words whose token embeddings the context replaces: "a photo of a" for n = 4, else n x "X"."""
    return INIT_TEXT if n == DEFAULT_CONTEXT else " ".join(["X"] * n)


def coop_template(n: int) -> str:
    return placeholder(n) + " {}."


def init_context(model, n: int = DEFAULT_CONTEXT, seed: int = 0) -> PromptContext:
    """The initial context for `model`'s text tower: "a photo of a"'s embeddings (n = 4) or N(0, 0.02²)."""
    if n < 1:
        raise NearlError(f"--coop-context must be >= 1, got {n}")
    embedding = model.text_tower.token_embedding.weight
    width = embedding.shape[1]
    if n == DEFAULT_CONTEXT:
        tokens = model.tokenize([INIT_TEXT])
        real = int(model.text_tower.prompts(tokens, trim=True).valid.sum())  # [SOT] words [EOT] (BERT: [CLS] .. [SEP])
        ids = tokens[0, 1:real - 1]
        if len(ids) != n:
            raise NearlError(f"{INIT_TEXT!r} is {len(ids)} tokens for this tokenizer, not {n}")
        with torch.no_grad():
            vectors = embedding[ids.to(embedding.device)]
    else:
        vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.02
    return PromptContext(vectors.cpu())


def attach_context(model, context: PromptContext) -> None:
    """Make `model` a CoOp model: its class prompts get the context; NEARL's adapters stay frozen at zero."""
    model.prompt_context = context.to(model.class_tokens.device)
    for p in model.adapter_parameters():
        p.requires_grad_(False)
