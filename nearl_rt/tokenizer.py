"""The backbone's own tokenizer, from local files only (nothing is downloaded).

`backbone` is one of:
- an open_clip model name: CLIP's tokenizer ships with open_clip. A Hugging Face text tower
  (BiomedCLIP's PubMedBERT) has its tokenizer in the model's download folder; given only the name,
  nearl-rt's generated test vocabulary stands in, with a RandomBackboneWarning (fine for random
  weights, meaningless with real ones);
- a model download folder (the tokenizer files in it, e.g. BiomedCLIP's vocab.txt);
- a model's BackboneIdentity (`model.tokenize` passes its own): the folder it was built from, else
  its name, without a second warning for a random-weight build.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Optional, Sequence, Union

import open_clip
import torch

from nearl_rt.backbone import TEST_VOCAB_DIR, BackboneIdentity, has_hf_text, model_config, read_download_folder
from nearl_rt.core.errors import RandomBackboneWarning

DEFAULT_BACKBONE = "ViT-B-16"


@lru_cache(maxsize=None)
def _tokenizer(name: Optional[str], folder: Optional[str]):
    if folder is not None:
        read_download_folder(folder)  # one clear error if the folder is not a model download
        return open_clip.get_tokenizer(f"local-dir:{folder}")
    cfg = model_config(name)
    if not has_hf_text(cfg):
        return open_clip.get_tokenizer(name)
    from open_clip.tokenizer import HFTokenizer
    text = cfg["text_cfg"]
    return HFTokenizer(os.fspath(TEST_VOCAB_DIR), context_length=text.get("context_length", 77),
                       **(text.get("tokenizer_kwargs") or {}))


def _source(backbone) -> tuple[Optional[str], Optional[str], bool]:
    """(model name, download folder, warn if a test vocabulary stands in)."""
    if isinstance(backbone, BackboneIdentity):
        if backbone.path and os.path.isdir(backbone.path):
            return None, os.path.abspath(backbone.path), False
        return backbone.name, None, False
    if not isinstance(backbone, (str, os.PathLike)):
        raise TypeError(f"backbone must be an open_clip model name, a download folder or a BackboneIdentity, "
                        f"got {type(backbone).__name__}")
    path = os.fspath(backbone)
    if os.path.isdir(path):
        return None, os.path.abspath(path), False
    return path, None, True


def tokenize(texts: Union[Sequence[str], str], backbone=DEFAULT_BACKBONE) -> torch.Tensor:
    """LongTensor [len(texts), context_length] of token ids for the backbone's text tower."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(s, str) for s in texts):
        raise ValueError("tokenize expects a non-empty list of strings")
    name, folder, warn = _source(backbone)
    if warn and has_hf_text(model_config(name)):
        warnings.warn(f"{name}'s own tokenizer comes with its download folder; without one, nearl-rt's generated "
                      f"test vocabulary stands in (right for random-weight backbones only). Pass backbone=DIR, "
                      f"the download folder", RandomBackboneWarning, stacklevel=2)
    return _tokenizer(name, folder)(texts)
