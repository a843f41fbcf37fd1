"""Deterministic K-shot sampling: K images per class for training, min(K, 4) per class for validation.

Multi-label data: K images *per finding positive* (as ChestX-ray14 few-shot work samples): finding by finding, in
the data's order, K images positive for it are drawn among the images not drawn yet, so the training set holds at
most K x F images, every finding has at least K positives, and its negatives are the other findings' images.
Validation likewise with min(K, 4)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from nearl_rt.data import DataError, Dataset


def _per_class_label(labels: np.ndarray, class_names: list, k: int, rng: np.random.Generator, where: str,
               exclude: Optional[set] = None) -> list:
    chosen = []
    for c, name in enumerate(class_names):
        pool = np.flatnonzero(labels == c)
        if exclude:
            pool = np.asarray([i for i in pool if i not in exclude], dtype=np.int64)
        if len(pool) == 0:
            raise DataError(f"class {name!r} has no images in {where}")
        if k > len(pool):
            raise DataError(f"--shots {k} is larger than class {name!r} has: {len(pool)} image(s) in {where}; "
                            f"use --shots {len(pool)} or fewer")
        chosen += sorted(rng.choice(pool, size=k, replace=False).tolist())
    return [int(i) for i in chosen]


def _per_finding(labels: np.ndarray, names: list, k: int, rng: np.random.Generator, where: str,
                 exclude: Optional[set] = None) -> list:
    taken = set(exclude or ())
    chosen = []
    for f, name in enumerate(names):
        positive = np.flatnonzero(labels[:, f] == 1)
        if len(positive) == 0:
            raise DataError(f"finding {name!r} has no positive images in {where}")
        pool = np.asarray([i for i in positive if i not in taken], dtype=np.int64)
        if k > len(pool):
            raise DataError(f"--shots {k} is larger than finding {name!r} has: {len(pool)} positive image(s) left "
                            f"in {where} (K per finding, drawn in turn); use --shots {len(pool)} or fewer")
        picked = sorted(rng.choice(pool, size=k, replace=False).tolist())
        taken.update(picked)
        chosen += picked
    return [int(i) for i in chosen]


def sample_shots(ds: Dataset, shots: int, seed: int) -> dict:
    """Pick the training and validation indices. Validation comes from the `val` split when there is one,
    otherwise from the training images not picked for training. Same (dataset, shots, seed) -> same indices."""
    if shots < 1:
        raise DataError(f"--shots must be >= 1, got {shots}")
    train_split = "train" if "train" in ds.splits else "all"
    train = ds.split(train_split)
    rng = np.random.default_rng(seed)
    draw = _per_finding if ds.multi_label else _per_class_label
    train_idx = draw(train.labels, ds.class_names, shots, rng, f"the {train_split} split of {ds.path}")
    val_k = min(shots, 4)
    if "val" in ds.splits:
        val_split = "val"
        val_idx = draw(ds.split("val").labels, ds.class_names, val_k, rng, f"the val split of {ds.path}")
    else:
        val_split = train_split
        val_idx = draw(train.labels, ds.class_names, val_k, rng,
                             f"the {train_split} split of {ds.path} (after taking the training shots)",
                             exclude=set(train_idx))
    return {"seed": seed, "shots": shots, "train_split": train_split, "train": train_idx,
            "val_split": val_split, "val": val_idx}


def balanced_subset(labels: np.ndarray, n: int) -> list:
    """A fixed class-balanced subset of at most n images: the first images of each class, taken in turn
    (class 0's first, class 1's first, ..., class 0's second, ...), returned in split order."""
    per_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    chosen = []
    for rank in range(max((len(p) for p in per_class), default=0)):
        chosen += [p[rank] for p in per_class if rank < len(p)]
        if len(chosen) >= n:
            break
    return sorted(chosen[:n])
