"""`python -m nearl_rt.evaluate CKPT... --data PATH --split test`: accuracy, macro-F1, balanced accuracy,
one-vs-rest AUROC and AUPRC, per-class accuracy and the confusion matrix of a checkpoint (or run directory,
which means its best.pt) or of an exported .onnx file (fp32, fp16 or int8, scored with onnxruntime, as it
is served); with the model's calibration: the expected calibration error before and after its temperature,
and sensitivity, specificity, PPV, NPV and F1 at its stored operating point (or one fitted now by
`--operating-point RULE` on `--fit-split`); 95 % intervals by a stratified bootstrap (`--bootstrap N`).
`--predictions FILE.csv` writes one row per image, `--plots DIR` the ROC, precision-recall and reliability
diagrams. Several checkpoints, or one path with `{seed}` and `--seeds 0 1 2`, are evaluated one by one and
summarised as mean ± std. docs/evaluation.md defines every number.

`--classes a,b,c` scores that class set (images matched by class name; default: the checkpoint's own
classes). `--base-to-novel` scores base-test images among the base classes and novel-test images among
the novel classes (the split recorded at training, or `--base-classes` / `--novel-classes`) and reports
the harmonic mean of the two.

Multi-label models (findings) report per-finding and macro AUROC / AUPRC, per-finding sensitivity, specificity and
F1 at their thresholds, subset accuracy and Hamming loss on the known labels (nearl_rt.multilabel), with
bootstrap intervals for the AUROC / AUPRC; `--predictions` writes per finding its label, probability, logit and
decision."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nearl_rt.calibration import ECE_BINS, Calibration, OperatingPointRule, decision_classes, fit_thresholds
from nearl_rt.core.imaging import DEFAULT_POLICY, Frame, IntensityPolicy
from nearl_rt.core.atomic import atomic_output
from nearl_rt.classifier import Classifier, load_classifier, resolve_device
from nearl_rt.classsets import dataset_for_classes, split_base_novel
from nearl_rt.core.cli import run_cli
from nearl_rt.data import (DataError, Dataset, Preprocess, Split, add_inference_arguments, add_label_arguments,
                           dataset_from_args, finding_columns, intensity_from_args, parse_classes, skip_summary)
from nearl_rt import multilabel
from nearl_rt.core.errors import NearlError
from nearl_rt.metrics import DEFAULT_RESAMPLES, SUMMARY_KEYS, aggregate, evaluation_metrics, harmonic_mean
from nearl_rt.plots import write_evaluation_plots
from nearl_rt.sampling import balanced_subset

PARTS = ("base", "novel", "hm")
B2N_KEYS = tuple(f"{part}_{k}" for part in PARTS for k in SUMMARY_KEYS)  # flat base/novel/HM summary keys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.evaluate", description=__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoint file, run directory or exported .onnx file; may hold {seed}")
    p.add_argument("--seeds", type=int, nargs="+", help="fill {seed} in CKPT with each of these")
    p.add_argument("--data", required=True, help="image folder tree, split .json, or MedMNIST .npz")
    p.add_argument("--image-root", help="folder the split JSON's paths are relative to")
    p.add_argument("--classes", help="comma-separated class names to score (default: the checkpoint's classes)")
    p.add_argument("--data-classes", help="comma-separated names of the dataset's labels (default: from the data)")
    add_label_arguments(p)
    p.add_argument("--base-to-novel", action="store_true",
                   help="score base and novel classes separately and report their harmonic mean")
    p.add_argument("--base-classes", help="comma-separated base classes (default: as recorded at training)")
    p.add_argument("--novel-classes", help="comma-separated novel classes (default: the other classes)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="evaluate a fixed class-balanced subset of N images (the first of each class)")
    add_inference_arguments(p)
    p.add_argument("--operating-point", metavar="RULE",
                   help="youden, sensitivity=X or specificity=X: fit the decision thresholds by this rule on "
                        "--fit-split now (default: the thresholds stored with the model)")
    p.add_argument("--fit-split", default="val", help="labelled split --operating-point is fitted on (default: val)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                   help=f"resamples of the stratified bootstrap behind the 95%% intervals (default {DEFAULT_RESAMPLES}; "
                        f"0: no intervals)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument("--predictions", metavar="FILE.csv",
                   help="write one row per image: identifier, true class, predicted class, every class's probability "
                        "and logit")
    p.add_argument("--plots", metavar="DIR", help="write roc.png, pr.png and reliability.png into DIR")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    return p


def expand_checkpoints(paths: list, seeds) -> list:
    if seeds is None:
        missing = [p for p in paths if "{seed}" in p]
        if missing:
            raise NearlError(f"{missing[0]} holds {{seed}}: pass --seeds, e.g. --seeds 0 1 2")
        return paths
    if not all("{seed}" in p for p in paths):
        raise NearlError("--seeds needs '{seed}' in every CKPT path, e.g. runs/nearl_s{seed}")
    return [p.replace("{seed}", str(s)) for p in paths for s in seeds]


def format_result(name: str, m: dict) -> str:
    if "base" in m:
        lines = [f"{name}: base-to-novel"]
        for part in ("base", "novel"):
            lines.append("  " + format_result(f"{part} {m[part]['class_names']}", m[part]).replace("\n", "\n  "))
        lines += [f"  {'harmonic mean ' + k:>27}: {m['hm_' + k]:.4f}" for k in SUMMARY_KEYS]
        return "\n".join(lines)
    ci = m.get("ci95", {})
    lines = [f"{name}: {m['num_images']} images" + (" (95% intervals: stratified bootstrap, "
                                                     f"{m['bootstrap']['resamples']} resamples)" if ci else "")]
    lines += [f"  {k:>18}: {with_interval(m[k], ci.get(k))}" for k in SUMMARY_KEYS]
    lines += [f"  accuracy[{c}]: {'n/a' if a is None else f'{a:.4f}'}" for c, a in m["per_class_accuracy"].items()]
    lines.append(f"  confusion (rows true, cols predicted): {m['confusion_matrix']}")
    lines.append(f"  calibration: temperature {m['temperature']:.4g} ({m['calibration']['temperature']}); ECE "
                 f"({ECE_BINS} bins) {m['ece']:.4f} uncalibrated -> {m['ece_calibrated']:.4f} calibrated")
    points = {c: v for c, v in m["per_class"].items() if "threshold" in v}
    if not points:
        lines.append(f"  operating point: none ({m['calibration']['operating_point']})")
    else:
        lines.append(f"  operating point {m['operating_point']} ({m['calibration']['operating_point']}):")
    for c, v in points.items():
        ci_c = v.get("ci95", {})
        rates = ", ".join(f"{label} {with_interval(v[k], ci_c.get(k), 3)}" for k, label in (
            ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV"), ("f1", "F1")))
        lines.append(f"    {c} (p >= {v['threshold']:.4f}): {rates} (TP {v['tp']}, FP {v['fp']}, TN {v['tn']}, "
                     f"FN {v['fn']})")
    return "\n".join(lines)


def with_interval(value, interval=None, digits: int = 4) -> str:
    """`0.912 [0.887, 0.934]` (3 decimals with an interval), `0.9120` without; `n/a` for None."""
    if value is None:
        return "n/a"
    if interval is None:
        return f"{value:.{digits}f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


@dataclass
class Scored:
    """One class set's images of a split as a model scored them."""
    split: str
    class_names: list
    images: list             # identifiers: the file path (or FILE:frame=N), or DATA:SPLIT:INDEX for arrays
    labels: np.ndarray       # int64 [N], indices into class_names
    logits: np.ndarray       # raw, [N, C]
    skipped: list


def score_split_of(classifier, ds: Dataset, classes: Sequence[str], split: str, *, explicit: bool = True,
                   limit: Optional[int] = None, batch_size: int = 64, skip_bad: bool = False,
                   intensity: IntensityPolicy = DEFAULT_POLICY) -> Scored:
    """The raw logits of `classifier` scoring class set `classes` on the images of those classes in `split`
    (files read with the intensity policy `intensity`: the checkpoint's, see data.intensity_from_args)."""
    classifier.set_classes(classes)
    full = ds.split(split)
    part = dataset_for_classes(ds, classes, explicit).split(split)
    if limit is not None:
        part = part.subset(balanced_subset(part.labels, limit))
    if len(part) == 0:
        raise DataError(f"the {split} split of {ds.path} has no images of classes {list(classes)}")
    preprocess = Preprocess(classifier.preprocess_cfg, intensity=intensity)
    logits, kept, skipped = classifier.split_logits(part, preprocess, batch_size, skip_bad)
    names = image_names(ds, split, full, part)
    return Scored(split, list(classifier.class_names), [names[i] for i in kept], part.labels[kept], logits, skipped)


def image_names(ds: Dataset, split: str, full: Split, part: Split) -> list:
    """Identifiers of `part`'s images: the file path (or FILE:frame=N), or DATA:SPLIT:INDEX for arrays (class
    subsets and limits keep the split's source objects: an array image is named by its place in `full`)."""
    position = {id(src): i for i, src in enumerate(full.sources)}
    return [src if isinstance(src, str) else str(src) if isinstance(src, Frame) else
            f"{ds.path}:{split}:{position[id(src)]}" for src in part.sources]


def score_findings(classifier, ds: Dataset, split: str, *, limit: Optional[int] = None, batch_size: int = 64,
                   skip_bad: bool = False, intensity: IntensityPolicy = DEFAULT_POLICY) -> Scored:
    """A multi-label classifier's raw per-finding logits on `split` (its first `limit` images), labels [N, F]."""
    full = finding_columns(ds, classifier.class_names).split(split)
    part = full.subset(range(min(limit, len(full)))) if limit is not None else full
    if len(part) == 0:
        raise DataError(f"the {split} split of {ds.path} has no images")
    logits, kept, skipped = classifier.split_logits(part, Preprocess(classifier.preprocess_cfg, intensity=intensity),
                                                    batch_size, skip_bad)
    names = image_names(ds, split, full, part)
    return Scored(split, list(classifier.class_names), [names[i] for i in kept], part.labels[kept], logits, skipped)


def evaluate_findings(classifier, ds: Dataset, split: str, *, limit=None, batch_size=64, skip_bad=False,
                      intensity=DEFAULT_POLICY, operating_point=None, fit_split="val", resamples=DEFAULT_RESAMPLES,
                      seed=0) -> tuple[dict, Scored]:
    """A multi-label model's metrics (nearl_rt.multilabel) at its stored per-finding thresholds, or at thresholds
    fitted now by `operating_point` on `fit_split`."""
    kw = dict(batch_size=batch_size, skip_bad=skip_bad, intensity=intensity)
    scored = score_findings(classifier, ds, split, limit=limit, **kw)
    calibration = classifier.calibration
    thresholds, source = dict(calibration.thresholds), "stored with the model"
    if operating_point is not None and str(operating_point) != calibration.operating_point:
        reference = score_findings(classifier, ds, fit_split, **kw)
        thresholds, unfitted = multilabel.fit_finding_thresholds(
            reference.labels, calibration.probabilities(reference.logits), scored.class_names, operating_point)
        source = f"{operating_point}, fitted now on the {fit_split} split, {len(reference.labels)} images; not stored"
        if unfitted:
            source += f" (none for {unfitted}: 0.5)"
    m = multilabel.multilabel_metrics(scored.labels, calibration.probabilities(scored.logits), scored.class_names,
                                      thresholds, resamples=resamples, seed=seed)
    m.update(multi_label=True, operating_point=operating_point and str(operating_point) or calibration.operating_point,
             calibration={"operating_point": source if calibration.fitted or operating_point else
                          "none stored: 0.5 per finding", "fitted_on": calibration.fitted_on},
             skipped_images=scored.skipped)
    return m, scored


def write_finding_predictions(path: Path, classifier, m: dict, scored: Scored) -> None:
    """The per-image CSV of a multi-label evaluation (multilabel.write_predictions) at the thresholds it fitted."""
    thresholds = {f: v["threshold"] for f, v in m["per_finding"].items() if v["threshold_fitted"]}
    multilabel.write_predictions(path, scored.images, scored.labels, scored.logits,
                                 classifier.calibration.probabilities(scored.logits), scored.class_names, thresholds)


def resolve_operating_point(classifier, scored: Scored, rule: Optional[OperatingPointRule], fit) -> tuple:
    """(the Calibration to report with, what its temperature and thresholds are): the model's stored one, or with
    `rule` (when it is not the stored rule) thresholds fitted now on `fit()`'s images (a Scored of the fit split)
    under the stored temperature."""
    stored: Calibration = classifier.calibration
    fitted_on = stored.fitted_on or {}
    where = f"fitted on the {fitted_on['split']} split, {fitted_on['images']} images" if "split" in fitted_on else \
        "stored with the model"
    source = {"temperature": where if stored.fitted else "the model is not calibrated: temperature 1"}
    if rule is None or str(rule) == stored.operating_point:
        need = [scored.class_names[c] for c in decision_classes(scored.class_names)]
        missing = [c for c in need if c not in stored.thresholds]
        source["operating_point"] = where if not missing else (
            f"no stored threshold for {missing}: pass --operating-point RULE, or calibrate the checkpoint with "
            f"`python -m nearl_rt.calibrate`")
        return stored, source
    reference = fit()
    thresholds = fit_thresholds(reference.labels, stored.probabilities(reference.logits), scored.class_names, rule)
    source["operating_point"] = (f"fitted now on the {reference.split} split, {len(reference.labels)} images; "
                                 f"not stored")
    return Calibration(stored.temperature, str(rule), thresholds, stored.fitted_on), source


def score_classes(classifier, ds: Dataset, classes: Sequence[str], split: str, *, explicit: bool = True,
                  limit: Optional[int] = None, batch_size: int = 64, skip_bad: bool = False,
                  intensity: IntensityPolicy = DEFAULT_POLICY, operating_point: Optional[OperatingPointRule] = None,
                  fit_split: str = "val", resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[dict, Scored]:
    """Metrics of `classifier` on class set `classes` in `split` (see score_split_of and evaluation_metrics;
    `operating_point`: a rule to fit thresholds by on `fit_split` instead of the stored ones). Returns
    (metrics, the scored images)."""
    kw = dict(explicit=explicit, batch_size=batch_size, skip_bad=skip_bad, intensity=intensity)
    scored = score_split_of(classifier, ds, classes, split, limit=limit, **kw)

    def fit() -> Scored:
        try:
            reference = score_split_of(classifier, ds, classes, fit_split, **kw)
        except DataError as e:
            raise DataError(f"--operating-point is fitted on --fit-split {fit_split}: {e}") from None
        if fit_split == split:
            print(f"warning: the operating point is fitted on the {split} split it is evaluated on: its sensitivity "
                  f"and specificity there are optimistic", file=sys.stderr)
        return reference

    calibration, source = resolve_operating_point(classifier, scored, operating_point, fit)
    m = evaluation_metrics(scored.labels, scored.logits, scored.class_names, calibration, resamples=resamples,
                           seed=seed)
    m["calibration"] = {**source, "fitted_on": calibration.fitted_on}
    m["skipped_images"] = scored.skipped
    return m, scored


def evaluate_classifier(classifier: Classifier, extra: dict, ds: Dataset, split: str, *, classes=None,
                        base_to_novel: bool = False, base=None, novel=None, **kw) -> tuple[dict, dict]:
    """One run's metrics: on `classes` (default: its own), or base, novel and their harmonic means. Returns
    (metrics, {"all" or "base"/"novel": Scored})."""
    if not (base_to_novel or base is not None):
        own = classes is None
        m, scored = score_classes(classifier, ds, classifier.class_names if own else classes, split,
                                  explicit=not own, **kw)
        return m, {"all": scored}
    if classes is not None:
        raise NearlError("--classes and --base-to-novel exclude each other (use --base-classes / --novel-classes)")
    if base is None and extra.get("base_classes"):
        base, novel = extra["base_classes"], extra["novel_classes"]
    base, novel = split_base_novel(ds.class_names, base, novel)
    (m_base, s_base), (m_novel, s_novel) = (score_classes(classifier, ds, part, split, **kw) for part in (base, novel))
    m = {"base": m_base, "novel": m_novel}
    for k in SUMMARY_KEYS:
        m[f"base_{k}"], m[f"novel_{k}"] = m["base"][k], m["novel"][k]
        m[f"hm_{k}"] = harmonic_mean(m["base"][k], m["novel"][k])
    return m, {"base": s_base, "novel": s_novel}


def reported_calibration(m: dict) -> Calibration:
    """The temperature and thresholds evaluation_metrics reported `m` with."""
    return Calibration(m["temperature"], m["operating_point"],
                       {c: v["threshold"] for c, v in m["per_class"].items() if "threshold" in v})


def write_predictions(path: Path, scored: Scored, calibration: Calibration) -> None:
    """The per-image CSV: image, label, predicted (argmax), decision (binary models with a threshold: the class
    decided at it), prob_<class> (calibrated) and logit_<class> (raw) for every class, at full precision."""
    names, thresholds = scored.class_names, calibration.thresholds
    calibration_probs = calibration.probabilities(scored.logits)
    positive = names[1] if len(names) == 2 and names[1] in thresholds else None
    header = ["image", "label", "predicted"] + (["decision"] if positive else []) + \
        [f"prob_{c}" for c in names] + [f"logit_{c}" for c in names]
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for image, label, p, z in zip(scored.images, scored.labels, calibration_probs, scored.logits):
            decision = [names[int(p[1] >= thresholds[positive])]] if positive else []
            w.writerow([image, names[label], names[int(np.argmax(p))], *decision, *map(repr, map(float, p)),
                        *map(repr, map(float, z))])


def read_predictions(path: Path, class_names: Sequence[str]) -> tuple[list, np.ndarray, np.ndarray]:
    """(images, labels [N], calibrated probs [N, C]) of a file write_predictions wrote for these classes."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = list(class_names)
    labels = np.array([names.index(r["label"]) for r in rows], dtype=np.int64)
    probs = np.array([[float(r[f"prob_{c}"]) for c in names] for r in rows], dtype=np.float64).reshape(len(rows), -1)
    return [r["image"] for r in rows], labels, probs


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def run(args: argparse.Namespace) -> dict:
    """Evaluate with build_parser's options, print the results (and write --json): the library entry point behind
    `python -m nearl_rt.evaluate`. Returns the report."""
    if args.limit is not None and args.limit < 1:
        raise NearlError(f"--limit must be >= 1, got {args.limit}")
    if args.bootstrap != 0 and args.bootstrap < DEFAULT_RESAMPLES:
        raise NearlError(f"--bootstrap {args.bootstrap}: use 0 (no intervals) or at least {DEFAULT_RESAMPLES} "
                         f"resamples (fewer make the 95% interval's ends noisy)")
    rule = OperatingPointRule.parse(args.operating_point) if args.operating_point else None
    for option, value in (("--json", args.json), ("--predictions", args.predictions), ("--plots", args.plots)):
        if value and not Path(value).resolve().parent.is_dir():  # fail before the (slow) evaluation
            raise NearlError(f"cannot write {option} {value}: directory {Path(value).parent} does not exist")
    if args.plots and Path(args.plots).exists() and not Path(args.plots).is_dir():
        raise NearlError(f"--plots {args.plots} is a file; give a directory")
    checkpoints = expand_checkpoints(args.checkpoints, args.seeds)
    b2n = args.base_to_novel or args.base_classes is not None
    per_image = [o for o, v in (("--predictions", args.predictions), ("--plots", args.plots)) if v]
    if per_image and (len(checkpoints) > 1 or b2n):
        raise NearlError(f"{' and '.join(per_image)} describe one model on one class set: evaluate one checkpoint "
                         f"without --base-to-novel")
    ds = dataset_from_args(args, args.data_classes)
    device = resolve_device(args.device)
    results = {}
    multi = False
    for ckpt in checkpoints:
        classifier, extra = load_classifier(ckpt, pretrained=args.pretrained, backend=args.backend, device=device)
        if classifier.multi_label:
            multi = evaluate_multilabel(args, ckpt, classifier, extra, ds, results, b2n)
            continue
        if ds.multi_label:
            raise DataError(f"{ckpt} is a single-label model of classes {classifier.class_names}; {args.data} holds "
                            f"multi-label findings {ds.class_names}: evaluate a model trained on them")
        m, parts = evaluate_classifier(classifier, extra, ds, args.split, classes=parse_classes(args.classes),
                                       base_to_novel=b2n, base=parse_classes(args.base_classes),
                                       novel=parse_classes(args.novel_classes), limit=args.limit,
                                       batch_size=args.batch_size, skip_bad=args.skip_bad_images,
                                       intensity=intensity_from_args(args, extra.get("intensity"), ckpt),
                                       operating_point=rule, fit_split=args.fit_split, resamples=args.bootstrap,
                                       seed=args.bootstrap_seed)
        m.update(method=extra.get("method", "nearl"), split=args.split,
                 random_backbone=bool(classifier.random_backbone))
        results[ckpt] = m
        print(format_result(ckpt, m), flush=True)
        skipped = m["base"]["skipped_images"] + m["novel"]["skipped_images"] if b2n else m["skipped_images"]
        if skipped:
            print(f"  {skip_summary(skipped)}")
        if per_image:
            write_per_image(args, ckpt, m, parts["all"])
    report = {"data": args.data, "split": args.split, "results": results}
    if len(results) > 1:
        keys = multilabel.SUMMARY_KEYS if multi else B2N_KEYS if b2n else SUMMARY_KEYS
        report["summary"] = aggregate(list(results.values()), keys)
        print(f"mean ± std over {len(results)} runs:")
        for k in keys:
            print(f"  {k:>20}: {report['summary'][k]['mean']:.4f} ± {report['summary'][k]['std']:.4f}")
    if args.json:
        with atomic_output(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report


def evaluate_multilabel(args, ckpt: str, classifier, extra: dict, ds: Dataset, results: dict, b2n: bool) -> bool:
    """evaluate's branch for a multi-label model: print (and keep in `results`) its metrics, write --predictions."""
    if b2n or args.classes or args.plots:
        raise NearlError(f"{ckpt} is multi-label: --base-to-novel, --classes and --plots are single-label only")
    m, scored = evaluate_findings(classifier, ds, args.split, limit=args.limit, batch_size=args.batch_size,
                                  skip_bad=args.skip_bad_images,
                                  intensity=intensity_from_args(args, extra.get("intensity"), ckpt),
                                  operating_point=OperatingPointRule.parse(args.operating_point) if args.operating_point
                                  else None, fit_split=args.fit_split, resamples=args.bootstrap,
                                  seed=args.bootstrap_seed)
    m.update(method=extra.get("method", "nearl"), split=args.split, random_backbone=bool(classifier.random_backbone))
    results[ckpt] = m
    print(multilabel.format_metrics(ckpt, m), flush=True)
    if m["skipped_images"]:
        print(f"  {skip_summary(m['skipped_images'])}")
    if args.predictions:
        write_finding_predictions(Path(args.predictions), classifier, m, scored)
        print(f"wrote {args.predictions} ({len(scored.labels)} images)")
    return True


def write_per_image(args, name: str, m: dict, scored: Scored) -> None:
    """--predictions and --plots for one evaluated model (m: its metrics)."""
    if args.predictions:
        write_predictions(Path(args.predictions), scored, reported_calibration(m))
        print(f"wrote {args.predictions} ({len(scored.labels)} images)")
    if args.plots:
        title = f"{name}, {args.split} split ({len(scored.labels)} images)"
        for path in write_evaluation_plots(Path(args.plots), scored.labels, scored.logits, scored.class_names, m,
                                           title, random_backbone=m["random_backbone"]):
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt.evaluate"))
