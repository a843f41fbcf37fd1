"""The few-shot draws of the Dassl / CoOp / BiomedCoOp code, next to our own sampler (nearl_rt.sampling).

Their datasets are a split JSON (`split_<Dataset>.json`, read by nearl_rt.data) plus, per K and seed,
`split_fewshot/shot_<K>-seed_<seed>.pkl`: a pickle of {"train": [Datum, ...], "val": [Datum, ...]}, each Datum
(dassl.data.datasets.base_dataset) holding the image path, label and class name. To reproduce the published
tables' shots, these selections are matched to the split JSON's train and val images by path.

The pickle is read without running it: a restricted unpickler resolves exactly one global, Dassl's Datum class,
to an inert record (its attributes only), and refuses a file that names any other class or function, so no
code from the file is ever called.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from nearl_rt.data import DataError, Dataset

DATUM = ("dassl.data.datasets.base_dataset", "Datum")


class _Record:
    """What a Datum becomes: its attributes, nothing callable."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a Datum's state is not a dict of attributes")
        self.__dict__.update(state)


class _SelectionUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == DATUM:
            return _Record
        raise pickle.UnpicklingError(f"it names {module}.{name}, not only Dassl's Datum")


def read_selection(path) -> dict:
    """{"train": [(impath, label), ...], "val": [...]} of a Dassl few-shot selection file; DataError (one line)
    for a missing file or anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"few-shot selection {path}: no such file (Dassl's split_fewshot/shot_<K>-seed_<seed>.pkl)")
    try:
        data = _SelectionUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - any failure to decode means the file is not a selection
        raise DataError(f"{path} is not a Dassl few-shot selection ({e.__class__.__name__}: {e})") from None
    if not (isinstance(data, dict) and isinstance(data.get("train"), list) and isinstance(data.get("val"), list)):
        raise DataError(f"{path} is not a Dassl few-shot selection (a dict with 'train' and 'val' lists of Datum)")
    out = {}
    for part in ("train", "val"):
        items = []
        for d in data[part]:
            impath, label = getattr(d, "_impath", None), getattr(d, "_label", None)
            if not (isinstance(d, _Record) and isinstance(impath, str) and impath and isinstance(label, int)):
                raise DataError(f"{path}: a {part} entry is not a Datum with an image path and an integer label")
            items.append((impath, label))
        out[part] = items
    return out


def _match(split, entries: list, path, part: str) -> list:
    """Indices of `split`'s images for the selection's entries: the split image whose path ends with the longest
    common trailing part of the entry's path (Dassl stores the path on the machine that drew the shots)."""
    by_suffix: dict = {}
    for i, src in enumerate(split.sources):
        parts = Path(str(src)).parts
        for n in range(1, len(parts) + 1):
            by_suffix.setdefault(parts[-n:], []).append(i)
    chosen = []
    for impath, label in entries:
        parts, found, hits = Path(impath).parts, None, None
        for n in range(len(parts), 0, -1):
            hits = by_suffix.get(parts[-n:])
            if hits:
                found = hits if len(hits) == 1 else None
                break
        if found is None:
            raise DataError(f"{path}: {part} image {impath} matches {'no' if not hits else 'several'} image(s) of the "
                            f"split JSON's {part} split; pass the dataset's own split JSON and --image-root")
        if int(split.labels[found[0]]) != label:
            raise DataError(f"{path}: {part} image {impath} has label {label} there, "
                            f"{int(split.labels[found[0]])} in the split JSON")
        chosen.append(found[0])
    return chosen


def shots_from_selection(ds: Dataset, path, shots: int, seed: int) -> dict:
    """sample_shots' record for a Dassl selection file: the same keys, K per class checked."""
    selection = read_selection(path)
    train_split = "train" if "train" in ds.splits else "all"
    val_split = "val" if "val" in ds.splits else train_split
    train_idx = _match(ds.split(train_split), selection["train"], path, train_split)
    val_idx = _match(ds.split(val_split), selection["val"], path, val_split)
    counts = [sum(1 for _, label in selection["train"] if label == c) for c in range(len(ds.class_names))]
    if any(c != shots for c in counts):
        raise DataError(f"{path} holds {counts} training images per class, not --shots {shots}")
    return {"seed": seed, "shots": shots, "train_split": train_split, "train": train_idx, "val_split": val_split,
            "val": val_idx, "selection_file": str(Path(path).resolve())}
