"""Data readers (folder tree, split JSON, npz), K-shot sampling, image decoding and preprocessing."""
import json

import numpy as np
import pytest
from PIL import Image

from nearl_rt.core.preprocess import preprocess_batch
from nearl_rt.data import DataError, Preprocess, Split, load_images, parse_classes, read_dataset
from nearl_rt.sampling import balanced_subset, sample_shots

CFG = {"size": (32, 32), "mean": (0.48, 0.45, 0.40), "std": (0.26, 0.26, 0.27), "interpolation": "bicubic"}


def write_png(path, seed, size=(21, 17), mode="L"):
    rng = np.random.default_rng(seed)
    shape = size[::-1] if mode == "L" else (*size[::-1], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def make_tree(root, counts, split=None):
    base = root / split if split else root
    for c, n in counts.items():
        for i in range(n):
            write_png(base / c / f"img{i:02d}.png", hash((c, i, split)) % 1000)
    return root


def test_folder_tree_single_split(tmp_path):
    make_tree(tmp_path, {"pneumonia": 3, "normal": 5})
    ds = read_dataset(tmp_path)
    assert ds.class_names == ["normal", "pneumonia"] and list(ds.splits) == ["all"]
    s = ds.split("all")
    assert len(s) == 8 and s.labels.tolist() == [0] * 5 + [1] * 3
    assert all(f"/{ds.class_names[lab]}/" in src for src, lab in zip(s.sources, s.labels))


def test_folder_tree_with_splits(tmp_path):
    make_tree(tmp_path, {"a": 4, "b": 4}, "train")
    make_tree(tmp_path, {"a": 1, "b": 2}, "test")
    ds = read_dataset(tmp_path)
    assert sorted(ds.splits) == ["test", "train"]
    assert ds.split("test").labels.tolist() == [0, 1, 1]
    with pytest.raises(DataError, match="has no split 'val'"):
        ds.split("val")


def test_split_json(tmp_path):
    for rel in ("x/1.png", "x/2.png", "y/3.png", "y/4.png"):
        write_png(tmp_path / "imgs" / rel, len(rel))
    spec = {"train": [["x/1.png", 0, "normal"], ["y/3.png", 1, "tumour"]],
            "test": [["x/2.png", 0, "normal"], ["y/4.png", 1, "tumour"]]}
    (tmp_path / "split.json").write_text(json.dumps(spec))
    ds = read_dataset(tmp_path / "split.json", image_root=tmp_path / "imgs")
    assert ds.class_names == ["normal", "tumour"]
    assert ds.split("test").sources == [str(tmp_path / "imgs/x/2.png"), str(tmp_path / "imgs/y/4.png")]
    assert ds.split("train").labels.tolist() == [0, 1]


def test_split_json_missing_path_is_named(tmp_path):
    write_png(tmp_path / "a.png", 0)
    (tmp_path / "s.json").write_text(json.dumps({"train": [["a.png", 0, "n"], ["gone.png", 1, "p"]]}))
    with pytest.raises(DataError, match=r"1 train image\(s\) not found, first .*gone\.png"):
        read_dataset(tmp_path / "s.json")


def test_npz_reader_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 256, (n, 9, 11), dtype=np.uint8) for s, n in (("train", 6), ("test", 3))}
    arrays |= {"train_labels": np.array([[0], [1], [2], [0], [1], [2]], np.uint8), "test_labels": np.array([2, 0, 1])}
    np.savez(tmp_path / "organmnist_28.npz", **arrays)
    ds = read_dataset(tmp_path / "organmnist_28.npz")
    assert ds.class_names == ["class 0", "class 1", "class 2"]
    assert ds.split("train").labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert np.array_equal(ds.split("test").sources[1], arrays["test_images"][1])
    ds = read_dataset(tmp_path / "organmnist_28.npz", classes=parse_classes("liver, lung ,heart"))
    assert ds.class_names == ["liver", "lung", "heart"]
    with pytest.raises(DataError, match=r"label 2 of image #2 \(train split\) is out of range for 2 classes"):
        read_dataset(tmp_path / "organmnist_28.npz", classes=["a", "b"])


def test_real_npz_uses_medmnist_names(pneumonia_npz):
    ds = read_dataset(pneumonia_npz)
    assert ds.class_names == ["normal", "pneumonia"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 2428, "val": 270, "test": 468}


@pytest.mark.parametrize("make, match", [
    (lambda p: p.mkdir(), "no class sub-folders"),
    (lambda p: (make_tree(p, {"a": 2}), (p / "b").mkdir()), "class 'b' has no images"),
])
def test_empty_dataset_and_empty_class(tmp_path, make, match):
    make(tmp_path / "d")
    with pytest.raises(DataError, match=match):
        read_dataset(tmp_path / "d")


def _labels_ds(tmp_path, labels, val=None):
    arrays = {"train_images": np.zeros((len(labels), 4, 4), np.uint8), "train_labels": np.asarray(labels)}
    if val is not None:
        arrays |= {"val_images": np.zeros((len(val), 4, 4), np.uint8), "val_labels": np.asarray(val)}
    np.savez(tmp_path / "x.npz", **arrays)
    return read_dataset(tmp_path / "x.npz")


def test_k_shot_is_deterministic_and_balanced(tmp_path):
    rng = np.random.default_rng(1)
    ds = _labels_ds(tmp_path, rng.integers(0, 3, 90))
    a, b, c = sample_shots(ds, 5, seed=3), sample_shots(ds, 5, seed=3), sample_shots(ds, 5, seed=4)
    assert a == b and a["train"] != c["train"]
    labels = ds.split("train").labels
    assert np.bincount(labels[a["train"]]).tolist() == [5, 5, 5]
    assert np.bincount(labels[a["val"]]).tolist() == [4, 4, 4]          # min(K, 4) per class
    assert not set(a["train"]) & set(a["val"])                          # no val split: disjoint from train
    assert sample_shots(ds, 2, seed=0)["val"] and np.bincount(labels[sample_shots(ds, 2, 0)["val"]]).tolist() == [2, 2, 2]


def test_k_shot_validation_from_val_split(tmp_path):
    ds = _labels_ds(tmp_path, [0, 1] * 10, val=[1, 0] * 5)
    s = sample_shots(ds, 3, seed=0)
    assert s["val_split"] == "val" and np.bincount(ds.split("val").labels[s["val"]]).tolist() == [3, 3]


def test_k_larger_than_a_class_says_how_many(tmp_path):
    ds = _labels_ds(tmp_path, [0] * 10 + [1] * 3)
    with pytest.raises(DataError, match=r"--shots 4 is larger than class 'class 1' has: 3 image\(s\)"):
        sample_shots(ds, 4, seed=0)


def test_class_without_images(tmp_path):
    ds = _labels_ds(tmp_path, [0, 0, 2, 2])
    with pytest.raises(DataError, match="class 'class 1' has no images"):
        sample_shots(ds, 1, seed=0)


def test_corrupt_image_is_named_or_skipped(tmp_path):
    make_tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    split = read_dataset(tmp_path).split("all")
    with pytest.raises(DataError, match=r"cannot read image .*notes\.txt.*--skip-bad-images"):
        load_images(split)
    images, kept, skipped = load_images(split, skip_bad=True)
    assert len(images) == 4 and [(s["image"], s["reason"]) for s in skipped] == [(str(tmp_path / "b" / "notes.txt"),
                                                                                   "not an image")]
    assert "cannot read image" in skipped[0]["error"]
    assert [split.sources[i] for i in kept] == [s for s in split.sources if s.endswith(".png")]


def test_eval_preprocessing_is_export_preprocess(tmp_path):
    paths = [write_png(tmp_path / f"{i}.png", i, size=(23 + i, 19)) for i in range(3)]
    images, _, _ = load_images(Split([str(p) for p in paths], np.zeros(3, np.int64)))
    ours = Preprocess(CFG).eval(images).numpy()
    assert np.array_equal(ours, preprocess_batch(paths, 32, CFG["mean"], CFG["std"]))
    assert ours.shape == (3, 3, 32, 32)


def test_augmentation_is_reproducible_per_image(tmp_path):
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).convert("RGB") for _ in range(4)]
    pre = Preprocess(CFG)
    full = pre.augment(images, [11, 12, 13, 14])
    assert full.shape == (4, 3, 32, 32)
    assert np.array_equal(full[2:], pre.augment(images[2:], [13, 14]))   # same seed -> same crop, any batching
    assert not np.array_equal(full[0], pre.augment(images[:1], [99])[0])   # another seed -> another crop
    assert not np.array_equal(full[0], pre.eval(images[:1])[0])            # it does augment


def test_balanced_subset_takes_classes_in_turn():
    labels = np.array([1, 1, 1, 1, 0, 2, 0, 1])
    assert balanced_subset(labels, 5) == [0, 1, 4, 5, 6]     # 0s: 4, 6; 1s: 0, 1; 2s: 5
    assert balanced_subset(labels, 100) == list(range(8))
    rng = np.random.default_rng(2)
    labels = np.sort(rng.integers(0, 3, 200))                  # sorted, like the real test split
    counts = np.bincount(labels[balanced_subset(labels, 30)], minlength=3)
    assert counts.tolist() == [10, 10, 10]


def test_shipped_real_data_is_the_documented_file(pneumonia_npz):
    """The real X-rays the tests train on ship with them (tests/data), with the sha256 their README states."""
    from nearl_rt.core.hashing import sha256_file
    readme = (pneumonia_npz.parent / "README.md").read_text()
    assert sha256_file(pneumonia_npz) in readme
    ds = read_dataset(pneumonia_npz)
    assert ds.class_names == ["normal", "pneumonia"]
    assert {s: len(ds.split(s)) for s in ("train", "val", "test")} == {"train": 2428, "val": 270, "test": 468}
