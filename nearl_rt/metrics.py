"""Classification metrics in NumPy: accuracy, balanced accuracy, macro-F1, one-vs-rest AUC, per-class
accuracy, confusion matrix; and mean ± std over runs."""
from __future__ import annotations

import numpy as np

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """cm[i, j] = number of images of true class i predicted as class j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count 1/2); NaN when one class is absent."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(labels, probs, class_names) -> dict:
    """All metrics for integer labels [N] and class probabilities [N, C]."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    if probs.ndim != 2 or probs.shape != (len(labels), num_classes):
        raise ValueError(f"probs must be [{len(labels)}, {num_classes}], got {probs.shape}")
    if len(labels) == 0:
        raise ValueError("no images to evaluate")
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, num_classes)
    support, predicted, correct = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, correct / np.maximum(support, 1), np.nan)
        precision = np.where(predicted > 0, correct / np.maximum(predicted, 1), 0.0)
        f1 = np.where(precision + np.nan_to_num(recall) > 0,
                      2 * precision * np.nan_to_num(recall) / (precision + np.nan_to_num(recall)), 0.0)
    aucs = [binary_auc(labels == c, probs[:, c]) for c in range(num_classes)]
    return {
        "num_images": int(len(labels)),
        "accuracy": float(correct.sum() / len(labels)),
        "balanced_accuracy": float(np.nanmean(recall)),
        "macro_f1": float(f1[present | (predicted > 0)].mean()),  # classes seen in labels or predictions
        "auc": float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan"),
        "per_class_accuracy": {n: (None if np.isnan(r) else float(r)) for n, r in zip(class_names, recall)},
        "per_class_auc": {n: (None if np.isnan(a) else a) for n, a in zip(class_names, aucs)},
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }


def aggregate(results: list) -> dict:
    """Mean and (sample, ddof=1) std of the summary metrics over several runs."""
    out = {"runs": len(results)}
    for key in SUMMARY_KEYS:
        vals = np.asarray([r[key] for r in results], dtype=np.float64)
        out[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    return out
