"""The backbone's own tokenizer (open_clip's, loaded from the package: no download)."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import open_clip
import torch

from nearl_rt.backbone import register_model_configs

DEFAULT_BACKBONE = "ViT-B-16"


@lru_cache(maxsize=None)
def _tokenizer(backbone: str):
    register_model_configs()
    return open_clip.get_tokenizer(backbone)


def tokenize(texts: Sequence[str] | str, backbone: str = DEFAULT_BACKBONE) -> torch.Tensor:
    """LongTensor [len(texts), context_length] of token ids for the backbone's text tower."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(s, str) for s in texts):
        raise ValueError("tokenize expects a non-empty list of strings")
    return _tokenizer(backbone)(texts)
