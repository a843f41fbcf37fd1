"""Evaluation preprocessing in NumPy + Pillow only (no PyTorch), shared by training, evaluation and the
onnxruntime runtime so that a served model sees exactly what the trained one saw.

It reproduces open_clip's evaluation transform (resize_mode "shortest"):
RGB -> resize the shorter side to `size` (bicubic) -> centre crop size x size -> [0, 1] -> (x - mean) / std.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def load_image(src: ImageLike) -> Image.Image:
    """A path, PIL image or uint8 array ([H, W], [H, W, 1|3|4]) as an RGB PIL image."""
    if isinstance(src, (str, os.PathLike)):
        try:
            with Image.open(src) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {src}") from None
        except OSError as e:
            raise ValueError(f"cannot read image {src}: {e}") from None
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 [H, W] or [H, W, C], got dtype {src.dtype}; "
                             f"scale to 0..255 and use .astype(np.uint8)")
        if src.ndim == 3 and src.shape[2] == 1:
            src = src[:, :, 0]
        if src.ndim == 2 or (src.ndim == 3 and src.shape[2] in (3, 4)):
            return Image.fromarray(src).convert("RGB")
        raise ValueError(f"image arrays must be [H, W] or [H, W, 1|3|4] (channels last), got shape {src.shape}")
    raise TypeError(f"cannot use {type(src).__name__} as an image: pass a file path, PIL image or uint8 array")


def preprocess_image(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: str = "bicubic") -> np.ndarray:
    """One RGB PIL image -> float32 [3, size, size], normalised."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _INTERPOLATION[interpolation])
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(images: Iterable[ImageLike], size: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: str = "bicubic") -> np.ndarray:
    """Paths / PIL images / uint8 arrays -> float32 [B, 3, size, size]."""
    out = [preprocess_image(load_image(im), size, mean, std, interpolation) for im in images]
    if not out:
        raise ValueError("no images given")
    return np.stack(out)
