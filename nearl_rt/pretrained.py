"""Shareable adapters: a folder with adapter.safetensors (the adapter tensors only), config.json (the NearlConfig,
classes, prompts, intensity policy, calibration, training facts, the backbone's name and sha256) and a README.md
model card (Hugging Face's ModelCard format), exactly what `huggingface_hub.upload_folder` would publish.

    python -m nearl_rt save-pretrained CKPT OUTDIR       model.save_pretrained(OUTDIR)
    nearl_rt.from_pretrained(OUTDIR, pretrained=BACKBONE)

Every tool that reads a checkpoint reads such a folder too (nearl_rt.checkpoint.read_checkpoint). Reading it
never unpickles: JSON and safetensors only; a folder whose tensors or config were changed is refused.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from nearl_rt.checkpoint import FORMAT, FORMAT_VERSION, checkpoint_payload, validate_payload
from nearl_rt.core.atomic import atomic_folder
from nearl_rt.core.errors import CheckpointError, NearlError
from nearl_rt.core.hashing import sha256_file

FOLDER_FORMAT = "nearl-rt-pretrained"
ADAPTER_FILE, CONFIG_FILE, CARD_FILE = "adapter.safetensors", "config.json", "README.md"
# extra entries config.json keeps at its top level (the rest goes under "training")
TOP_LEVEL_EXTRA = ("intensity", "calibration")
# backbones whose hub id is known (the card's base_model); others are named by their open_clip name
HUB_IDS = {"BiomedCLIP-PubMedBERT_256-vit_base_patch16_224": "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"}
CARD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "auprc")
BIOMEDCLIP_SCOPE = (
    "This adapter is built on BiomedCLIP, whose own model card puts any deployed use of the model, commercial or "
    "otherwise, out of scope: BiomedCLIP and its evaluations are for research use only, not for deployed use cases. "
    "The same holds for this adapter.")


def is_pretrained_folder(path) -> bool:
    """Whether `path` is a folder meant to be a save-pretrained folder (it has a config.json)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


# ------------------------------------------------------------------------------------------- write
def folder_config(payload: dict, adapter_sha256: str) -> dict:
    """config.json for a checkpoint payload (plain JSON values only)."""
    extra = dict(payload.get("extra") or {})
    method = extra.get("method", "nearl")
    if method != "nearl":
        raise NearlError(f"save-pretrained shares NEARL adapters; this is a {method} baseline (its head or prompt "
                         f"context is no adapter tensor). Share a checkpoint trained with --method nearl")
    config = payload["config"]
    backbone = {k: v for k, v in payload["backbone"].items() if k != "path"}  # a local path means nothing elsewhere
    return {
        "format": FOLDER_FORMAT, "format_version": FORMAT_VERSION, "nearl_rt_version": payload.get("nearl_rt_version"),
        "config": config if isinstance(config, dict) else config.to_dict(),
        "class_names": list(payload["class_names"]), "template": payload.get("template"),
        "templates": payload.get("templates"), "multi_label": bool(payload.get("multi_label", False)),
        "backbone": backbone,
        **{k: extra.pop(k, None) for k in TOP_LEVEL_EXTRA},
        "training": extra, "adapter_file": ADAPTER_FILE, "adapter_sha256": adapter_sha256,
    }


def save_pretrained(payload: dict, outdir, *, metrics: Optional[list] = None, dataset: Optional[str] = None) -> Path:
    """Write the folder for a checkpoint payload (nearl_rt.checkpoint.checkpoint_payload / read_checkpoint).
    metrics: card_metrics' entries; dataset: the training data's name. The folder appears whole or not at all;
    OUTDIR must be new or empty."""
    from safetensors.torch import save_file
    outdir = Path(outdir)
    card = model_card(payload, metrics or [], dataset)  # fails (missing extra) before anything is written
    with atomic_folder(outdir) as tmp:
        save_file({k: v.contiguous() for k, v in payload["adapter"].items()}, tmp / ADAPTER_FILE,
                  metadata={"format": FOLDER_FORMAT})
        config = folder_config(payload, sha256_file(tmp / ADAPTER_FILE))
        try:
            text = json.dumps(config, indent=1, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise NearlError(f"cannot write {outdir / CONFIG_FILE}: the checkpoint holds a value JSON cannot "
                             f"carry ({e})") from None
        (tmp / CONFIG_FILE).write_text(text + "\n")
        card.save(tmp / CARD_FILE)
    return outdir


def save_model_pretrained(model, outdir, extra: Optional[dict] = None, **card) -> Path:
    """model.save_pretrained: `model`'s adapters, classes and prompts (extra: intensity, calibration, ...)."""
    return save_pretrained(checkpoint_payload(model, extra), outdir, **card)


def save_checkpoint_pretrained(checkpoint, outdir, eval_files=(), dataset: Optional[str] = None) -> Path:
    """`python -m nearl_rt save-pretrained CKPT OUTDIR`: a checkpoint (or run directory) as a shareable folder; its
    card carries the validation facts, a sweep run's eval.json and the evaluate --json files `eval_files`."""
    from nearl_rt.checkpoint import read_checkpoint
    from nearl_rt.classifier import resolve_checkpoint
    path = resolve_checkpoint(checkpoint)
    payload = read_checkpoint(path)
    run_dir = path.parent
    evaluations = []
    swept = _read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else {}
    if swept and swept.get("checkpoint", "best.pt") == path.name:  # a sweep's run scored through this checkpoint
        sweep = run_dir.parent.parent / "sweep.json"
        split = _read_json(sweep).get("split", "test") if sweep.is_file() else "test"
        evaluations.append((split, swept.get("metrics") or {}))
    for file in eval_files:
        report = _read_json(Path(file))
        if not isinstance(report.get("results"), dict) or len(report["results"]) != 1:
            raise NearlError(f"--eval {file} is not the --json file of `evaluate` on one checkpoint")
        (scored, metrics), = report["results"].items()
        if resolve_checkpoint(scored).resolve() != path.resolve():
            raise NearlError(f"--eval {file} holds the metrics of {scored}, not of {path}: evaluate {path} itself")
        evaluations.append((report.get("split", "test"), metrics))
    if dataset is None and (run_dir / "run.json").is_file():
        dataset = Path(_read_json(run_dir / "run.json").get("data") or "").stem or None
    return save_pretrained(payload, outdir, metrics=card_metrics(payload.get("extra") or {}, evaluations),
                           dataset=dataset)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NearlError(f"cannot read {path} as JSON ({e.__class__.__name__}); pass a file that `evaluate --json` "
                         f"or a training run wrote") from None
    return value if isinstance(value, dict) else {}


# -------------------------------------------------------------------------------------------- read
def read_pretrained(path) -> dict:
    """A save-pretrained folder as a validated checkpoint payload (nearl_rt.checkpoint.read_checkpoint's)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    config_file, adapter_file = path / CONFIG_FILE, path / ADAPTER_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path} is a folder without {CONFIG_FILE}: neither a checkpoint nor a save-pretrained "
                              f"folder (for a run directory pass its best.pt)")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}); the folder is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT:
        raise CheckpointError(f"{config_file} is not a nearl-rt adapter config (no '{FOLDER_FORMAT}' format marker)")
    if not adapter_file.is_file():
        raise CheckpointError(f"{path} has no {ADAPTER_FILE}; the folder is incomplete")
    try:
        adapter = load_file(adapter_file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{adapter_file} is damaged or not a safetensors file ({e})") from None
    extra = config.get("training") if isinstance(config.get("training"), dict) else {}
    extra.update({k: config[k] for k in TOP_LEVEL_EXTRA if config.get(k) is not None})
    payload = validate_payload({**{k: v for k, v in config.items() if k not in ("training", *TOP_LEVEL_EXTRA)},
                                "format": FORMAT, "adapter": adapter, "extra": extra}, path)
    want, got = config.get("adapter_sha256"), sha256_file(adapter_file)
    if want != got:
        raise CheckpointError(f"{adapter_file} (sha256 {got[:12]}…) is not the file {CONFIG_FILE} was written with "
                              f"(sha256 {str(want)[:12]}…): the folder was changed after save-pretrained; save it again")
    return payload


def from_pretrained(path, *, pretrained=None, backend: str = "auto", interaction: Optional[str] = None):
    """The model a save-pretrained folder holds; pretrained: the backbone weights (file or download folder) on this
    machine, checked against the sha256 in config.json."""
    from nearl_rt.checkpoint import load_checkpoint
    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is not a folder; from_pretrained reads a save-pretrained folder "
                              f"(load a checkpoint file with nearl_rt.load_checkpoint)")
    return load_checkpoint(path, pretrained=pretrained, backend=backend, interaction=interaction)


# ------------------------------------------------------------------------------------------- model card
def card_metrics(extra: dict, evaluations=()) -> list:
    """The card's metrics: [{name, value, split, shots}] from the checkpoint's validation facts and `evaluations`
    ((split, metrics dict) pairs: an evaluate --json result, a sweep run's eval.json)."""
    shots = extra.get("shots")
    out = [{"name": "accuracy", "value": extra["val_accuracy"], "split": "validation shots", "shots": shots}] \
        if isinstance(extra.get("val_accuracy"), (int, float)) else []
    for split, m in evaluations:
        out += [{"name": k, "value": m[k], "split": split, "shots": shots} for k in CARD_METRICS
                if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])]
    return out


def model_card(payload: dict, metrics: list, dataset: Optional[str]):
    """The README.md model card (huggingface_hub.ModelCard, YAML metadata + text) for a checkpoint payload."""
    try:
        from huggingface_hub import EvalResult, ModelCard, ModelCardData
    except ImportError:
        raise NearlError("the model card needs huggingface_hub: pip install 'nearl-rt[hub]'") from None
    backbone = payload["backbone"]
    name = backbone["name"]
    random = backbone.get("sha256") is None
    extra = payload.get("extra") or {}
    config = payload["config"] if isinstance(payload["config"], dict) else payload["config"].to_dict()
    classes = list(payload["class_names"])
    dataset_name = dataset or "unknown"
    results = [EvalResult(task_type="image-classification", dataset_type=dataset_name, dataset_name=dataset_name,
                          dataset_split=m["split"], metric_type=m["name"], metric_value=float(m["value"]),
                          metric_name=f"{m['name']} ({m['split']}, K={m['shots']})",
                          dataset_args={"shots_per_class": m["shots"]})
               for m in metrics]
    data = ModelCardData(
        base_model=HUB_IDS.get(name, name), datasets=[dataset] if dataset else None, library_name="nearl-rt",
        pipeline_tag="image-classification", tags=["nearl-clip", "clip", "adapter", "few-shot", "medical-imaging",
                                                   *(["random-backbone"] if random else [])],
        model_name=f"NEARL-CLIP adapter ({name}, {len(classes)} classes)",
        eval_results=results or None)
    n = sum(t.numel() for t in payload["adapter"].values())
    calibration = extra.get("calibration")
    lines = [
        f"# NEARL-CLIP adapter on {name}", "",
        f"{n:,} trainable adapter parameters (USEformer + orthogonal cross-attention adapters, nearl-rt "
        f"{payload.get('nearl_rt_version')}) on the frozen {name} backbone "
        + ("with **random weights**: a pipeline check, its scores mean nothing." if random else
           f"(weights sha256 `{backbone['sha256']}`)."),
        "", f"Classes: {', '.join(classes)}. Trained with K = {extra.get('shots')} images per class "
        f"(seed {extra.get('seed')}) on {dataset_name}.", "",
        "## How to use", "", "```python", "import nearl_rt",
        "model = nearl_rt.from_pretrained('THIS_FOLDER'"
        + (")" if random else f", pretrained='the {name} weights file or download folder')"),
        "```", "",
        "or with the command-line tools: `python -m nearl_rt.evaluate THIS_FOLDER --data DATA`, "
        "`python -m nearl_rt.predict THIS_FOLDER IMAGES`, `python -m export.onnx THIS_FOLDER`.", "",
        "## Evaluation", "",
    ]
    lines += ["| metric | split | K | value |", "|---|---|---|---|"] + \
        [f"| {m['name']} | {m['split']} | {m['shots']} | {float(m['value']):.4f} |" for m in metrics] \
        if metrics else ["No evaluation recorded."]
    if calibration:
        lines += ["", f"Calibrated: temperature {calibration.get('temperature')}, operating point "
                      f"{calibration.get('operating_point')}, thresholds {calibration.get('thresholds')}."]
    lines += [
        "", "## Intended use", "",
        "Research on few-shot adaptation of vision-language models to medical images, and reproduction of the "
        "results above. Not a medical device: not for diagnosis, triage or any other clinical decision.", "",
        "## Limits", "",
        f"- Trained on {extra.get('shots')} images per class: the metrics above come from small samples and may not "
        "hold on other scanners, sites, populations or image types.",
        "- It scores only its classes' prompts; images from outside the training distribution still receive one "
        "of these classes.",
        "- The intensity policy and calibration in config.json are part of the model: evaluate on your own data "
        "before relying on its probabilities or thresholds.",
    ]
    if "biomedclip" in name.lower():
        lines += ["", "## Out-of-scope use", "", BIOMEDCLIP_SCOPE]
    lines += ["", "## Architecture", "", "```json", json.dumps(config, indent=1), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
