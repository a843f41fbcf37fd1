"""Evaluation preprocessing in NumPy + Pillow only (no PyTorch), shared by training, evaluation and the
onnxruntime runtime so that a served model sees exactly what the trained one saw.

It reproduces open_clip's evaluation transform (resize_mode "shortest"):
RGB -> resize the shorter side to `size` (bicubic) -> centre crop size x size -> [0, 1] -> (x - mean) / std.
Files and arrays become RGB through nearl_rt.core.imaging (DICOM, 16-bit images and the intensity policy).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from nearl_rt.core.imaging import Frame, ImageLike, IntensityPolicy, load_image

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def resize_crop_geometry(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where an image of width x height goes in preprocess_image: ((resized width, height), (left, top) of
    the size x size crop in the resized image)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return (new_w, new_h), (int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0)))


def preprocess_image(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: str = "bicubic") -> np.ndarray:
    """One RGB PIL image -> float32 [3, size, size], normalised."""
    (new_w, new_h), (left, top) = resize_crop_geometry(*img.size, size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), _INTERPOLATION[interpolation])
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def image_list(images) -> list:
    """One image (a path, Frame, PIL image or array) or an iterable of them -> a list of images."""
    if isinstance(images, (str, os.PathLike, np.ndarray, Frame, Image.Image)) or not hasattr(images, "__iter__"):
        return [images]
    return list(images)


def preprocess_batch(images: Iterable[ImageLike], size: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: str = "bicubic", intensity: Optional[IntensityPolicy] = None) -> np.ndarray:
    """Paths / Frames / PIL images / arrays -> float32 [B, 3, size, size] (nearl_rt.core.imaging.load_image). Each
    item of `images` is one image (a stacked uint8 array [B, H, W] is B images); image_list makes one image a list."""
    out = [preprocess_image(load_image(im, intensity), size, mean, std, interpolation) for im in images]
    if not out:
        raise ValueError("no images given")
    return np.stack(out)
