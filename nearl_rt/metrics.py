"""Classification metrics from scikit-learn: accuracy, balanced accuracy, macro-F1, one-vs-rest AUC,
per-class accuracy, confusion matrix; mean ± std over runs; the harmonic mean of base and novel scores."""
from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """cm[i, j] = number of images of true class i predicted as class j (every class gets a row)."""
    return skm.confusion_matrix(labels, preds, labels=np.arange(num_classes)).astype(np.int64)


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count 1/2); NaN when one class is absent."""
    positive = np.asarray(positive).astype(bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(skm.roc_auc_score(positive, scores))


def classification_metrics(labels, probs, class_names) -> dict:
    """All metrics for integer labels [N] and class probabilities [N, C].

    Balanced accuracy averages the recall of the classes present in `labels`; macro-F1 averages over the
    classes present in the labels or the predictions (scikit-learn's conventions); the AUC is the
    one-vs-rest macro average over the classes that have both positives and negatives."""
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
    return {
        "num_images": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "balanced_accuracy": _balanced_accuracy(labels, preds),
        "macro_f1": float(skm.f1_score(labels, preds, average="macro", zero_division=0)),
        "auc": float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan"),
        "per_class_accuracy": {n: (None if np.isnan(r) else float(r)) for n, r in zip(class_names, recall)},
        "per_class_auc": {n: (None if np.isnan(a) else a) for n, a in zip(class_names, aucs)},
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }


def _balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected, they count as errors
        warnings.simplefilter("ignore", UserWarning)
        return float(skm.balanced_accuracy_score(labels, preds))


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
