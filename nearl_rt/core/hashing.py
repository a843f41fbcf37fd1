"""sha256 of files (no PyTorch, no onnxruntime): checkpoints, backbones and exported models record it."""
from __future__ import annotations

import hashlib


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
