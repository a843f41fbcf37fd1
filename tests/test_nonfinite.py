"""NaN/Inf weights: refused by load/evaluate/predict/export/info and by save; a run whose loss or weights turn
non-finite stops with one clear line and keeps its last good checkpoint; export's verification says so."""
import json

import pytest
import torch

import nearl_rt.export.onnx as export_onnx
import nearl_rt
from nearl_rt.export.onnx import ExportError, export_model
from nearl_rt import __main__ as nearl_rt_main
from nearl_rt import evaluate, predict, train
from nearl_rt.core.cli import run_cli
from nearl_rt.demo import DEMO_DATA
from nearl_rt.core.errors import CheckpointError
from tests.helpers import CLASSES, perturb_adapters, tiny

POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
TRAIN = ["--data", str(DEMO_DATA), "--preset", "tiny", "--shots", "4", "--epochs", "3", "--batch-size", "4",
         "--no-progress"]  # 8 images: 2 optimizer steps per epoch


def cli(module, argv, capsys):
    rc = run_cli(module.main, [str(a) for a in argv], prog=module.__name__)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    model = perturb_adapters(tiny(backend="torch"), seed=5)
    model.set_classes(["normal", "pneumonia"], "a chest X-ray showing {}.")
    return nearl_rt.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "good.pt")


def poisoned(good, tmp_path, value, name=None):
    """A copy of `good` with one element of one adapter tensor (default: the last) set to `value`."""
    payload = torch.load(good, weights_only=True)
    name = name or sorted(payload["adapter"])[-1]
    t = payload["adapter"][name]
    t.view(-1)[t.numel() // 2] = value
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    return path, name


@pytest.mark.parametrize("poison", POISONS)
def test_load_refuses_non_finite_adapters(good_checkpoint, tmp_path, poison):
    path, name = poisoned(good_checkpoint, tmp_path, POISONS[poison])
    with pytest.raises(CheckpointError, match=rf"tensor {name} \(1 of \d+ values\) is NaN or Inf") as e:
        nearl_rt.load_checkpoint(path)
    assert "\n" not in str(e.value) and "lower --lr" in str(e.value)
    nearl_rt.load_checkpoint(good_checkpoint)  # the untouched file still loads


@pytest.mark.parametrize("poison", POISONS)
def test_clis_refuse_non_finite_checkpoints(good_checkpoint, tmp_path, capsys, poison):
    path, _ = poisoned(good_checkpoint, tmp_path, POISONS[poison])
    image = sorted((DEMO_DATA / "test" / "normal").glob("*.png"))[0]
    out_json, out_onnx = tmp_path / "eval.json", tmp_path / "bad.onnx"
    for module, argv in ((evaluate, [path, "--data", DEMO_DATA, "--json", out_json]),
                         (predict, [path, image, "--output", tmp_path / "p.csv"]),
                         (export_onnx, [path, "-o", out_onnx]),
                         (nearl_rt_main, ["info", path])):
        rc, out, err = cli(module, argv, capsys)
        assert rc == 2, module.__name__
        assert err.count("\n") == 1 and "is NaN or Inf" in err, (module.__name__, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]  # nothing written


def test_save_refuses_non_finite_adapters(tmp_path):
    model = tiny(backend="torch")
    next(iter(model.adapter_parameters())).data.view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        nearl_rt.save_checkpoint(model, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


def poison_after(monkeypatch, n_steps):
    """Make the n-th AdamW step leave NaN in one adapter parameter (what a diverging update does)."""
    real, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == n_steps:
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_training_stops_on_a_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """Step 3 (epoch 2's first) poisons the weights, so step 4's loss is NaN: stop before any update or
    write of epoch 2; last.pt and best.pt stay epoch 1's, loadable and finite."""
    poison_after(monkeypatch, 3)
    run = tmp_path / "run"
    rc, out, err = cli(train, [*TRAIN, "--out", run], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "training stopped in epoch 2: the training loss is not finite (nan) at step 2" in err
    assert f"the last good checkpoint is {run / 'last.pt'} (epoch 1)" in err
    model = nearl_rt.load_checkpoint(run / "last.pt")
    assert all(torch.isfinite(t).all() for t in model.adapter_state_dict().values())
    assert torch.load(run / "last.pt", weights_only=True)["extra"]["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] == 1


def test_training_stops_when_the_weights_turn_nan_at_an_epoch_end(tmp_path, capsys, monkeypatch):
    """The last step of epoch 1 poisons the weights: caught before the epoch's checkpoints are written;
    with no earlier epoch there is nothing to keep, so the half-made run directory is removed."""
    poison_after(monkeypatch, 2)
    run = tmp_path / "run"
    rc, out, err = cli(train, [*TRAIN, "--out", run], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "training stopped in epoch 1: adapter tensor" in err and "no checkpoint was written" in err
    assert not run.exists()


def test_export_verification_names_a_non_finite_output(tmp_path):
    model = perturb_adapters(tiny(backend="torch"), seed=2)
    model.set_classes(CLASSES)
    next(iter(model.adapter_parameters())).data.fill_(float("nan"))
    with pytest.raises(ExportError, match=r"non-finite output on the verification images: onnxruntime's logits, onnxruntime's "
                                          r"probs, PyTorch's logits, PyTorch's probs hold NaN or Inf"):
        export_model(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
