"""Classification metrics from scikit-learn: accuracy, balanced accuracy, macro-F1, one-vs-rest AUROC and
AUPRC (average precision), per-class accuracy, confusion matrix; sensitivity, specificity, PPV, NPV and F1 at
an operating point; 95 % intervals by a stratified bootstrap (SciPy); mean ± std over runs; the harmonic mean
of base and novel scores. docs/evaluation.md defines every number."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from nearl_rt.calibration import Calibration, decision_classes, expected_calibration_error, softmax

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "auprc")
INTERVAL_KEYS = ("accuracy", "balanced_accuracy", "auc", "auprc")            # overall metrics with a ci95
CLASS_INTERVAL_KEYS = ("auc", "auprc", "sensitivity", "specificity")         # per-class metrics with a ci95
OPERATING_POINT_KEYS = ("threshold", "sensitivity", "specificity", "ppv", "npv", "f1", "tp", "fp", "tn", "fn")
DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95
_BOOTSTRAP_VALUES = 4_000_000  # probabilities held per bootstrap batch (resamples x images x classes): ~32 MB


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """cm[i, j] = number of images of true class i predicted as class j (every class gets a row)."""
    return skm.confusion_matrix(labels, preds, labels=np.arange(num_classes)).astype(np.int64)


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count 1/2); NaN when one class is absent."""
    positive = np.asarray(positive).astype(bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(skm.roc_auc_score(positive, scores))


def binary_auprc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (the step-wise area under the precision-recall curve); NaN when one class is absent."""
    positive = np.asarray(positive).astype(bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(skm.average_precision_score(positive, scores))


def _macro(values: list) -> float:
    return float("nan") if np.all(np.isnan(values)) else float(np.nanmean(values))


def _or_none(value: float):
    return None if value is None or math.isnan(value) else float(value)


def classification_metrics(labels, probs, class_names) -> dict:
    """All threshold-free metrics for integer labels [N] and class probabilities [N, C].

    Balanced accuracy averages the recall of the classes present in `labels`; macro-F1 averages over the
    classes present in the labels or the predictions (scikit-learn's conventions); the AUC (AUROC) and the
    AUPRC are one-vs-rest macro averages over the classes that have both positives and negatives."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    if probs.ndim != 2 or probs.shape != (len(labels), num_classes):
        raise ValueError(f"probs must be [{len(labels)}, {num_classes}], got {probs.shape}")
    if len(labels) == 0:
        raise ValueError("no images to evaluate")
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, num_classes)
    support = cm.sum(axis=1)
    recall = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    aucs = [binary_auc(labels == c, probs[:, c]) for c in range(num_classes)]
    auprcs = [binary_auprc(labels == c, probs[:, c]) for c in range(num_classes)]
    return {
        "num_images": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "balanced_accuracy": _balanced_accuracy(labels, preds),
        "macro_f1": float(skm.f1_score(labels, preds, average="macro", zero_division=0)),
        "auc": _macro(aucs),
        "auprc": _macro(auprcs),
        "per_class_accuracy": {n: _or_none(r) for n, r in zip(class_names, recall)},
        "per_class_auc": {n: _or_none(a) for n, a in zip(class_names, aucs)},
        "per_class_auprc": {n: _or_none(a) for n, a in zip(class_names, auprcs)},
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }


def _balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected, they count as errors
        warnings.simplefilter("ignore", UserWarning)
        return float(skm.balanced_accuracy_score(labels, preds))


def operating_point_metrics(positive, scores, threshold: float) -> dict:
    """Decisions `scores >= threshold` against `positive` [N] bool: the threshold, sensitivity (recall),
    specificity (recall of the negatives), PPV (precision), NPV (precision of the negatives), F1 and the counts
    TP, FP, TN, FN (scikit-learn's confusion_matrix and scores; None where a ratio has no images)."""
    positive = np.asarray(positive).astype(bool)
    decision = np.asarray(scores) >= threshold
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(positive, decision, labels=[False, True]).ravel())
    rate = {"zero_division": np.nan}
    return {"threshold": float(threshold),
            "sensitivity": _or_none(skm.recall_score(positive, decision, **rate)),
            "specificity": _or_none(skm.recall_score(positive, decision, pos_label=False, **rate)),
            "ppv": _or_none(skm.precision_score(positive, decision, **rate)),
            "npv": _or_none(skm.precision_score(positive, decision, pos_label=False, **rate)),
            "f1": _or_none(skm.f1_score(positive, decision, **rate)),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# ---------------------------------------------------------------------------------------- bootstrap
# The intervals resample the images with replacement within each true class (so every resample keeps the
# class counts, and AUROC/AUPRC stay defined), recompute the metrics on every resample, and take SciPy's
# percentile interval. The metrics are recomputed for a whole batch of resamples at once with NumPy/SciPy
# (scikit-learn takes ~1 ms per call: 1000 resamples x a dozen metrics would take tens of seconds); for the
# original sample the batch forms equal scikit-learn's values (tests/test_evaluation.py checks it).

def auroc_batch(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of scores [..., N] (every row labelled by positive [N]): the Mann-Whitney U statistic from
    average ranks (ties count 1/2), as roc_auc_score."""
    n1 = int(positive.sum())
    n0 = positive.size - n1
    ranks = stats.rankdata(scores, axis=-1)
    return (ranks[..., positive].sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def average_precision_batch(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Average precision of scores [..., N] as average_precision_score: sum over distinct thresholds (highest
    first) of (recall gain) x (precision at that threshold), i.e. every positive weighs 1/n_pos times the
    precision at the lowest score tied with it."""
    n = scores.shape[-1]
    order = np.argsort(-scores, axis=-1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=-1)
    hit = positive[order]
    precision = np.cumsum(hit, axis=-1) / np.arange(1, n + 1)
    group_end = np.ones(ranked.shape, dtype=bool)  # last position of each run of tied scores
    group_end[..., :-1] = ranked[..., :-1] != ranked[..., 1:]
    end_index = np.where(group_end, np.arange(n), n)
    end_of_group = np.flip(np.minimum.accumulate(np.flip(end_index, -1), axis=-1), -1)
    return (hit * np.take_along_axis(precision, end_of_group, axis=-1)).sum(axis=-1) / positive.sum()


def _bootstrap_slots(labels: np.ndarray, probs: np.ndarray, thresholds: dict, varying: list,
                     fixed: np.ndarray) -> tuple[list, callable]:
    """(names of the metrics with an interval, statistic(*resampled `varying` index arrays, axis=-1) ->
    [slots, ...]) for probs [R, N, C]: each metric is the mean over the R models of its value on the resampled
    images followed by the `fixed` ones (the images alone in their class: every resample of them is the same)."""
    order = np.concatenate([*varying, fixed])
    layout = labels[order]  # the labels of any resample, in this order
    classes = sorted(set(layout.tolist()))
    both = [c for c in classes if (layout != c).any()]
    names = ["accuracy", "balanced_accuracy"] + (["auc", "auprc"] if both else [])
    names += [(c, k) for c in both for k in ("auc", "auprc")]
    names += [(c, k) for c in sorted(thresholds) for k, ok in (("sensitivity", (layout == c).any()),
                                                                ("specificity", (layout != c).any())) if ok]

    def statistic(*strata, axis=-1):
        batch = strata[0].shape[:-1]
        p = probs[:, np.concatenate([*strata, np.broadcast_to(fixed, (*batch, len(fixed)))], axis=-1)]  # [R, ..., N, C]
        correct = p.argmax(axis=-1) == layout
        values = {"accuracy": correct.mean(axis=-1),
                  "balanced_accuracy": np.mean([correct[..., layout == c].mean(axis=-1) for c in classes], 0)}
        for c in both:
            values[c, "auc"] = auroc_batch(p[..., c], layout == c)
            values[c, "auprc"] = average_precision_batch(p[..., c], layout == c)
        if both:
            values["auc"] = np.mean([values[c, "auc"] for c in both], axis=0)
            values["auprc"] = np.mean([values[c, "auprc"] for c in both], axis=0)
        for c, t in thresholds.items():
            decided = p[..., c] >= t
            if (layout == c).any():
                values[c, "sensitivity"] = decided[..., layout == c].mean(axis=-1)
            if (layout != c).any():
                values[c, "specificity"] = 1.0 - decided[..., layout != c].mean(axis=-1)
        return np.stack([values[name].mean(axis=0) for name in names])  # the mean over the models

    return names, statistic


def bootstrap_intervals(labels, probs, thresholds: Optional[dict] = None, *, resamples: int = DEFAULT_RESAMPLES,
                        seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Percentile intervals (`confidence`, default 95 %) of accuracy, balanced accuracy, macro AUROC and AUPRC,
    and per class AUROC, AUPRC and, for the classes in `thresholds` ({class index: t}), sensitivity and
    specificity at t, from `resamples` bootstrap resamples of the images stratified by true class, drawn from
    `seed`. probs [N, C], or [R, N, C] for R models scored on the same images (e.g. the seeds of a sweep): then
    the intervals are those of the metrics' mean over the models, every resample applied to all of them.
    Returns {"accuracy": [low, high], ..., "per_class": {class index: {"auc": [low, high], ...}}}; only
    {"per_class": {}} when no class has two images (there is nothing to resample)."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    probs = probs[None] if probs.ndim == 2 else probs
    strata = [np.flatnonzero(labels == c) for c in range(probs.shape[-1]) if (labels == c).any()]
    varying = [s for s in strata if len(s) > 1]
    if not varying:
        return {"per_class": {}}
    fixed = np.concatenate([s for s in strata if len(s) == 1] + [np.zeros(0, np.int64)])
    names, statistic = _bootstrap_slots(labels, probs, dict(thresholds or {}), varying, fixed)
    with warnings.catch_warnings():  # a constant metric (e.g. accuracy 1 on every resample) is not an error
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.bootstrap(varying, statistic, n_resamples=resamples, batch=max(1, _BOOTSTRAP_VALUES // probs.size),
                             vectorized=True, paired=False, confidence_level=confidence, method="percentile",
                             rng=np.random.default_rng(seed)).confidence_interval
    out: dict = {"per_class": {}}
    for name, low, high in zip(names, np.atleast_1d(ci.low), np.atleast_1d(ci.high)):
        interval = [float(low), float(high)]
        if isinstance(name, tuple):
            out["per_class"].setdefault(name[0], {})[name[1]] = interval
        else:
            out[name] = interval
    return out


def evaluation_metrics(labels, logits, class_names, calibration: Optional[Calibration] = None, *,
                       resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Everything evaluate reports for integer labels [N] and raw logits [N, C] under `calibration` (its
    temperature makes the probabilities every metric reads; its thresholds, by class name, the operating
    points): classification_metrics, ECE before and after calibration, per class AUROC, AUPRC and the
    operating point's metrics, and with resamples > 0 the 95 % bootstrap intervals (`ci95`)."""
    calibration = calibration or Calibration()
    labels = np.asarray(labels, dtype=np.int64)
    probs = calibration.probabilities(logits)
    m = classification_metrics(labels, probs, class_names)
    m.update(temperature=calibration.temperature, ece=expected_calibration_error(labels, softmax(logits)),
             ece_calibrated=expected_calibration_error(labels, probs), operating_point=calibration.operating_point)
    thresholds = {c: calibration.thresholds[class_names[c]] for c in decision_classes(class_names)
                  if class_names[c] in calibration.thresholds}
    m["per_class"] = {name: {"auc": m["per_class_auc"][name], "auprc": m["per_class_auprc"][name]}
                      for name in class_names}
    for c, t in thresholds.items():
        m["per_class"][class_names[c]].update(operating_point_metrics(labels == c, probs[:, c], t))
    if resamples:
        ci = bootstrap_intervals(labels, probs, thresholds, resamples=resamples, seed=seed)
        m["ci95"] = {k: ci[k] for k in INTERVAL_KEYS if k in ci}
        for c, intervals in ci["per_class"].items():
            m["per_class"][class_names[c]]["ci95"] = intervals
        m["bootstrap"] = {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE,
                          "method": "percentile; images resampled within each true class"}
    return m


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b), the base-to-novel summary (CoCoOp); 0 when both are 0."""
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def mean_std(values) -> dict:
    """Mean and sample (ddof=1) std; std 0 for a single value."""
    vals = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}


def aggregate(results: list, keys=SUMMARY_KEYS) -> dict:
    """Mean and (sample, ddof=1) std of the summary metrics over several runs."""
    out = {"runs": len(results)}
    for key in keys:
        out[key] = mean_std([r[key] for r in results])
    return out
