"""Labelled image data for training, evaluation and prediction.

Four sources, all read into the same `Dataset` (per split: image sources + labels + class names):
- an image-folder tree: ROOT/<class>/<image> (one split, "all"), or ROOT/<split>/<class>/<image>
  for splits named train / val / test;
- a BiomedCoOp-style split JSON: {"train": [[relpath, label, classname], ...], "val": [...], "test": [...]},
  paths relative to --image-root (default: the JSON's folder);
- a MedMNIST .npz: `<split>_images` (uint8 [N, H, W] or [N, H, W, 3]) and `<split>_labels` ([N] or [N, 1]);
  `[N, F]` 0/1 labels (ChestMNIST's layout) make it multi-label, F findings;
- a CSV manifest (multi-label): `path[,split],<finding 1>,<finding 2>,...`, one row per image, 1 / 0 / blank
  (unknown) / -1 (uncertain, CheXpert's code: --uncertain ignore|zeros|ones) per finding.

Multi-label data (`Dataset.multi_label`) has labels int64 [N, F] with 1 = present, 0 = absent, -1 = unknown
(UNKNOWN: masked out of the loss and the metrics); its `class_names` are the finding names. Single-label data has
labels int64 [N] (class indices). Detection is automatic (the labels' shape; a .csv is always multi-label);
`multi_label=True` (--multi-label) also reads an [N, 1] .npz as one finding and refuses single-label sources.

Any of them may hold DICOM files and 16-bit / float images (nearl_rt.core.imaging decodes them, mapping more
than 8 bits to 0..255 by the run's intensity policy); a multi-frame file is refused unless
`frames="each"` makes each frame an image (`Frame`). Images are decoded lazily (`load_images`) to RGB;
preprocessing is the backbone's own (nearl_rt.core.preprocess), with random-resized-crop augmentation for
training (flips off by default: they change anatomy).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from nearl_rt.core.imaging import (DEFAULT_POLICY, FRAME_OPTIONS, VOI_OPTIONS, Frame, ImageError, IntensityPolicy,
                            expand_frames, has_dicom_preamble, load_image, resolve_policy)
from nearl_rt.core.preprocess import preprocess_image
from nearl_rt.core.errors import ClassNamesWarning, NearlError

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom")
# MedMNIST class names (medmnist INFO), keyed by the file name's prefix.
MEDMNIST_CLASSES = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal or benign"],
    "retinamnist": ["no retinopathy", "mild retinopathy", "moderate retinopathy", "severe retinopathy",
                    "proliferative retinopathy"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural thickening", "hernia"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"],
}

Source = Union[str, Frame, np.ndarray]  # a file path, one frame of a multi-frame file, or an image array
UNKNOWN = -1  # a multi-label entry whose finding is not known: masked out of the loss and the metrics
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")  # what a CSV's -1 (uncertain) becomes: unknown, 0 or 1
MULTI_LABEL_SOURCES = "a MedMNIST-style .npz with [N, F] 0/1 labels or a CSV manifest (path,<finding>,...)"


class DataError(NearlError):
    """A dataset is empty, inconsistent, or holds a file that is not a readable image."""


@dataclass
class Split:
    sources: list            # per image: a path (str), a Frame or an image array
    labels: np.ndarray       # int64 [N] (class indices), or [N, F] multi-label (1 / 0 / UNKNOWN)

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        src = self.sources[i]
        return src if isinstance(src, str) else str(src) if isinstance(src, Frame) else f"image #{i}"

    def subset(self, idx: Sequence[int]) -> "Split":
        return Split([self.sources[i] for i in idx], self.labels[np.asarray(idx, dtype=np.int64)])


@dataclass
class Dataset:
    path: str
    class_names: list
    splits: dict             # split name -> Split
    named: bool = True       # False: the data did not name its classes ("class 0", "class 1", ... stand in)
    multi_label: bool = False  # labels [N, F]: several findings per image (class_names are the findings)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(f"{self.path} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


def read_dataset(path, image_root=None, classes: Optional[Sequence[str]] = None, frames: str = "refuse", *,
                 names_matter: bool = True, multi_label: Optional[bool] = None, uncertain: str = "ignore") -> Dataset:
    """Read a folder tree, split JSON, .npz or .csv manifest (chosen by what `path` is) and check its labels.
    frames="each": every frame of a multi-frame file (DICOM, TIFF) becomes an image with the file's label.
    names_matter: warn (ClassNamesWarning) when the data does not name its classes and `classes` does not either
    (off where only the images are used). multi_label: None detects it from the data; True demands it (an [N, 1]
    .npz becomes one finding); False refuses multi-label data. uncertain: what a CSV's -1 becomes (ignore =
    unknown, zeros, ones). Multi-label data: `classes` names the .npz's columns in order, or picks the CSV's."""
    if frames not in FRAME_OPTIONS:
        raise DataError(f"frames={frames!r}: use one of {FRAME_OPTIONS}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"--uncertain {uncertain!r}: use one of {', '.join(UNCERTAIN_POLICIES)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    if multi_label and (path.is_dir() or path.suffix == ".json"):
        raise DataError(f"{path}: an image folder or split JSON gives each image one class, so it cannot hold "
                        f"multi-label findings; use {MULTI_LABEL_SOURCES}")
    if path.is_dir():
        ds = _read_folder(path)
    elif path.suffix == ".json":
        ds = _read_split_json(path, Path(image_root) if image_root else path.parent)
    elif path.suffix == ".npz":
        ds = _read_npz(path, bool(multi_label))
    elif path.suffix == ".csv":
        ds = _read_manifest(path, Path(image_root) if image_root else path.parent, uncertain)
    else:
        raise DataError(f"{path}: unknown dataset kind; pass an image folder, a split .json, a MedMNIST .npz or a "
                        f"multi-label .csv manifest")
    if multi_label is False and ds.multi_label:
        raise DataError(f"{path} holds multi-label findings {ds.class_names}; this tool reads single-label data")
    if classes is not None and ds.multi_label:
        _name_findings(ds, list(classes))
    elif classes is not None:
        ds.class_names, ds.named = list(classes), True
    elif not ds.named and names_matter:
        warnings.warn(f"{path} does not say which MedMNIST dataset it is (its file name does not start with one of "
                      f"{', '.join(sorted(MEDMNIST_CLASSES))}), so its classes are named {ds.class_names} and the "
                      f"prompts read e.g. 'a medical image showing {ds.class_names[0]}.': the text tower cannot tell "
                      f"the classes apart by name. Name them in label order: --data-classes a,b (train, sweep, evaluate)", ClassNamesWarning, stacklevel=2)
    if frames == "each":
        ds.splits = {name: _expand_frames(s) for name, s in ds.splits.items()}
    _check_labels(ds)
    return ds


def _expand_frames(split: Split) -> Split:
    sources, origin = expand_frames(split.sources)
    return Split(sources, split.labels[np.asarray(origin, dtype=np.int64)])


def _name_findings(ds: Dataset, names: list) -> None:
    """--classes on multi-label data: the names of an unnamed .npz's columns, in order; otherwise the findings to
    keep (columns picked by name)."""
    width = len(ds.class_names)
    if not ds.named:
        if len(names) != width:
            raise DataError(f"{ds.path} has {width} findings per image; --classes names {len(names)}: {names}")
        ds.class_names, ds.named = names, True
        return
    missing = [n for n in names if n not in ds.class_names]
    if missing:
        raise DataError(f"finding(s) {missing} are not in {ds.path}; it has {ds.class_names}")
    cols = np.asarray([ds.class_names.index(n) for n in names], dtype=np.int64)
    ds.splits = {k: Split(s.sources, s.labels[:, cols]) for k, s in ds.splits.items()}
    ds.class_names = names


def _check_labels(ds: Dataset) -> None:
    if not any(len(s) for s in ds.splits.values()):
        raise DataError(f"{ds.path} holds no images (empty dataset)")
    if ds.multi_label:
        _check_findings(ds)
        return
    n = len(ds.class_names)
    for name, s in ds.splits.items():
        bad = np.flatnonzero((s.labels < 0) | (s.labels >= n))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{ds.path}: label {int(s.labels[i])} of {s.describe(i)} ({name} split) is out of range "
                            f"for {n} classes {ds.class_names}; fix the label or pass --classes with all class names")


def _check_findings(ds: Dataset) -> None:
    """Multi-label labels are 1 / 0 / UNKNOWN, one column per finding, and every finding is known somewhere."""
    width = len(ds.class_names)
    known = np.zeros(width, dtype=bool)
    for name, s in ds.splits.items():
        if s.labels.ndim != 2 or s.labels.shape[1] != width:
            raise DataError(f"{ds.path}: the {name} labels have shape {s.labels.shape}; expected [N, {width}] for "
                            f"findings {ds.class_names}")
        bad = np.argwhere(~np.isin(s.labels, (0, 1, UNKNOWN)))
        if bad.size:
            i, f = (int(v) for v in bad[0])
            raise DataError(f"{ds.path}: finding {ds.class_names[f]!r} of {s.describe(i)} ({name} split) is "
                            f"{int(s.labels[i, f])}; multi-label values are 1, 0 or unknown")
        known |= (s.labels != UNKNOWN).any(axis=0)
    if not known.all():
        raise DataError(f"{ds.path}: finding(s) {[ds.class_names[f] for f in np.flatnonzero(~known)]} are unknown "
                        f"for every image; drop them (--classes lists the findings to keep) or label some images")


def _list_images(folder: Path) -> list:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _read_folder(root: Path) -> Dataset:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name in SPLITS]
    if split_dirs and len(split_dirs) != len(subdirs):
        raise DataError(f"{root} mixes split folders {[p.name for p in split_dirs]} with class folders "
                        f"{[p.name for p in subdirs if p.name not in SPLITS]}; use one layout")
    trees = {p.name: p for p in split_dirs} if split_dirs else {"all": root}
    class_names = sorted({c.name for t in trees.values() for c in t.iterdir() if c.is_dir() and not c.name.startswith(".")})
    if not class_names:
        raise DataError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>, empty dataset)")
    splits = {}
    for split, tree in trees.items():
        sources, labels = [], []
        for label, cname in enumerate(class_names):
            files = _list_images(tree / cname) if (tree / cname).is_dir() else []
            if not files and split in ("all", "train"):
                raise DataError(f"class {cname!r} has no images (folder {tree / cname} is empty or missing)")
            sources += files
            labels += [label] * len(files)
        splits[split] = Split(sources, np.asarray(labels, dtype=np.int64))
    return Dataset(str(root), class_names, splits)


def _read_split_json(path: Path, image_root: Path) -> Dataset:
    try:
        spec = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict) or not any(k in spec for k in SPLITS):
        raise DataError(f"{path} must be an object with 'train' / 'val' / 'test' lists of [relpath, label, classname]")
    names: dict = {}
    splits = {}
    for split in (k for k in SPLITS if k in spec):
        sources, labels, missing = [], [], []
        for entry in spec[split]:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[1], int)):
                raise DataError(f"{path}: {split} entry {entry!r} is not [relpath, integer label, classname]")
            rel, label, cname = entry
            if names.setdefault(label, cname) != cname:
                raise DataError(f"{path}: label {label} is named both {names[label]!r} and {cname!r}")
            full = image_root / rel
            if not full.is_file():
                missing.append(str(full))
            sources.append(str(full))
            labels.append(label)
        if missing:
            raise DataError(f"{path}: {len(missing)} {split} image(s) not found, first {missing[0]}; "
                            f"check --image-root (now {image_root})")
        splits[split] = Split(sources, np.asarray(labels, dtype=np.int64))
    top = max(names) if names else -1
    class_names = [names.get(i, f"class {i}") for i in range(top + 1)]
    return Dataset(str(path), class_names, splits)


def _manifest_value(text: str, uncertain: str) -> Optional[int]:
    """A CSV manifest cell -> 1 / 0 / UNKNOWN (blank; -1 under --uncertain ignore); None when it is not a label."""
    text = text.strip()
    if text == "":
        return UNKNOWN
    try:
        value = float(text)
    except ValueError:
        return None
    if value == -1.0:
        return {"ignore": UNKNOWN, "zeros": 0, "ones": 1}[uncertain]
    return int(value) if value in (0.0, 1.0) else None


def _read_manifest(path: Path, image_root: Path, uncertain: str) -> Dataset:
    """A multi-label CSV manifest: header `path[,split],<finding>...`; rows without a split column (or with an empty
    one) go to the "all" split."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not rows or not rows[0] or rows[0][0].strip() != "path":
        raise DataError(f"{path}: a manifest's first line is the header path[,split],<finding 1>,<finding 2>,...")
    header = [h.strip() for h in rows[0]]
    has_split = len(header) > 1 and header[1] == "split"
    findings = header[2 if has_split else 1:]
    if not findings or not all(findings) or len(set(findings)) != len(findings):
        raise DataError(f"{path}: the header must name one or more unique findings after path[,split], got {findings}")
    per_split: dict = {}
    missing = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path} line {line}: {len(row)} values for {len(header)} columns {header}")
        split = row[1].strip() if has_split else ""
        if split and split not in SPLITS:
            raise DataError(f"{path} line {line}: split {split!r} is not one of {SPLITS} (or blank)")
        labels = []
        for name, cell in zip(findings, row[len(header) - len(findings):]):
            value = _manifest_value(cell, uncertain)
            if value is None:
                raise DataError(f"{path} line {line}: finding {name!r} is {cell!r}; use 1, 0, blank (unknown) or -1 "
                                f"(uncertain: --uncertain ignore|zeros|ones)")
            labels.append(value)
        full = image_root / row[0].strip()
        if not full.is_file():
            missing.append(str(full))
        sources, rows_labels = per_split.setdefault(split or "all", ([], []))
        sources.append(str(full))
        rows_labels.append(labels)
    if missing:
        raise DataError(f"{path}: {len(missing)} image(s) not found, first {missing[0]}; check --image-root "
                        f"(now {image_root})")
    splits = {k: Split(src, np.asarray(lab, dtype=np.int64).reshape(len(src), len(findings)))
              for k, (src, lab) in per_split.items()}
    if "all" in splits and len(splits) > 1:
        raise DataError(f"{path}: some rows have a split and some do not; give every row train, val or test")
    return Dataset(str(path), findings, splits, multi_label=True)


def _read_npz(path: Path, multi_label: bool = False) -> Dataset:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    splits = {}
    for split in SPLITS:
        if f"{split}_images" not in data.files:
            continue
        images, labels = data[f"{split}_images"], data[f"{split}_labels"] if f"{split}_labels" in data.files else None
        if labels is None:
            raise DataError(f"{path} has {split}_images but no {split}_labels")
        if labels.ndim == 2 and labels.shape[1] == 1 and not multi_label:
            labels = labels[:, 0]
        if labels.ndim not in (1, 2) or len(labels) != len(images):
            raise DataError(f"{path}: {split}_labels has shape {labels.shape}; expected [{len(images)}] or "
                            f"[{len(images)}, 1] (single-label) or [{len(images)}, F] (F findings, multi-label)")
        if labels.ndim == 1 and multi_label:
            raise DataError(f"{path}: {split}_labels [{len(labels)}] holds one class per image, not findings; "
                            f"multi-label data is {MULTI_LABEL_SOURCES}")
        if images.dtype.kind not in "uif" or images.ndim not in (3, 4):
            raise DataError(f"{path}: {split}_images must be [N, H, W] or [N, H, W, 3] of uint8 (or uint16 / float: "
                            f"mapped by the intensity policy), got {images.dtype} {images.shape}")
        if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):  # NaN fails too
            bad = labels[labels != np.round(labels)].flat[0]
            raise DataError(f"{path}: {split}_labels holds non-integer values (e.g. {float(bad):g}); labels are class indices "
                            f"(single-label) or 1 / 0 / -1 = unknown (multi-label): round or threshold them yourself")
        splits[split] = Split(list(images), labels.astype(np.int64))
    if not splits:
        raise DataError(f"{path} has no train_images / val_images / test_images arrays (not a MedMNIST file)")
    prefix = path.stem.split("_")[0].lower()
    widths = {s.labels.shape[1] if s.labels.ndim == 2 else 0 for s in splits.values()}
    if len(widths) > 1:
        raise DataError(f"{path}: its splits' labels disagree in shape ({sorted(widths)} findings; 0: one class)")
    width = widths.pop()
    if width:
        names = MEDMNIST_CLASSES.get(prefix)
        named = names is not None and len(names) == width
        return Dataset(str(path), list(names) if named else [f"finding {i}" for i in range(width)], splits,
                       named=named, multi_label=True)
    top = max((int(s.labels.max()) for s in splits.values() if len(s)), default=0)
    if prefix in MEDMNIST_CLASSES:
        return Dataset(str(path), list(MEDMNIST_CLASSES[prefix]), splits)
    return Dataset(str(path), [f"class {i}" for i in range(top + 1)], splits, named=False)


def finding_columns(ds: Dataset, findings: Sequence[str]) -> Dataset:
    """Multi-label data with its label columns in the order of a model's `findings` (picked by name; an .npz that
    does not name its findings is taken to hold the model's, in its order)."""
    if not ds.multi_label:
        raise DataError(f"the model scores findings {list(findings)} (multi-label); {ds.path} is single-label")
    names = ds.class_names if ds.named else list(findings)
    if not ds.named and len(names) != len(ds.class_names):
        raise DataError(f"{ds.path} has {len(ds.class_names)} unnamed findings; the model has {len(names)}: {names}")
    missing = [f for f in findings if f not in names]
    if missing:
        raise DataError(f"the model's finding(s) {missing} are not in {ds.path} (it has {names}); name the data's "
                        f"columns with --data-classes")
    cols = np.asarray([names.index(f) for f in findings], dtype=np.int64)
    return Dataset(ds.path, list(findings), {k: Split(s.sources, s.labels[:, cols]) for k, s in ds.splits.items()},
                   multi_label=True)


def load_images(split: Split, skip_bad: bool = False,
                intensity: Optional[IntensityPolicy] = None) -> tuple[list, np.ndarray, list]:
    """Decode a split's images to RGB PIL images (nearl_rt.core.imaging, by the intensity policy). A file that is
    not a readable image raises DataError naming it, or with skip_bad is left out. Returns (images, kept
    indices, skipped), skipped = [{"image": name, "reason": short category, "error": message}, ...]."""
    images, kept, skipped = [], [], []
    for i, src in enumerate(split.sources):
        try:
            images.append(load_image(src, intensity))
            kept.append(i)
        except (ValueError, FileNotFoundError) as e:
            if not skip_bad:
                raise DataError(f"{e}; fix or remove the file, or pass --skip-bad-images to skip it") from None
            reason = e.reason if isinstance(e, ImageError) else (
                "not found" if isinstance(e, FileNotFoundError) else "unreadable")
            skipped.append({"image": split.describe(i), "reason": reason, "error": str(e)})
    return images, np.asarray(kept, dtype=np.int64), skipped


def skip_summary(skipped: list) -> str:
    """'skipped 3 unreadable image(s) (2 no pixel data, 1 multi-frame), first <its error>'."""
    counts: dict = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"skipped {len(skipped)} unreadable image(s) ({reasons}), first {skipped[0]['error']}"


class Preprocess:
    """The backbone's evaluation preprocessing, plus random-resized-crop augmentation for training."""

    def __init__(self, cfg: dict, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = False,
                 intensity: IntensityPolicy = DEFAULT_POLICY):
        self.intensity = intensity  # how files become the RGB images below (load_images)
        size = cfg["size"]
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean, self.std = cfg["mean"], cfg["std"]
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.scale, self.ratio, self.hflip = scale, ratio, hflip

    def eval(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([preprocess_image(im, self.size, self.mean, self.std, self.interpolation)
                                          for im in images]))

    def augment(self, images: Sequence[Image.Image], seeds: Sequence[int]) -> torch.Tensor:
        """Random resized crop (and optional horizontal flip); image i draws from its own RNG seeded
        with seeds[i], so the result does not depend on how a batch is split across processes."""
        out = []
        for im, seed in zip(images, seeds):
            generator = torch.Generator().manual_seed(int(seed))
            left, top, w, h = self._crop_box(im.size, generator)
            crop = im.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BICUBIC)
            if self.hflip and torch.rand(1, generator=generator).item() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(preprocess_image(crop, self.size, self.mean, self.std, self.interpolation))
        return torch.from_numpy(np.stack(out))

    def _crop_box(self, size, generator):
        width, height = size
        area = width * height
        for _ in range(10):
            u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
            aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                pos = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
                return int(pos[0] * (width - w + 1)), int(pos[1] * (height - h + 1)), w, h
        return 0, 0, width, height


def parse_classes(text: Optional[str]) -> Optional[list]:
    """`--classes "normal,pneumonia"` -> ['normal', 'pneumonia']; a `.txt` class-name file -> one name per
    line in label order (blank lines and `#` comments skipped)."""
    if text is None:
        return None
    if text.endswith(".txt"):
        path = Path(text)
        if not path.is_file():
            raise DataError(f"class-name file not found: {path}")
        names = [line.strip() for line in path.read_text().splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        if not names or len(set(names)) != len(names):
            raise DataError(f"{path} must list unique class names, one per line in label order")
        return names
    names = [c.strip() for c in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise DataError(f"--classes {text!r} must be comma-separated, non-empty, unique class names")
    return names


def is_image_file(path: os.PathLike) -> bool:
    """By extension, or a DICOM file without one (as PACS exports often are)."""
    suffix = Path(path).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or (suffix not in (".json", ".npz", ".txt", ".csv") and has_dicom_preamble(path))


def add_image_arguments(p: argparse.ArgumentParser, training: bool) -> None:
    """--intensity / --dicom-voi / --frames, shared by train, evaluate and predict."""
    trained = "" if training else " (default: the checkpoint's; another one warns)"
    p.add_argument("--intensity", default="minmax" if training else None, metavar="POLICY",
                   help="how >8-bit images (16-bit PNG/TIFF, DICOM, float) map to 0..255: minmax (each image's "
                        "range, default), percentile:LO,HI, full (the type's range) or window:CENTER,WIDTH" + trained)
    p.add_argument("--dicom-voi", default="file" if training else None, choices=VOI_OPTIONS,
                   help="file: a DICOM's own VOI LUT / window when it has one (default); policy: always --intensity"
                        + trained)
    p.add_argument("--frames", default="refuse", choices=FRAME_OPTIONS,
                   help="multi-frame DICOM / TIFF: refuse (default) or read each frame as an image")


def add_label_arguments(p: argparse.ArgumentParser) -> None:
    """--multi-label / --uncertain: how multi-label data is read (train, evaluate, sweep, calibrate)."""
    p.add_argument("--multi-label", action="store_true",
                   help="the data is multi-label (detected anyway from [N, F] .npz labels or a .csv manifest; this "
                        "also reads an [N, 1] .npz as one finding and refuses folders)")
    p.add_argument("--uncertain", default="ignore", choices=UNCERTAIN_POLICIES,
                   help="a manifest's -1 (uncertain, CheXpert): ignore = unknown, masked (default), zeros, ones")


def dataset_from_args(args, classes: Optional[str]) -> Dataset:
    """read_dataset with the data options of a tool (--data, --image-root, --frames, the label arguments)."""
    return read_dataset(args.data, args.image_root, parse_classes(classes), frames=args.frames,
                        multi_label=True if getattr(args, "multi_label", False) else None,
                        uncertain=getattr(args, "uncertain", "ignore"))


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every tool that runs a stored model over images (evaluate, predict, calibrate): batch size,
    bad images, the image options, where the backbone is, the backend and the device."""
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) unreadable images")
    add_image_arguments(p, training=False)
    p.add_argument("--pretrained", help="the backbone weights file or download folder, if it moved since training")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--device", default="auto")


def intensity_from_args(args, stored: Optional[dict] = None, where: Optional[str] = None) -> IntensityPolicy:
    """Training (where=None): the policy --intensity / --dicom-voi ask for. Evaluate / predict: the
    checkpoint `where`'s `stored` policy, each option given replacing its part (warns when that differs)."""
    try:
        if where is None:
            return IntensityPolicy.parse(args.intensity, args.dicom_voi)
        trained = resolve_policy(stored, None, where)
        voi = args.dicom_voi or trained.dicom_voi
        wanted = IntensityPolicy.parse(args.intensity, voi) if args.intensity else replace(trained, dicom_voi=voi)
    except ValueError as e:
        raise DataError(f"--intensity {args.intensity} / --dicom-voi {args.dicom_voi}: {e}") from None
    return resolve_policy(stored, wanted, where)
