"""The linear-probe baseline: scikit-learn's LogisticRegression on the frozen backbone's normalised image
features, its inverse L2 strength C chosen on the validation shots.

C is searched over the range of the CLIP paper's linear-probe sweep (10^-6 .. 10^6, Radford et al. 2021,
appendix A.3), coarse to fine: every second decade first, then around the best value at steps of 1, 1/2,
1/4 and 1/8 decade (15 fits instead of the paper's 96 grid points: the few-shot fits are tiny, the
per-fit overhead is not). The best C has the highest validation accuracy, then the lowest validation
log-loss, then the smallest C (the most regularised). The head is the fit on the training shots.

Multi-label data: one-vs-rest, one logistic regression per finding on its known training labels, one C for all
findings chosen by the same search on the mean validation log-loss over the findings' known entries (then the
smallest C); the head's logits are per finding (P = sigmoid).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from nearl_rt.classifier import frozen_image_features

COARSE_LOG10_C = (-6, -4, -2, 0, 2, 4, 6)
REFINE_STEPS = (1.0, 0.5, 0.25, 0.125)
MAX_ITER = 1000


def image_features(model, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        feats = [frozen_image_features(model, images[i:i + batch]).double().cpu() for i in range(0, len(images), batch)]
    return torch.cat(feats).numpy()


def _fit(x: np.ndarray, y: np.ndarray, log10_c: float) -> LogisticRegression:
    with warnings.catch_warnings():  # a weakly regularised fit on separable shots stops at MAX_ITER: fine here
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=10.0 ** log10_c, max_iter=MAX_ITER).fit(x, y)


def softmax_head(clf: LogisticRegression, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight [C, E], bias [C]) with softmax(x @ weight.T + bias) == clf.predict_proba(x). scikit-learn
    fits one vector w for two classes (P(1) = sigmoid(w.x + b)); [-w/2, w/2] gives the same softmax."""
    w, b = clf.coef_, clf.intercept_
    if num_classes == 2:
        return np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
    return w, b


def select_c(train_x, train_y, val_x, val_y, num_classes: int) -> tuple[float, dict]:
    """The log10(C) with the best validation score, and every tried value's (accuracy, log-loss)."""
    tried: dict = {}

    def score(log10_c: float):
        log10_c = round(float(np.clip(log10_c, -6, 6)), 6)
        if log10_c not in tried:
            clf = _fit(train_x, train_y, log10_c)
            p = clf.predict_proba(val_x)
            tried[log10_c] = (float((p.argmax(1) == val_y).mean()),
                              float(log_loss(val_y, p, labels=np.arange(num_classes))))
        acc, loss = tried[log10_c]
        return (-acc, loss, log10_c)  # smaller is better

    best = min(COARSE_LOG10_C, key=score)
    for step in REFINE_STEPS:
        best = min((best - step, best, best + step), key=score)
    return round(float(np.clip(best, -6, 6)), 6), tried


def _fit_findings(x: np.ndarray, y: np.ndarray, log10_c: float) -> list:
    fits = []
    for f in range(y.shape[1]):
        k = y[:, f] >= 0
        if len(np.unique(y[k, f])) < 2:
            raise ValueError(f"finding {f} has {'no' if not k.any() else 'one class of'} known training labels")
        fits.append(_fit(x[k], y[k, f], log10_c))
    return fits


def _finding_log_loss(fits: list, x: np.ndarray, y: np.ndarray) -> float:
    losses = []
    for f, clf in enumerate(fits):
        k = y[:, f] >= 0
        if k.any():
            losses.append(log_loss(y[k, f], clf.predict_proba(x[k])[:, 1], labels=[0, 1]))
    return float(np.mean(losses))


def fit_multilabel_probe(model, train_images: torch.Tensor, train_labels: np.ndarray, val_images: torch.Tensor,
                         val_labels: np.ndarray) -> tuple[tuple, dict]:
    """One-vs-rest per finding (labels [N, F], -1 unknown): the head (weight [F, E], bias [F]) and the search."""
    tx, vx = image_features(model, train_images), image_features(model, val_images)
    tried: dict = {}

    def score(log10_c: float):
        log10_c = round(float(np.clip(log10_c, -6, 6)), 6)
        if log10_c not in tried:
            tried[log10_c] = _finding_log_loss(_fit_findings(tx, train_labels, log10_c), vx, val_labels)
        return (tried[log10_c], log10_c)

    try:
        best = min(COARSE_LOG10_C, key=score)
        for step in REFINE_STEPS:
            best = min((best - step, best, best + step), key=score)
    except ValueError as e:
        raise ValueError(f"the linear probe cannot be fitted: {e} (names: {model.class_names}); use more shots") from None
    best = round(float(np.clip(best, -6, 6)), 6)
    fits = _fit_findings(tx, train_labels, best)
    weight = np.concatenate([c.coef_ for c in fits])
    bias = np.concatenate([c.intercept_ for c in fits])
    device = model.class_tokens.device
    head = (torch.from_numpy(weight).float().to(device), torch.from_numpy(bias).float().to(device))
    return head, {"C": 10.0 ** best, "val_log_loss": tried[best], "fits": len(tried)}


def fit_linear_probe(model, train_images: torch.Tensor, train_labels: np.ndarray, val_images: torch.Tensor,
                     val_labels: np.ndarray) -> tuple[tuple, dict]:
    """The linear head ((weight [C, E], bias [C]) on the model's device) and what the search found."""
    num_classes = len(model.class_names)
    tx, vx = image_features(model, train_images), image_features(model, val_images)
    log10_c, tried = select_c(tx, train_labels, vx, val_labels, num_classes)
    weight, bias = softmax_head(_fit(tx, train_labels, log10_c), num_classes)
    device = model.class_tokens.device
    head = (torch.from_numpy(weight).float().to(device), torch.from_numpy(bias).float().to(device))
    acc, loss = tried[log10_c]
    return head, {"C": 10.0 ** log10_c, "val_accuracy": acc, "val_log_loss": loss, "fits": len(tried)}
