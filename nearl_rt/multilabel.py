"""Multi-label findings: the masked loss, per-finding operating points, the metrics and the per-image CSV.

Labels are int [N, F]: 1 present, 0 absent, -1 unknown (nearl_rt.data.UNKNOWN). An unknown entry is masked out of
everything here: the loss, the thresholds and every metric see only the known (image, finding) entries.
A model's per-finding logit is its positive prompt's logit minus its negative prompt's (NearlCLIP.set_findings);
the probability is sigmoid(logit / temperature) = softmax over the pair. Multi-label models keep temperature 1
(no temperature is fitted); their thresholds are fitted per finding on the validation images (youden by default).

Metrics (scikit-learn, each finding on its known entries): AUROC (roc_auc_score), AUPRC (average_precision_score),
and at the finding's threshold (positive when p >= t; 0.5 when it has none) sensitivity, specificity and F1
(f1_score); macro = the mean over the findings where the value is defined (a finding whose known entries are all
one class has no AUROC). Example-based: subset accuracy = the fraction of images whose every known finding is
decided right (accuracy_score on the decisions, unknown entries counted as right), Hamming loss = the fraction of
known entries decided wrong (hamming_loss over the known entries). 95 % intervals for the per-finding and macro
AUROC and AUPRC: a stratified percentile bootstrap (`resamples`, seeded; bootstrap_auc_intervals).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch.nn.functional as F
from sklearn import metrics as skm

from nearl_rt.calibration import Calibration, CalibrationError, OperatingPointRule, fit_threshold
from nearl_rt.checkpoint import update_extra
from nearl_rt.core.atomic import atomic_output
from nearl_rt.data import UNKNOWN
from nearl_rt.metrics import auroc_batch, average_precision_batch
DEFAULT_THRESHOLD = 0.5
METHODS = ("nearl", "zeroshot", "linear_probe")  # the few-shot methods that score findings (the others: single-label)
SUMMARY_KEYS = ("macro_auroc", "macro_auprc", "macro_f1", "subset_accuracy", "hamming_loss")


def known(labels) -> np.ndarray:
    return np.asarray(labels) != UNKNOWN


def masked_bce(logits, labels, reduction: str = "mean"):
    """Binary cross-entropy of per-finding logits [B, F] (torch) against labels [B, F] (1 / 0 / -1), unknown
    entries weighted 0. reduction "sum": summed over images of the per-image mean over the F findings (so a batch
    mean is sum / B whatever is unknown); "mean": that / B."""
    mask = (labels != UNKNOWN).to(logits.dtype)
    per_entry = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).to(logits.dtype), weight=mask,
                                                   reduction="none")
    total = per_entry.sum() / logits.shape[1]
    return total if reduction == "sum" else total / max(1, logits.shape[0])


def entry_hits(logits, labels) -> tuple[int, int]:
    """(known entries decided right at p >= 0.5, known entries) of torch logits [B, F] and labels [B, F]."""
    mask = labels != UNKNOWN
    return int(((logits >= 0) == (labels == 1))[mask].sum()), int(mask.sum())


def fit_finding_thresholds(labels, probs, names: Sequence[str], rule: OperatingPointRule) -> tuple[dict, list]:
    """({finding: threshold} fitted by `rule` on each finding's known entries, [findings left without one: their
    known entries are all one class])."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    thresholds, unfitted = {}, []
    for f, name in enumerate(names):
        k = labels[:, f] != UNKNOWN
        try:
            thresholds[name] = fit_threshold(labels[k, f] == 1, probs[k, f], rule, f"finding {name!r}")
        except CalibrationError:
            unfitted.append(name)
    return thresholds, unfitted


def calibrate_findings(path, logits, labels, names: Sequence[str], rule: OperatingPointRule,
                       fitted_on: dict) -> tuple[Calibration, list]:
    """Fit per-finding thresholds by `rule` on held-out raw logits [N, F] and labels [N, F] (temperature 1) and store
    them in the checkpoint `path` (extra["calibration"], atomically). Returns (Calibration, findings left without a
    threshold)."""
    probs = Calibration(multi_label=True).probabilities(logits)
    thresholds, unfitted = fit_finding_thresholds(labels, probs, names, rule)
    calibration = Calibration(1.0, str(rule), thresholds, {**fitted_on, "images": int(len(labels))}, multi_label=True)
    update_extra(path, {"calibration": calibration.to_dict()})
    return calibration, unfitted


def describe(calibration: Calibration, unfitted: list) -> str:
    """One line: the rule and the per-finding thresholds."""
    shown = ", ".join(f"p({c}) >= {t:.4f}" for c, t in calibration.thresholds.items())
    missing = f"; none for {unfitted} (their fit labels are all one class): {DEFAULT_THRESHOLD}" if unfitted else ""
    return f"operating point {calibration.operating_point} per finding (temperature 1): {shown}{missing}"


def decisions(probs, names: Sequence[str], thresholds: dict) -> np.ndarray:
    """bool [N, F]: p >= the finding's threshold (DEFAULT_THRESHOLD without one)."""
    t = np.asarray([thresholds.get(n, DEFAULT_THRESHOLD) for n in names], dtype=np.float64)
    return np.asarray(probs) >= t


def _finding_scores(labels, probs, decided) -> dict:
    """One finding's metrics on its known entries (None where undefined)."""
    k = labels != UNKNOWN
    y, p, d = labels[k] == 1, probs[k], decided[k]
    both = 0 < y.sum() < len(y)
    tp, fp = int((d & y).sum()), int((d & ~y).sum())
    tn, fn = int((~d & ~y).sum()), int((~d & y).sum())
    return {"known": int(k.sum()), "positives": int(y.sum()),
            "auroc": float(skm.roc_auc_score(y, p)) if both else None,
            "auprc": float(skm.average_precision_score(y, p)) if y.any() else None,
            "sensitivity": tp / (tp + fn) if tp + fn else None, "specificity": tn / (tn + fp) if tn + fp else None,
            "f1": float(skm.f1_score(y, d, zero_division=0.0)) if len(y) else None,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _macro(values) -> Optional[float]:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def multilabel_metrics(labels, probs, names: Sequence[str], thresholds: Optional[dict] = None, *,
                       resamples: int = 0, seed: int = 0) -> dict:
    """Per-finding and macro AUROC / AUPRC / F1 / sensitivity / specificity, subset accuracy and Hamming loss of
    probabilities [N, F] against labels [N, F] (see the module doc); `resamples` > 0 adds "ci95"."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    if labels.shape != probs.shape or labels.ndim != 2 or labels.shape[1] != len(names):
        raise ValueError(f"labels {labels.shape} and probs {probs.shape} must both be [N, {len(names)}]")
    thresholds = dict(thresholds or {})
    decided = decisions(probs, names, thresholds)
    per = {n: {**_finding_scores(labels[:, f], probs[:, f], decided[:, f]),
               "threshold": thresholds.get(n, DEFAULT_THRESHOLD), "threshold_fitted": n in thresholds}
           for f, n in enumerate(names)}
    mask = known(labels)
    truth = labels == 1
    m = {"num_images": int(len(labels)), "findings": list(names), "per_finding": per,
         "macro_auroc": _macro(v["auroc"] for v in per.values()),
         "macro_auprc": _macro(v["auprc"] for v in per.values()),
         "macro_f1": _macro(v["f1"] for v in per.values()),
         "macro_sensitivity": _macro(v["sensitivity"] for v in per.values()),
         "macro_specificity": _macro(v["specificity"] for v in per.values()),
         "subset_accuracy": float(skm.accuracy_score(truth, np.where(mask, decided, truth))),
         "hamming_loss": float(skm.hamming_loss(truth[mask], decided[mask])) if mask.any() else None,
         "known_entries": int(mask.sum())}
    if resamples:
        m["ci95"] = bootstrap_auc_intervals(labels, probs, names, resamples, seed)
        m["bootstrap"] = {"resamples": resamples, "seed": seed, "kind": "percentile, stratified per finding"}
    return m


def bootstrap_auc_intervals(labels, probs, names: Sequence[str], resamples: int, seed: int) -> dict:
    """95 % percentile intervals of the per-finding and macro AUROC / AUPRC: per finding, its known entries
    resampled `resamples` times stratified by label (positives and negatives each drawn with replacement, so every
    resample has both, as the single-label evaluation's bootstrap); the macro interval is over the per-draw means
    of the findings that have both classes. Vectorised (nearl_rt.metrics' batch forms of scikit-learn's values)."""
    rng = np.random.default_rng(seed)
    draws = {}
    for f, name in enumerate(names):
        k = labels[:, f] != UNKNOWN
        y, p = labels[k, f] == 1, probs[k, f]
        pos, neg = p[y], p[~y]
        if not len(pos) or not len(neg):
            continue
        scores = np.concatenate([rng.choice(pos, (resamples, len(pos))), rng.choice(neg, (resamples, len(neg)))], 1)
        positive = np.arange(scores.shape[1]) < len(pos)
        draws[name] = {"auroc": auroc_batch(scores, positive), "auprc": average_precision_batch(scores, positive)}
    out = {}
    for key in ("auroc", "auprc"):
        for name, d in draws.items():
            out[f"{key}[{name}]"] = [float(v) for v in np.percentile(d[key], [2.5, 97.5])]
        if draws:
            macro = np.mean([d[key] for d in draws.values()], axis=0)
            out[f"macro_{key}"] = [float(v) for v in np.percentile(macro, [2.5, 97.5])]
    return out


def format_metrics(name: str, m: dict) -> str:
    ci = m.get("ci95", {})

    def show(v, key=None):
        if v is None:
            return "n/a"
        return f"{v:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if key in ci else f"{v:.4f}"

    lines = [f"{name}: {m['num_images']} images, {len(m['findings'])} findings (multi-label; {m['known_entries']} "
             f"known labels)"]
    lines += [f"  {k:>18}: {show(m[k], k)}" for k in SUMMARY_KEYS]
    lines.append(f"  {'finding':>18}  known  pos  AUROC  AUPRC  threshold  sens   spec   F1")
    for f, v in m["per_finding"].items():
        t = f"{v['threshold']:.4f}" + ("" if v["threshold_fitted"] else "*")
        cells = " ".join(f"{'n/a' if v[k] is None else f'{v[k]:.3f}':>6}" for k in ("auroc", "auprc"))
        rates = " ".join(f"{'n/a' if v[k] is None else f'{v[k]:.3f}':>6}" for k in ("sensitivity", "specificity", "f1"))
        lines.append(f"  {f:>18}  {v['known']:>5} {v['positives']:>4} {cells}  {t:>9} {rates}")
        for key in ("auroc", "auprc"):
            if f"{key}[{f}]" in ci:
                lines.append(f"  {'':>18}  {key.upper()} 95% [{ci[f'{key}[{f}]'][0]:.3f}, {ci[f'{key}[{f}]'][1]:.3f}]")
    if any(not v["threshold_fitted"] for v in m["per_finding"].values()):
        lines.append(f"  * no fitted threshold (its fit images were all one class): {DEFAULT_THRESHOLD}")
    return "\n".join(lines)


def write_predictions(path: Path, images: Sequence[str], labels, logits, probs, names: Sequence[str],
                      thresholds: dict) -> None:
    """The per-image CSV: image, findings (those decided present, ';'-joined), then per finding its label (1 / 0 /
    blank = unknown), prob_ (calibrated), logit_ (raw) and decision (1 / 0 at its threshold), at full precision."""
    decided = decisions(probs, names, thresholds)
    header = ["image", "findings"] + [f"{k}_{n}" for n in names for k in ("label", "prob", "logit", "decision")]
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for image, y, p, z, d in zip(images, labels, probs, logits, decided):
            cells = []
            for j in range(len(names)):
                cells += ["" if y[j] == UNKNOWN else str(int(y[j])), repr(float(p[j])), repr(float(z[j])), str(int(d[j]))]
            w.writerow([image, ";".join(n for n, dj in zip(names, d) if dj), *cells])


def read_predictions(path: Path, names: Sequence[str]) -> tuple[list, np.ndarray, np.ndarray]:
    """(images, labels [N, F] with -1 unknown, probs [N, F]) of a file write_predictions wrote."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([[UNKNOWN if r[f"label_{n}"] == "" else int(r[f"label_{n}"]) for n in names] for r in rows],
                      dtype=np.int64).reshape(len(rows), len(names))
    probs = np.array([[float(r[f"prob_{n}"]) for n in names] for r in rows]).reshape(len(rows), len(names))
    return [r["image"] for r in rows], labels, probs
