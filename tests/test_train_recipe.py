"""The training recipe `python -m nearl_rt.train` runs by default learns at few shots (real chest X-rays,
tiny preset: its own defaults, not a hand-made loop), its step budget does not shrink with K, and best.pt
never goes back to an earlier epoch on a validation tie (docs/protocols.md, "The training recipe")."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import nearl_rt
from nearl_rt import evaluate, train
from nearl_rt.data import Preprocess
from nearl_rt.sampling import balanced_subset
from tests.helpers import oca_update_stats
from tests.test_train_cli import cli


def train_losses(run):
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_defaults_learn_at_16_shots(pneumonia_npz, tmp_path, capsys):
    """Measured at seed 0 (docs/protocols.md): the loss falls 0.72 -> 0.32, the weakest OCA moves its tokens by
    6 %, test accuracy 0.72 vs zero-shot 0.32. The recipe before it (20 epochs = 40 steps, s = 0 start): the loss
    fell 26 %, one OCA moved its tokens by 0.3 %."""
    common = ["--data", pneumonia_npz, "--preset", "tiny", "--shots", "16", "--seed", "0", "--no-progress"]
    nearl, zeroshot = tmp_path / "nearl", tmp_path / "zeroshot"
    assert cli(train, [*common, "--out", nearl], capsys)[0] == 0
    assert cli(train, [*common, "--method", "zeroshot", "--out", zeroshot], capsys)[0] == 0

    losses = train_losses(nearl)
    assert np.mean(losses[-3:]) <= 0.7 * np.mean(losses[:3]), losses  # the training loss falls by >= 30 %

    # every adapter (each layer, both towers) changes its tokens: mean |F' - F| / |F| >= 2 % on test X-rays
    model = nearl_rt.load_checkpoint(nearl / "last.pt").eval()
    data = np.load(pneumonia_npz)
    subset = balanced_subset(data["test_labels"][:, 0], 32)
    images = Preprocess(model.preprocess_cfg).eval([Image.fromarray(data["test_images"][i]).convert("RGB")
                                                    for i in subset])
    updates = [rel for _, _, rel in oca_update_stats(model, images, model.class_tokens)]
    assert len(updates) == 4 and min(updates) >= 0.02, updates

    # the final model beats zero-shot on all 468 test images by >= 0.1
    report = tmp_path / "eval.json"
    rc, _, _ = cli(evaluate, [nearl / "last.pt", zeroshot / "last.pt", "--data", pneumonia_npz, "--json", report],
                   capsys)
    results = json.loads(report.read_text())["results"]
    acc = {name: results[str(tmp_path / name / "last.pt")]["accuracy"] for name in ("nearl", "zeroshot")}
    assert rc == 0 and acc["nearl"] >= acc["zeroshot"] + 0.1, acc
    assert len(losses) == 100  # the default 200 optimizer steps: 100 epochs of 2 batches of 16


def test_a_validation_tie_keeps_the_later_epoch(pneumonia_npz, tmp_path, capsys):
    """With --lr 0 nothing moves, so every epoch ties on validation loss: best.pt is the last epoch's."""
    run = tmp_path / "run"
    rc, out, _ = cli(train, ["--data", pneumonia_npz, "--preset", "tiny", "--shots", "2", "--epochs", "3", "--lr",
                             "0", "--out", run, "--no-progress"], capsys)
    val_losses = {json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert rc == 0 and len(val_losses) == 1  # a real tie
    for name in ("last.pt", "best.pt"):
        assert torch.load(run / name, weights_only=True)["extra"]["epoch"] == 3, name
    assert "the lowest loss on the 4 validation images (so few: a noisy choice)" in out
    assert train.replaces_best({"val_loss": 0.5}, {"val_loss": 0.5})
    assert train.replaces_best({"val_loss": 0.4}, {"val_loss": 0.5})
    assert not train.replaces_best({"val_loss": 0.6}, {"val_loss": 0.5})
    assert train.replaces_best({"val_loss": 9.0}, None)


@pytest.mark.parametrize("images, batch, epochs, steps, planned", [
    (2, 16, None, 200, 200),     # K = 1, 2 classes: one step per epoch
    (32, 16, None, 200, 100),    # K = 16: two
    (160, 16, None, 200, 20),    # K = 16, 10 classes: ten
    (33, 16, None, 200, 67),     # three steps per epoch: 201 steps, rounded up to whole epochs
    (32, 16, 7, None, 7),        # --epochs as given
])
def test_the_step_budget_does_not_shrink_with_k(images, batch, epochs, steps, planned):
    assert train.plan_epochs(images, batch, epochs, steps) == planned


def test_steps_is_the_default_budget_and_epochs_replaces_it(pneumonia_npz, tmp_path, capsys):
    base = ["--data", pneumonia_npz, "--preset", "tiny", "--shots", "1", "--batch-size", "4", "--no-progress"]
    rc, out, _ = cli(train, [*base, "--steps", "3", "--out", tmp_path / "a"], capsys)
    assert rc == 0 and "3 epochs x 1 optimizer step(s) = 3 steps" in out
    assert len(train_losses(tmp_path / "a")) == 3
    assert json.loads((tmp_path / "a" / "run.json").read_text())["steps"] == 3
    rc, _, err = cli(train, [*base, "--steps", "3", "--epochs", "2", "--out", tmp_path / "b"], capsys)
    assert rc == 2 and "--epochs 2 and --steps 3 both set the training length; give one" in err
    rc, _, err = cli(train, [*base, "--steps", "0", "--out", tmp_path / "b"], capsys)
    assert rc == 2 and "--steps must be >= 1, got 0" in err and not (tmp_path / "b").exists()
    # a run written before --steps existed (its run.json has no "steps") resumes with its --epochs
    assert cli(train, [*base, "--epochs", "2", "--stop-after", "1", "--out", tmp_path / "old"], capsys)[0] == 0
    settings = json.loads((tmp_path / "old" / "run.json").read_text())
    del settings["steps"]
    (tmp_path / "old" / "run.json").write_text(json.dumps(settings))
    rc, out, _ = cli(train, [*base, "--epochs", "2", "--resume", "--out", tmp_path / "old"], capsys)
    assert rc == 0 and "resuming" in out and len(train_losses(tmp_path / "old")) == 2
