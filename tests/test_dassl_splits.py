"""Dassl / BiomedCoOp few-shot selections (split_fewshot/shot_K-seed_S.pkl) next to our sampler: read without
running them, matched to the split JSON's images by path, used by train and the sweep."""
import json
import os
import pickle
import sys
import types

import pytest

from nearl_rt import sweep, train
from nearl_rt.dassl_splits import read_selection, shots_from_selection
from nearl_rt.data import DataError, read_dataset
from tests.helpers import cli
from tests.test_data import write_png

CLASSNAMES = ["glioma", "meningioma"]


@pytest.fixture
def dassl_module(monkeypatch):
    """Dassl's Datum class, as the selection files name it (the pickles are written with it, as Dassl does)."""
    module = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

    Datum.__module__, Datum.__qualname__ = module.__name__, "Datum"
    module.Datum = Datum
    for parent in ("dassl", "dassl.data", "dassl.data.datasets"):  # pickle imports the module to find the class
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _split_json(root):
    """A BiomedCoOp-style dataset: images/<class>/<split>_<i>.png and split_Toy.json."""
    spec = {}
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        spec[split] = []
        for label, name in enumerate(CLASSNAMES):
            for i in range(n):
                rel = f"{name}/{split}_{i}.png"
                write_png(root / "images" / rel, 40 * label + 7 * i + len(split))
                spec[split].append([rel, label, name])
    (root / "split_Toy.json").write_text(json.dumps(spec))
    return root / "split_Toy.json"


def _selection(dassl_module, path, shots, train_ids=(0, 2, 4), val_ids=(1,)):
    """A selection as Dassl writes it: absolute paths on another machine, highest pickle protocol."""
    Datum = dassl_module.Datum
    data = {part: [Datum(f"/mnt/data/Toy/images/{name}/{part}_{i}.png", label, name)
                   for label, name in enumerate(CLASSNAMES) for i in ids[:shots if part == "train" else None]]
            for part, ids in (("train", train_ids), ("val", val_ids))}
    path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def test_selection_matches_the_split_json_images(tmp_path, dassl_module):
    ds = read_dataset(_split_json(tmp_path / "toy"), tmp_path / "toy" / "images")
    shots = shots_from_selection(ds, _selection(dassl_module, tmp_path / "shot_3-seed_1.pkl", 3), 3, 1)
    train = [ds.split("train").describe(i) for i in shots["train"]]
    assert [os.path.relpath(p, tmp_path / "toy" / "images") for p in train] == [
        f"{name}/train_{i}.png" for name in CLASSNAMES for i in (0, 2, 4)]
    assert shots["val_split"] == "val" and [ds.split("val").labels[i] for i in shots["val"]] == [0, 1]
    with pytest.raises(DataError, match=r"holds \[3, 3\] training images per class, not --shots 2"):
        shots_from_selection(ds, tmp_path / "shot_3-seed_1.pkl", 2, 1)


def test_a_pickle_naming_anything_but_datum_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"train": [Payload()], "val": []}))
    with pytest.raises(DataError, match=r"is not a Dassl few-shot selection \(UnpicklingError: it names "
                                        r"(posix|os)\.system, not only Dassl's Datum\)"):
        read_selection(bad)
    assert not marker.exists()


def test_train_and_sweep_take_the_selected_shots(tmp_path, dassl_module, capsys):
    data = _split_json(tmp_path / "toy")
    folder = tmp_path / "split_fewshot"
    folder.mkdir()
    for seed, ids in ((1, (0, 1)), (2, (3, 5))):
        _selection(dassl_module, folder / f"shot_2-seed_{seed}.pkl", 2, train_ids=ids)
    quick = ["--preset", "tiny", "--epochs", "1", "--batch-size", "4", "--no-progress", "--image-root",
             tmp_path / "toy" / "images"]
    rc, _, err = cli(train, ["--data", data, "--method", "zeroshot", "--shots", "2", "--seed", "2", "--out",
                             tmp_path / "run", "--fewshot-file", folder / "shot_2-seed_2.pkl", *quick], capsys)
    assert rc == 0, err
    recorded = json.loads((tmp_path / "run" / "shots.json").read_text())
    assert [os.path.basename(p) for p in recorded["train_images"]] == ["train_3.png", "train_5.png"] * 2
    rc, printed, err = cli(sweep, ["--data", data, "--methods", "zeroshot", "--shots", "2", "--seeds", "1,2",
                                   "--out", tmp_path / "sw", "--fewshot-dir", folder, "--bootstrap", "0", *quick],
                           capsys)
    assert rc == 0 and "2 of 2 runs done" in printed, err
    first = json.loads((tmp_path / "sw" / "runs" / "zeroshot_k2_s1" / "shots.json").read_text())
    assert [os.path.basename(p) for p in first["train_images"]] == ["train_0.png", "train_1.png"] * 2
    rc, _, err = cli(sweep, ["--data", data, "--methods", "zeroshot", "--shots", "2,4", "--seeds", "1",
                             "--out", tmp_path / "sw2", "--fewshot-dir", folder, *quick], capsys)
    assert rc == 2 and "shot_4-seed_1.pkl: no such file" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli(sweep, ["--data", data, "--methods", "zeroshot", "--shots", "2", "--seeds", "1", "--base-to-novel",
                             "--out", tmp_path / "sw3", "--fewshot-dir", folder, *quick], capsys)
    assert rc == 2 and "--fewshot-dir gives the shots of all classes; it does not combine with --base-to-novel" in err
    assert not (tmp_path / "sw3").exists()


def test_an_entry_without_an_image_path_is_one_line(tmp_path, dassl_module):
    path = _selection(dassl_module, tmp_path / "shot_1-seed_1.pkl", 1)
    data = pickle.loads(path.read_bytes())
    data["train"][0]._impath = ""
    path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(DataError, match="a train entry is not a Datum with an image path and an integer label"):
        read_selection(path)
