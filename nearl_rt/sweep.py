"""`python -m nearl_rt.sweep`: the K-shot protocol. Every (method, K, seed) is trained as a normal run
directory, evaluated on the test split, and summarised.

    python -m nearl_rt.sweep --data DATA --methods nearl,linear_probe,zeroshot,coop --shots 1,2,4,8,16 \\
        --seeds 0,1,2 --out DIR [--base-to-novel] [train options, e.g. --preset vit_b16 --steps 200]

Every run is scored through its last.pt (the final model, as CoOp's protocol scores it; --checkpoint best
scores best.pt, chosen on the 2-4 validation images per class). DIR receives runs/<method>_k<K>_s<seed>/
(a `python -m nearl_rt.train` run directory plus eval.json),
results.json (every run's settings and metrics, and mean ± std per method and K), results.md (one table
per metric, the best mean per column in bold; AUROC and AUPRC with the 95 % bootstrap interval of the mean
over the seeds) and accuracy_vs_shots.png (one line per method with a ±std band; accuracy and macro-F1, or
base-to-novel harmonic mean and novel accuracy). Every run directory also gets predictions.csv (evaluate's
--predictions). Rerunning the same
command resumes: a finished run (it has eval.json) is skipped, an interrupted one continues from its last
epoch. Options after the sweep's own are passed to every `train` run unchanged. `--config FILE.yaml` may hold
the sweep's options and train's (flags override it); DIR/config.yaml records them all, resolved. With
`--report-to tensorboard,mlflow` every run reports as train does (MLflow: all in DIR/mlruns unless
--tracking-uri), then its test metrics; the sweep itself reports mean ± std per method and K and the plot.

On multi-label data (nearl_rt.multilabel; methods nearl, zeroshot, linear_probe) the tables are macro AUROC,
macro AUPRC, macro-F1, subset accuracy and Hamming loss (lower is better: its bold is the lowest), the plot macro
AUROC and AUPRC, and K is images per finding positive.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from nearl_rt.core.imaging import resolve_policy
from nearl_rt import train
from nearl_rt.core.atomic import atomic_output
from nearl_rt.checkpoint import read_checkpoint
from nearl_rt.classifier import load_classifier, resolve_device
from nearl_rt.classsets import restrict, split_base_novel
from nearl_rt.core.cli import run_cli
from nearl_rt.config_file import (add_config_argument, apply_defaults, config_defaults, config_path, non_default_flags,
                                  read_config, resolved_options, unknown_keys, write_config)
from nearl_rt import multilabel
from nearl_rt.data import parse_classes, read_dataset
from nearl_rt.core.errors import NearlError, RandomBackboneWarning
from nearl_rt.evaluate import (B2N_KEYS, evaluate_classifier, evaluate_findings, read_predictions, reported_calibration,
                               write_finding_predictions, write_predictions)
from nearl_rt.methods import METHODS, REGISTRY, expand_methods
from nearl_rt.metrics import DEFAULT_RESAMPLES, SUMMARY_KEYS, bootstrap_intervals, mean_std
from nearl_rt.dassl_splits import shots_from_selection
from nearl_rt.sampling import sample_shots
from nearl_rt.tracking import Tracker, parse_report_to

# Options the sweep sets for every run itself.
OWN_TRAIN_OPTIONS = ("--method", "--shots", "--seed", "--out", "--resume", "--stop-after", "--data", "--image-root",
                     "--classes", "--data-classes", "--base-to-novel", "--base-classes", "--novel-classes",
                     "--fewshot-file")
NOT_RUN_DEFINING = ("device", "config", "report_to", "tracking_uri", "no_progress")
OWN_TRAIN_DESTS = tuple(o[2:].replace("-", "_") for o in OWN_TRAIN_OPTIONS)
CHECKPOINTS = ("last", "best")
PLOT = {False: ("accuracy", "macro_f1"), True: ("hm_accuracy", "novel_accuracy")}
MULTI_LABEL_PLOT = ("macro_auroc", "macro_auprc")
LOWER_IS_BETTER = ("hamming_loss",)
INTERVAL_KEYS = ("auc", "auprc")  # table cells with the 95 % interval of the mean over the seeds
PREDICTIONS = "predictions.csv"
LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy", "auc": "AUROC",
          "auprc": "AUPRC",
          "hm_accuracy": "harmonic mean (base, novel accuracy)", "novel_accuracy": "novel accuracy",
          "base_accuracy": "base accuracy", "macro_auroc": "macro AUROC", "macro_auprc": "macro AUPRC",
          "subset_accuracy": "subset accuracy", "hamming_loss": "Hamming loss (lower is better)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.sweep", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="image folder tree, split .json, or MedMNIST .npz")
    p.add_argument("--image-root", help="folder the split JSON's paths are relative to")
    p.add_argument("--classes", "--data-classes", dest="classes",
                   help="comma-separated names of the data's labels, in label order (default: from the data)")
    p.add_argument("--methods", default="nearl,linear_probe,zeroshot,coop",
                   help=f"comma-separated, of {', '.join(METHODS)}; or all")
    p.add_argument("--shots", default="1,2,4,8,16", help="comma-separated K values")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--base-to-novel", action="store_true", help="train on base classes, score base / novel / HM")
    p.add_argument("--base-classes", help="comma-separated base classes (implies --base-to-novel)")
    p.add_argument("--novel-classes", help="comma-separated novel classes (default: the other classes)")
    p.add_argument("--fewshot-dir", metavar="DIR",
                   help="take every run's shots from Dassl / BiomedCoOp's selections DIR/shot_K-seed_S.pkl (their "
                        "split_fewshot folder; --data: the dataset's split JSON) instead of drawing them")
    p.add_argument("--split", default="test", help="split every run is evaluated on")
    p.add_argument("--checkpoint", default="last", choices=CHECKPOINTS,
                   help="which checkpoint of each run is scored: last.pt (the final model) or best.pt")
    p.add_argument("--eval-limit", type=int, metavar="N", help="evaluate a fixed class-balanced subset of N images")
    p.add_argument("--max-runs", type=int, metavar="N", help="stop after N runs of this invocation (rerun to go on)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                   help=f"bootstrap resamples for the 95%% intervals of every run and of the AUROC/AUPRC tables "
                        f"(default {DEFAULT_RESAMPLES}; 0: none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (also passed to train)")
    add_config_argument(p)
    return p


def parse_options(argv) -> tuple[argparse.Namespace, list, dict]:
    """The sweep's options, the pass-through train options, and train's options from --config (typed)."""
    parser = build_parser()
    path = config_path(sys.argv[1:] if argv is None else argv)
    train_defaults = {}
    if path is not None:
        own, rest = config_defaults(parser, read_config(path), path)
        train_defaults, rest = config_defaults(train.build_parser(), rest, path, refuse=OWN_TRAIN_DESTS)
        unknown_keys(rest, path, parser.prog)
        apply_defaults(parser, own)
    args, rest = parser.parse_known_args(argv)
    return args, rest, train_defaults


def _int_list(text: str, name: str) -> list:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise NearlError(f"--{name} {text!r} must be comma-separated integers, e.g. 1,2,4") from None
    if len(set(values)) != len(values):
        raise NearlError(f"--{name} {text!r} repeats a value")
    return values


def parse_grid(args) -> tuple[list, list, list]:
    methods = expand_methods(args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise NearlError(f"--methods {args.methods!r}: unknown or repeated method {unknown or methods}; "
                         f"use some of {', '.join(METHODS)}")
    shots, seeds = _int_list(args.shots, "shots"), _int_list(args.seeds, "seeds")
    if min(shots) < 1:
        raise NearlError(f"--shots {args.shots!r}: every K must be >= 1")
    return methods, sorted(shots), seeds


def check_train_options(rest: list, defaults: Optional[dict] = None) -> argparse.Namespace:
    """The pass-through options must be train's, and not ones the sweep sets itself; returns them parsed (over
    `defaults`: train's options from the sweep's --config)."""
    own = [a for a in rest if a.split("=")[0] in OWN_TRAIN_OPTIONS]
    if own:
        raise NearlError(f"{own[0].split('=')[0]} is set by the sweep for every run; use --methods / --shots / "
                         f"--seeds / --out / --data of the sweep instead")
    parser = train.build_parser()
    apply_defaults(parser, defaults or {})
    parser.exit_on_error = False
    try:
        train_args, unknown = parser.parse_known_args(["--data", "-", "--shots", "1", "--out", "-", *rest])
    except argparse.ArgumentError as e:
        raise NearlError(f"train option {e}") from None
    if unknown:
        raise NearlError(f"unrecognised option(s) {' '.join(unknown)} (neither the sweep's nor python -m "
                         f"nearl_rt.train's)")
    return train_args


def train_flags(train_args: argparse.Namespace) -> list:
    """The train options that make the sweep's runs what they are, as flags (those not at their default; not the
    ones the sweep sets, nor reporting and progress bars), however they were given."""
    return non_default_flags(train.build_parser(), train_args, skip=(*OWN_TRAIN_DESTS, *NOT_RUN_DEFINING))


def check_sweep_dir(out: Path, settings: dict) -> None:
    """A sweep directory is reused only by the same sweep settings (the grid may grow)."""
    file = out / "sweep.json"
    if file.is_file():
        stored = json.loads(file.read_text())
        if isinstance(stored.get("train_options"), list):  # as given then (flags, or a config file's values)
            stored["train_options"] = train_flags(check_train_options(stored["train_options"]))
        differ = [f"{k}: {stored.get(k)!r} vs now {v!r}" for k, v in settings.items() if stored.get(k) != v]
        if differ:
            raise NearlError(f"--out {out} holds a sweep with other settings ({'; '.join(differ)}); choose a new --out")
    elif out.is_dir() and any(out.iterdir()):
        raise NearlError(f"--out {out} exists and is not a sweep directory (no sweep.json); choose a new --out")


def selection_file(folder, shots: int, seed: int) -> str:
    """Dassl's few-shot selection of K shots for a seed in its split_fewshot folder."""
    return str(Path(folder) / f"shot_{shots}-seed_{seed}.pkl")


def run_name(method: str, shots: int, seed: int) -> str:
    return f"{method}_k{shots}_s{seed}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def summarise(runs: list, keys) -> dict:
    """{method: {K: {key: {mean, std}, "runs": n}}} over the seeds."""
    out: dict = {}
    for r in runs:
        out.setdefault(r["method"], {}).setdefault(str(r["shots"]), []).append(r["metrics"])
    return {method: {k: {"runs": len(ms), **{key: mean_std([m.get(key, np.nan) for m in ms]) for key in keys}}
                     for k, ms in sorted(per_k.items(), key=lambda kv: int(kv[0]))}
            for method, per_k in out.items()}


def seed_mean_intervals(runs: list, summary: dict, resamples: int) -> None:
    """Add `ci95` to the AUROC and AUPRC of every (method, K) of `summary`: the 95 % interval of the mean over its
    seeds, from one bootstrap of the test images applied to every seed's predictions.csv (cells whose runs
    lack the file, or scored different images, get none)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], str(r["shots"])), []).append(r)
    for (method, k), members in groups.items():
        names = members[0]["metrics"].get("class_names")
        files = [Path(r["run_dir"]) / PREDICTIONS for r in members]
        if names is None or not all(f.is_file() for f in files):
            continue
        read = [read_predictions(f, names) for f in files]
        if any(images != read[0][0] for images, _, _ in read):
            continue
        ci = bootstrap_intervals(read[0][1], np.stack([probs for _, _, probs in read]), resamples=resamples)
        for key in INTERVAL_KEYS:
            if key in ci:
                summary[method][k][key]["ci95"] = ci[key]


def markdown(summary: dict, methods: list, shots: list, keys, header: str) -> str:
    lines = [header, ""]
    for key in keys:
        lines += [f"### {LABELS.get(key, key)}", "", "| method | " + " | ".join(f"K={k}" for k in shots) + " |",
                  "|---|" + "---|" * len(shots)]
        best = {}
        for k in shots:
            means = [summary[m][str(k)][key]["mean"] for m in methods if str(k) in summary.get(m, {})]
            best[k] = (min if key in LOWER_IS_BETTER else max)(means) if means else None
        for m in methods:
            cells = []
            for k in shots:
                cell = summary.get(m, {}).get(str(k))
                if cell is None:
                    cells.append("—")
                    continue
                text = f"{cell[key]['mean']:.4f} ± {cell[key]['std']:.4f}"
                if "ci95" in cell[key]:
                    text += " [{:.3f}, {:.3f}]".format(*cell[key]["ci95"])
                cells.append(f"**{text}**" if math.isclose(cell[key]["mean"], best[k]) else text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, methods: list, shots: list, keys, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2))
    for ax, key in zip(axes, keys):
        for i, m in enumerate(methods):
            ks = [k for k in shots if str(k) in summary.get(m, {})]
            if not ks:
                continue
            mean = np.array([summary[m][str(k)][key]["mean"] for k in ks])
            std = np.array([summary[m][str(k)][key]["std"] for k in ks])
            # more methods than the default cycle's 10 colours: 20 distinct ones, so no two lines share one
            color = plt.cm.tab20(i % 20) if len(methods) > 10 else None
            line, = ax.plot(ks, mean, marker="o", label=m, color=color)
            ax.fill_between(ks, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("shots per class (K)")
        ax.set_ylabel(LABELS.get(key, key))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8 if len(methods) > 6 else None)
    fig.suptitle(textwrap.fill(title, 60 * len(keys)), fontsize=10)  # a long method list wraps, not clips
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_results(out: Path, settings: dict, runs: list, methods: list, shots: list, b2n: bool, total: int,
                  resamples: int = DEFAULT_RESAMPLES) -> dict:
    """results.json, results.md and the plot; returns the summary (mean ± std per method and K)."""
    multi = any(r["metrics"].get("multi_label") for r in runs)
    keys = multilabel.SUMMARY_KEYS if multi else B2N_KEYS if b2n else SUMMARY_KEYS
    summary = summarise(runs, keys)
    if resamples and not b2n and not multi:
        seed_mean_intervals(runs, summary, resamples)
    with atomic_output(out / "results.json") as tmp:
        tmp.write_text(json.dumps({"settings": settings, "runs": runs, "summary": summary}, indent=1) + "\n")
    random_backbone = any(r.get("random_backbone") for r in runs)
    note = " — random backbone weights: a pipeline check, not an accuracy claim" if random_backbone else ""
    seeds = sorted({r["seed"] for r in runs})
    header = (f"## K-shot sweep on {settings['data']}{note}\n\n{len(runs)} of {total} runs, each scored through its "
              f"{settings['checkpoint']}.pt; mean ± std over seeds {seeds} on the {settings['split']} split"
              + (f" ({settings['eval_limit']}-image class-balanced subset)" if settings["eval_limit"] else "")
              + "; **bold**: the best mean per column"
              + ("" if b2n or multi or not resamples else "; [low, high]: 95 % interval of the mean over the seeds (bootstrap "
                                                 "of the test images, stratified by class, the same resamples for every "
                                                 "seed)") + ".")
    table_keys = ("base_accuracy", "novel_accuracy", "hm_accuracy", "hm_macro_f1") if b2n else keys
    with atomic_output(out / "results.md") as tmp:
        tmp.write_text(markdown(summary, methods, shots, table_keys, header))
    if runs:
        title = f"{Path(settings['data']).name}: {', '.join(methods)}{note}"
        plot(summary, methods, shots, MULTI_LABEL_PLOT if multi else PLOT[b2n], out / "accuracy_vs_shots.png", title)
    return summary


def eval_scalars(metrics: dict, split: str) -> dict:
    """A run's scalar test metrics as tracked: test/<key> (the split's name when it is not test)."""
    return {f"{split}/{k}": v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def evaluate_run(checkpoint: Path, ds, args, b2n: bool, device) -> dict:
    """A finished run's metrics on the sweep's split through `checkpoint` (last.pt or best.pt); its per-image
    predictions.csv in the run directory beside them (one class set)."""
    classifier, extra = load_classifier(checkpoint, device=device)
    intensity = resolve_policy(extra.get("intensity"), None, checkpoint)
    if classifier.multi_label:
        m, scored = evaluate_findings(classifier, ds, args.split, limit=args.eval_limit, resamples=args.bootstrap,
                                      intensity=intensity)
        write_finding_predictions(checkpoint.parent / PREDICTIONS, classifier, m, scored)
        return m
    m, parts = evaluate_classifier(classifier, extra, ds, args.split, base_to_novel=b2n,
                                   base=parse_classes(args.base_classes), novel=parse_classes(args.novel_classes),
                                   limit=args.eval_limit, resamples=args.bootstrap,
                                   intensity=intensity)
    if not b2n:
        write_predictions(checkpoint.parent / PREDICTIONS, parts["all"], reported_calibration(m))
    return m


def main(argv=None) -> int:
    args, rest, train_defaults = parse_options(argv)
    methods, shots, seeds = parse_grid(args)
    if args.eval_limit is not None and args.eval_limit < 1:
        raise NearlError(f"--eval-limit must be >= 1, got {args.eval_limit}")
    if args.max_runs is not None and args.max_runs < 1:
        raise NearlError(f"--max-runs must be >= 1, got {args.max_runs}")
    if args.bootstrap != 0 and args.bootstrap < DEFAULT_RESAMPLES:
        raise NearlError(f"--bootstrap {args.bootstrap}: use 0 (no intervals) or at least {DEFAULT_RESAMPLES} resamples")
    train_args = check_train_options(rest, train_defaults)
    b2n = args.base_to_novel or args.base_classes is not None
    fixed = [m for m in methods if not REGISTRY[m].generalises]
    if b2n and fixed:
        if args.methods.strip() == "all":  # every method that scores unseen classes
            methods = [m for m in methods if m not in fixed]
            print(f"--base-to-novel: leaving out {', '.join(fixed)} (they score only the classes fitted on)", flush=True)
        else:
            raise NearlError(f"--methods {','.join(fixed)} cannot run --base-to-novel: "
                             f"{'its head scores' if len(fixed) == 1 else 'their heads score'} only the classes "
                             f"fitted on (use {', '.join(m for m in METHODS if REGISTRY[m].generalises)}, or all)")
    if any(REGISTRY[m].needs_descriptions for m in methods):  # a missing file fails now, not after hours of runs
        from nearl_rt.prompt_learners import read_descriptions
        read_descriptions(train_args.class_descriptions, [])
    out = Path(args.out)
    settings = {"data": os.path.abspath(args.data), "image_root": args.image_root, "classes": args.classes,
                "base_to_novel": b2n, "base_classes": args.base_classes, "novel_classes": args.novel_classes,
                "split": args.split, "eval_limit": args.eval_limit, "checkpoint": args.checkpoint,
                "fewshot_dir": None if args.fewshot_dir is None else os.path.abspath(args.fewshot_dir),
                "train_options": train_flags(train_args)}
    check_sweep_dir(out, settings)
    ds = read_dataset(args.data, args.image_root, parse_classes(args.classes), frames=train_args.frames,
                      multi_label=True if train_args.multi_label else None, uncertain=train_args.uncertain)
    ds.split(args.split)  # the evaluation split exists
    single_only = [m for m in methods if m not in multilabel.METHODS]
    if ds.multi_label and (b2n or single_only):
        raise NearlError(f"{args.data} is multi-label: --base-to-novel and the methods {single_only} are single-label "
                         f"only (use {', '.join(multilabel.METHODS)})")
    if b2n and args.fewshot_dir is not None:
        raise NearlError("--fewshot-dir gives the shots of all classes; it does not combine with --base-to-novel "
                         "(leave one out)")
    train_ds = ds
    if b2n:
        base, _ = split_base_novel(ds.class_names, parse_classes(args.base_classes), parse_classes(args.novel_classes))
        train_ds = restrict(ds, base)
    for seed in seeds:  # K above a class's count (or a missing selection file) fails now, not after hours of runs
        if args.fewshot_dir is None:
            sample_shots(train_ds, shots[-1], seed)
        else:
            for k in shots:
                shots_from_selection(train_ds, selection_file(args.fewshot_dir, k, seed), k, seed)
    device = resolve_device(args.device)
    warnings.filterwarnings("once", category=RandomBackboneWarning)  # not once per run
    train.make_output_dir(out / "runs")
    with atomic_output(out / "sweep.json") as tmp:
        tmp.write_text(json.dumps(settings, indent=1) + "\n")
    config = {**resolved_options(build_parser(), args, skip=("max_runs",)),
              **resolved_options(train.build_parser(), train_args, skip=(*OWN_TRAIN_DESTS, "device", "config"))}
    write_config(out / "config.yaml", config, f"python -m nearl_rt.sweep --config {out / 'config.yaml'} runs this sweep")
    # every run reports to the sweep's MLflow store unless --tracking-uri names one
    mlflow = "mlflow" in parse_report_to(train_args.report_to)
    tracking_uri = train_args.tracking_uri or ((out / "mlruns").resolve().as_uri() if mlflow else None)

    grid = [(m, k, s) for m in methods for k in shots for s in seeds]
    runs, executed, started = [], 0, time.perf_counter()
    for i, (method, k, seed) in enumerate(grid, 1):
        run_dir = out / "runs" / run_name(method, k, seed)
        eval_file = run_dir / "eval.json"
        if eval_file.is_file():
            record = json.loads(eval_file.read_text())
            print(f"[{i}/{len(grid)}] {run_dir.name}: finished earlier, skipped", flush=True)
        else:
            if args.max_runs is not None and executed >= args.max_runs:
                print(f"stopping after {executed} run(s) (--max-runs); rerun the same command to continue", flush=True)
                break
            t0 = time.perf_counter()
            resume = (run_dir / "run.json").is_file()
            print(f"[{i}/{len(grid)}] {run_dir.name}: {'resuming' if resume else 'training'}", flush=True)
            train.run(argparse.Namespace(**{
                **vars(train_args), "data": args.data, "method": method, "shots": k, "seed": seed,
                "out": str(run_dir), "device": args.device, "image_root": args.image_root, "classes": args.classes,
                "base_to_novel": b2n, "base_classes": args.base_classes, "novel_classes": args.novel_classes,
                "resume": resume, "tracking_uri": tracking_uri,
                "fewshot_file": None if args.fewshot_dir is None else selection_file(args.fewshot_dir, k, seed)}))
            scored = run_dir / f"{args.checkpoint}.pt"
            metrics = evaluate_run(scored, ds, args, b2n, device)
            with Tracker(train_args.report_to, run_dir, tracking_uri) as tracker:
                tracker.metrics(eval_scalars(metrics, args.split), 0)
            ckpt = read_checkpoint(scored)
            record = {"method": method, "shots": k, "seed": seed, "run_dir": str(run_dir), "checkpoint": scored.name,
                      "val_accuracy": (ckpt.get("extra") or {}).get("val_accuracy"),
                      "random_backbone": ckpt["backbone"].get("sha256") is None,
                      "wall_s": time.perf_counter() - t0, "metrics": metrics}
            with atomic_output(eval_file) as tmp:
                tmp.write_text(json.dumps(record, indent=1) + "\n")
            executed += 1
            per_run = (time.perf_counter() - started) / executed
            remaining = sum(1 for m, kk, s in grid[i:] if not (out / "runs" / run_name(m, kk, s) / "eval.json").is_file())
            key = "macro_auroc" if metrics.get("multi_label") else "hm_accuracy" if b2n else "accuracy"
            print(f"[{i}/{len(grid)}] {run_dir.name}: {key} {metrics[key]:.4f} in {_duration(record['wall_s'])}; "
                  f"{i} of {len(grid)} runs done, ETA {_duration(per_run * remaining)}", flush=True)
        runs.append(record)
    summary = write_results(out, settings, runs, methods, shots, b2n, len(grid), args.bootstrap)
    with Tracker(train_args.report_to, out, tracking_uri) as tracker:
        tracker.params(config)
        for method, per_k in summary.items():
            for k, cell in per_k.items():
                tracker.metrics({f"{method}/{key}_{stat}": cell[key][stat] for key in cell if key != "runs"
                                 for stat in ("mean", "std") if math.isfinite(cell[key][stat])}, int(k))
        if (out / "accuracy_vs_shots.png").is_file():
            tracker.artifact(out / "accuracy_vs_shots.png")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'accuracy_vs_shots.png'} "
          f"({len(runs)} of {len(grid)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt.sweep"))
