"""Class sets: the base-to-novel split (CoCoOp / BiomedCoOp) and datasets restricted to a class set.

Base-to-novel: the first ceil(C / 2) classes in the dataset's class order are the base classes, the rest
the novel ones (BiomedCoOp's `subsample_classes`), or `--base-classes` (and optionally
`--novel-classes`) name them. Training sees only base-class images; evaluation scores base-test images
among the base classes and novel-test images among the novel classes, and reports the harmonic mean.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from nearl_rt.data import DataError, Dataset, Split


def _unknown(names: Sequence[str], known: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in known]
    if missing:
        raise DataError(f"{what} {missing} not in the dataset's classes {list(known)}")


def split_base_novel(class_names: Sequence[str], base: Optional[Sequence[str]] = None,
                     novel: Optional[Sequence[str]] = None) -> tuple[list, list]:
    """(base, novel) class names: the first half (rounded up) and the rest, or the given ones."""
    names = list(class_names)
    if base is None:
        if novel is not None:
            raise DataError("--novel-classes needs --base-classes")
        m = math.ceil(len(names) / 2)
        base, novel = names[:m], names[m:]
    else:
        base = list(base)
        _unknown(base, names, "base class(es)")
        if novel is None:
            novel = [n for n in names if n not in base]
        else:
            novel = list(novel)
            _unknown(novel, names, "novel class(es)")
            both = [n for n in novel if n in base]
            if both:
                raise DataError(f"class(es) {both} are both base and novel classes; a novel class must be unseen "
                                f"in training (drop it from --base-classes or --novel-classes)")
    if len(base) < 2:
        raise DataError(f"base-to-novel needs at least 2 base classes to train on, got {base} from "
                        f"{len(names)} classes {names}")
    if not novel:
        raise DataError(f"base-to-novel needs at least 1 novel class; every class of {names} is a base class")
    return base, novel


def restrict(ds: Dataset, names: Sequence[str]) -> Dataset:
    """The images of classes `names` only, relabelled 0..len(names)-1 in that order."""
    names = list(names)
    _unknown(names, ds.class_names, "class(es)")
    new_label = np.full(len(ds.class_names), -1, dtype=np.int64)
    for i, n in enumerate(names):
        new_label[ds.class_names.index(n)] = i
    splits = {}
    for split_name, s in ds.splits.items():
        keep = np.flatnonzero(new_label[s.labels] >= 0)
        splits[split_name] = Split([s.sources[i] for i in keep], new_label[s.labels[keep]])
    return Dataset(ds.path, names, splits)


def dataset_for_classes(ds: Dataset, classes: Sequence[str], explicit: bool) -> Dataset:
    """The dataset whose labels index `classes`, the class set being scored.

    Images are matched to `classes` by class name (images of other classes are left out). A checkpoint's
    own classes (`explicit` False) whose names the dataset does not use are matched by label index
    when the counts agree (e.g. a MedMNIST file trained with --classes)."""
    classes = list(classes)
    if all(c in ds.class_names for c in classes):
        return ds if classes == ds.class_names else restrict(ds, classes)
    if not explicit and len(classes) == len(ds.class_names):
        return ds
    if explicit:
        _unknown(classes, ds.class_names, "--classes")
    raise DataError(f"{ds.path} has {len(ds.class_names)} classes {ds.class_names} but the checkpoint was trained "
                    f"on {len(classes)} {classes}; pass --classes with the names to score")
