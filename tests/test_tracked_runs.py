"""Runs you can track, configure and share: --report-to (TensorBoard event files, an MLflow file store) read back
equal to metrics.jsonl; --config FILE.yaml (a run's config.yaml reproduces its checkpoint bit for bit, flags
override the file, bad keys are one clear line); save-pretrained folders (exact logits, no pickle, a parsable
model card, tampered folders refused, the ONNX export equal to the checkpoint's). Tiny preset, real chest X-rays."""
import json
import os
import pickle

import numpy as np
import onnx
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import nearl_rt
from nearl_rt import __main__ as nearl_main
from nearl_rt import evaluate, sweep, train
from nearl_rt.config_file import parse_with_config
from nearl_rt.export.onnx import export_checkpoint
from nearl_rt.pretrained import ADAPTER_FILE, CARD_FILE, CONFIG_FILE
from tests.helpers import cli, perturb_adapters

CONFIG = {"preset": "tiny", "shots": 2, "epochs": 2, "batch_size": 2, "lr": 0.05, "no_progress": True}


def log(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def mlflow_runs(store):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    mlflow.set_tracking_uri(store.resolve().as_uri())
    return mlflow.search_runs(experiment_names=["nearl-rt"], output_format="list"), mlflow.MlflowClient()


@pytest.fixture(scope="module")
def run(pneumonia_npz_module, tmp_path_factory):
    """A tiny training from a config file, reported to TensorBoard and MLflow."""
    root = tmp_path_factory.mktemp("tracked")
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "data": str(pneumonia_npz_module),
                                      "report_to": "tensorboard,mlflow"}))
    assert train.main(["--config", str(config), "--out", str(root / "a")]) == 0
    return root / "a"


@pytest.fixture(scope="module")
def pneumonia_npz_module():
    from tests.conftest import DATA
    if not DATA.is_file():
        pytest.skip(f"real data not present at {DATA}")
    return DATA


# ---------------------------------------------------------------------------------------------- tracking
def test_tensorboard_and_mlflow_equal_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    records = log(run)
    assert len(records) == 2
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(r["epoch"], np.float32(r[key])) for r in records], key  # event files hold float32
    steps = events.Scalars("step/loss")
    assert [e.step for e in steps] == [1, 2, 3, 4]  # 4 training images, batch 2, 2 epochs
    assert events.Scalars("step/lr")[-1].value == np.float32(records[-1]["lr"])  # the epoch's last step's lr
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == 0.05 and start.hparams["preset"].string_value == "tiny"

    runs, client = mlflow_runs(run / "mlruns")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "a"
    run_id = runs[0].info.run_id
    for key in ("train_loss", "val_loss", "val_accuracy", "epoch_time_s"):
        history = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["epoch"], r[key]) for r in records], key  # exact
    params = runs[0].data.params
    assert params["lr"] == "0.05" and params["batch_size"] == "2" and params["report_to"] == "tensorboard,mlflow"


def test_report_to_is_checked_and_a_missing_package_names_the_extra(pneumonia_npz, tmp_path, capsys, monkeypatch):
    rc, _, err = cli(train, ["--data", pneumonia_npz, "--out", tmp_path / "x", "--shots", "1", "--preset", "tiny",
                             "--report-to", "wandb"], capsys)
    assert rc == 2 and "--report-to 'wandb'" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)  # import mlflow raises ImportError
    from nearl_rt.tracking import Tracker
    with pytest.raises(nearl_rt.NearlError, match=r"pip install 'nearl-rt\[tracking\]'"):
        Tracker("mlflow", tmp_path)


def test_sweep_from_a_config_file_reports_runs_summary_and_plot(pneumonia_npz, tmp_path, capsys):
    out = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"data": str(pneumonia_npz), "methods": "zeroshot", "shots": 1, "seeds": 0,
                                      "eval_limit": 8, "bootstrap": 0, "preset": "tiny", "no_progress": True,
                                      "report_to": "tensorboard,mlflow"}))
    rc, printed, err = cli(sweep, ["--config", config, "--out", out], capsys)
    assert rc == 0, err
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["methods"] == "zeroshot" and resolved["preset"] == "tiny" and resolved["eval_limit"] == 8
    results = json.loads((out / "results.json").read_text())
    accuracy = results["runs"][0]["metrics"]["accuracy"]
    runs, client = mlflow_runs(out / "mlruns")
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == ["sweep", "zeroshot_k1_s0"]
    assert by_name["zeroshot_k1_s0"].data.metrics["test/accuracy"] == accuracy
    summary = client.get_metric_history(by_name["sweep"].info.run_id, "zeroshot/accuracy_mean")
    assert [(m.step, m.value) for m in summary] == [(1, results["summary"]["zeroshot"]["1"]["accuracy"]["mean"])]
    assert [a.path for a in client.list_artifacts(by_name["sweep"].info.run_id)] == ["accuracy_vs_shots.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert events.Tags()["images"] == ["accuracy_vs_shots"]
    # the sweep's config.yaml runs it again: every run is found finished
    rc, printed, _ = cli(sweep, ["--config", out / "config.yaml"], capsys)
    assert rc == 0 and "finished earlier, skipped" in printed


# ---------------------------------------------------------------------------------------------- config files
def test_config_yaml_reproduces_the_checkpoint_bit_for_bit(run, tmp_path):
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: resolved[k] for k in CONFIG} == CONFIG and "resume" not in resolved and "config" not in resolved
    again = tmp_path / "again"
    assert train.main(["--config", str(run / "config.yaml"), "--out", str(again), "--report-to", "none"]) == 0
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (run, again))
        assert a["adapter"].keys() == b["adapter"].keys()
        assert all(torch.equal(a["adapter"][k], b["adapter"][k]) for k in a["adapter"]), name
        assert a["extra"] == b["extra"], name
    assert torch.load(run / "best.pt", weights_only=True)["extra"]["calibration"]  # compared above
    strip = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in log(run)]
    assert strip == [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in log(again)]
    assert (run / "shots.json").read_text() == (again / "shots.json").read_text()
    assert not (again / "tensorboard").exists() and not (again / "mlruns").exists()


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "data": "d.npz", "out": "o", "warmup-epochs": 2}))
    args = parse_with_config(train.build_parser(), ["--config", str(config), "--lr", "0.1", "--seed", "3"])
    assert (args.lr, args.seed, args.batch_size, args.warmup_epochs, args.shots, args.data) == (0.1, 3, 2, 2.0, 2, "d.npz")
    assert isinstance(args.warmup_epochs, float)
    # the sweep: its own keys and train's in one file, flags over both
    config.write_text(yaml.safe_dump({"data": "d.npz", "out": "o", "shots": "1,2", "preset": "tiny", "epochs": 5}))
    args, rest, defaults = sweep.parse_options(["--config", str(config), "--epochs", "7"])
    train_args = sweep.check_train_options(rest, defaults)
    assert (args.shots, train_args.preset, train_args.epochs) == ("1,2", "tiny", 7)


@pytest.mark.parametrize("tool, content, message", [
    (train, {"batch_sise": 4}, "unknown key 'batch_sise'"),
    (train, {"batch_size": "four"}, "batch_size: expected an integer, got 'four'"),
    (train, {"batch_size": 2.5}, "batch_size: expected an integer, got 2.5"),
    (train, {"batch_size": 2, "batch-size": 4}, "is given twice"),
    (train, {"lr": "fast"}, "lr: expected a number, got 'fast'"),
    (train, {"hflip": "yes"}, "hflip: expected true or false, got 'yes'"),
    (train, {"optimizer": "adam"}, "optimizer: expected one of adamw, sgd, got 'adam'"),
    (train, {"template": ["a", "b"]}, "template: expected a string"),
    (train, ["data"], "must hold a mapping of option names to values, not a list"),
    (train, "data: [unclosed", "is not valid YAML (line 1)"),
    (sweep, {"seed": 1}, "seed cannot be set in a config file here"),
    (sweep, {"methodz": "nearl"}, "unknown key 'methodz'"),
    (sweep, {"epochs": "many"}, "epochs: expected an integer, got 'many'"),
])
def test_bad_config_file_is_one_clear_line(tool, content, message, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    rc, _, err = cli(tool, ["--config", config, "--data", "d.npz", "--out", tmp_path / "o", "--shots", "1"], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1 and str(config) in err, err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- save-pretrained
def test_save_pretrained_folder_loads_evaluates_and_exports_like_its_checkpoint(run, pneumonia_npz, tmp_path, capsys):
    from huggingface_hub import ModelCard
    rc, _, err = cli(evaluate, [run, "--data", pneumonia_npz, "--limit", "8", "--bootstrap", "0",
                                "--json", tmp_path / "eval.json"], capsys)
    assert rc == 0, err
    test_metrics = json.loads((tmp_path / "eval.json").read_text())["results"][str(run)]
    share = tmp_path / "share"
    rc, printed, err = cli(nearl_main, ["save-pretrained", run, share, "--eval", tmp_path / "eval.json"], capsys)
    assert rc == 0 and f"wrote {share}" in printed, err
    rc, _, err = cli(nearl_main, ["save-pretrained", run / "last.pt", tmp_path / "x", "--eval", tmp_path / "eval.json"],
                     capsys)  # evaluate scored best.pt: its metrics are not last.pt's
    assert rc == 2 and "holds the metrics of" in err and not (tmp_path / "x").exists()
    assert sorted(p.name for p in share.iterdir()) == [CARD_FILE, ADAPTER_FILE, CONFIG_FILE]
    for f in share.iterdir():  # no pickle, no torch zip
        head = f.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f
    config = json.loads((share / CONFIG_FILE).read_text())
    best = torch.load(run / "best.pt", weights_only=True)
    assert config["calibration"] == best["extra"]["calibration"] and config["intensity"] == best["extra"]["intensity"]
    assert config["backbone"]["name"] == "nearl-tiny" and "path" not in config["backbone"]
    assert load_file(share / ADAPTER_FILE).keys() == best["adapter"].keys()

    # exact logits, and the folder is read without unpickling anything
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = nearl_rt.load_checkpoint(run / "best.pt").classify(images)
    real_load = torch.load
    torch.load = lambda *a, **k: pytest.fail("torch.load (pickle) used on a save-pretrained folder")
    try:
        got = nearl_rt.from_pretrained(share).classify(images)
    finally:
        torch.load = real_load
    assert torch.equal(got, want)

    card = ModelCard.load(share / CARD_FILE)
    results = {(r.metric_type, r.dataset_split): r for r in card.data.eval_results}
    assert results[("accuracy", "validation shots")].metric_value == best["extra"]["val_accuracy"]
    assert results[("accuracy", "test")].metric_value == test_metrics["accuracy"]
    assert results[("auc", "test")].dataset_args == {"shots_per_class": 2}
    assert card.data.base_model == "nearl-tiny" and card.data.datasets == ["pneumoniamnist_balanced_28"]
    assert "## Intended use" in card.text and "## Limits" in card.text and "random weights" in card.text

    # evaluate reads the folder as it reads the checkpoint
    rc, _, err = cli(evaluate, [share, "--data", pneumonia_npz, "--limit", "8", "--bootstrap", "0",
                                "--json", tmp_path / "eval2.json"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "eval2.json").read_text())["results"][str(share)]["accuracy"] == \
        test_metrics["accuracy"]
    # the ONNX export from the folder equals the export from the checkpoint (but for the recorded sha256)
    a, _ = export_checkpoint(run / "best.pt", tmp_path / "a.onnx", batch_size="dynamic")
    b, _ = export_checkpoint(share, tmp_path / "b.onnx", batch_size="dynamic")
    ma, mb = onnx.load(a), onnx.load(b)
    assert ma.graph == mb.graph
    meta = [{p.key: p.value for p in m.metadata_props if p.key != "nearl.checkpoint_sha256"} for m in (ma, mb)]
    assert meta[0] == meta[1] and len(meta[0]) > 5


def test_biomedclip_card_repeats_its_out_of_scope_statement(tmp_path):
    from nearl_rt.pretrained import BIOMEDCLIP_SCOPE, model_card
    payload = {"backbone": {"name": "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "sha256": "ab" * 32},
               "config": nearl_rt.PRESETS["biomedclip"].to_dict(), "class_names": ["a", "b"],
               "adapter": {"w": torch.zeros(2)}, "extra": {"shots": 16}}
    card = model_card(payload, [], "chest")
    assert BIOMEDCLIP_SCOPE in card.text and "out of scope" in BIOMEDCLIP_SCOPE
    assert card.data.base_model == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


@pytest.fixture
def shared(tmp_path):
    model = perturb_adapters(nearl_rt.build_model("tiny"))
    model.set_classes(["normal", "pneumonia"])
    return model, model.save_pretrained(tmp_path / "share")


def _rewrite_adapter(folder, edit):
    tensors = load_file(folder / ADAPTER_FILE)
    edit(tensors)
    save_file(tensors, folder / ADAPTER_FILE)


@pytest.mark.parametrize("tamper, message", [
    (lambda f: _rewrite_adapter(f, lambda t: t.pop(sorted(t)[0])), "1 missing"),
    (lambda f: _rewrite_adapter(f, lambda t: t.update(extra=torch.zeros(3))), "1 unexpected (e.g. ['extra'])"),
    (lambda f: _rewrite_adapter(f, lambda t: t.update({sorted(t)[0]: torch.zeros(7, 5)})), "1 with another shape"),
    (lambda f: _rewrite_adapter(f, lambda t: t[sorted(t)[0]].add_(1)), "the folder was changed after save-pretrained"),
    (lambda f: (f / ADAPTER_FILE).write_bytes(pickle.dumps({"a": 1})), "damaged or not a safetensors file"),
    (lambda f: (f / ADAPTER_FILE).unlink(), f"has no {ADAPTER_FILE}"),
    (lambda f: (f / CONFIG_FILE).write_text("{"), "is not valid JSON"),
    (lambda f: (f / CONFIG_FILE).write_text('{"format": "other"}'), "no 'nearl-rt-pretrained' format marker"),
], ids=["missing-tensor", "extra-tensor", "wrong-shape", "changed-values", "pickle", "no-adapter", "bad-json",
        "foreign-config"])
def test_tampered_folder_is_refused_with_one_line(shared, tamper, message):
    _, folder = shared
    tamper(folder)
    with pytest.raises(nearl_rt.CheckpointError) as e:
        nearl_rt.from_pretrained(folder)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_wrong_backbone_is_refused(tmp_path):
    from nearl_rt.backbone import build_backbone
    for name, seed in (("clip.pt", 0), ("other.pt", 7)):
        backbone, _ = build_backbone("nearl-tiny", init_seed=seed)
        torch.save(backbone.state_dict(), tmp_path / name)
    model = perturb_adapters(nearl_rt.build_model("tiny", pretrained=tmp_path / "clip.pt"))
    model.set_classes(["a", "b"])
    folder = model.save_pretrained(tmp_path / "share")
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(nearl_rt.from_pretrained(folder, pretrained=tmp_path / "clip.pt").classify(images),
                       model.classify(images))
    with pytest.raises(nearl_rt.CheckpointError, match="not the ones .* trained on"):
        nearl_rt.from_pretrained(folder, pretrained=tmp_path / "other.pt")
    with pytest.raises(nearl_rt.CheckpointError, match="pass pretrained=PATH"):  # the local path is not shared
        nearl_rt.from_pretrained(folder)


def test_save_pretrained_refuses_baselines_and_used_folders(shared, tmp_path, capsys):
    model, folder = shared
    with pytest.raises(nearl_rt.NearlError, match="not an empty folder"):
        model.save_pretrained(folder)
    ckpt = nearl_rt.save_checkpoint(model, tmp_path / "lp.pt", extra={"method": "zeroshot"})
    rc, _, err = cli(nearl_main, ["save-pretrained", ckpt, tmp_path / "new"], capsys)
    assert rc == 2 and "zeroshot baseline" in err and not (tmp_path / "new").exists()
    with pytest.raises(nearl_rt.CheckpointError, match="save-pretrained folder"):
        nearl_rt.checkpoint.update_extra(folder, {"calibration": None})
