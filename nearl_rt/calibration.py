"""Honest probabilities and decisions: temperature scaling, expected calibration error, operating points.

- Temperature scaling (Guo et al. 2017): calibrated probs = softmax(logits / T), one T > 0 per model, fitted
  on held-out labelled images by minimising their negative log-likelihood (SciPy's bounded scalar search over
  ln T), with a standard-normal prior on ln T that keeps T near 1 when there are only a few such images
  (few-shot validation sets; with hundreds of images the prior moves T by well under 1 %). Dividing by T
  keeps the order of the logits, so the argmax (the predicted class) never changes.
- Expected calibration error: top-label confidence (the largest probability) in ECE_BINS equal-width bins,
  sum over bins of (images in bin / N) * |accuracy in bin - mean confidence in bin| (SciPy's binned_statistic).
- Operating points: per class, one-vs-rest (binary models: the positive class, class index 1 only), a
  threshold t on the calibrated probability (positive when prob >= t) chosen on held-out images by a rule:
  `youden` (largest sensitivity + specificity - 1), `sensitivity=X` (the highest threshold whose
  sensitivity is >= X: the most specific one that reaches it) or `specificity=X` (the lowest threshold whose
  specificity is >= X). Candidates are the held-out images' own scores (scikit-learn's roc_curve).

docs/evaluation.md defines every number. Nothing here imports PyTorch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy import optimize, special, stats
from sklearn import metrics as skm

from nearl_rt.core.errors import NearlError

ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
RULE_HELP = "youden, sensitivity=X or specificity=X with 0 < X <= 1 (e.g. sensitivity=0.95)"
DEFAULT_RULE = "youden"
_RATE_SLACK = 1e-9  # rates are ratios of counts: compare them to the target without float noise (19/20 vs 0.95)


class CalibrationError(NearlError):
    """Calibration or an operating point cannot be fitted on the given images (the message says why and how)."""


@dataclass(frozen=True)
class OperatingPointRule:
    """How a decision threshold is chosen: kind youden | sensitivity | specificity, target in (0, 1]."""
    kind: str
    target: Optional[float] = None

    @classmethod
    def parse(cls, text: str) -> "OperatingPointRule":
        text = str(text).strip()
        if text == "youden":
            return cls("youden")
        m = re.fullmatch(r"(sensitivity|specificity)=([0-9]*\.?[0-9]+)", text)
        if m is None or not 0.0 < float(m.group(2)) <= 1.0:
            raise CalibrationError(f"operating point {text!r} is not a rule: use {RULE_HELP}")
        return cls(m.group(1), float(m.group(2)))

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target:g}"


@dataclass
class Calibration:
    """What a checkpoint (extra["calibration"]) and an exported model (nearl.temperature, nearl.operating_point,
    nearl.thresholds) carry: the temperature, the rule and the thresholds it chose ({class name: t}), and which
    images they were fitted on. The default is the identity: T = 1, no thresholds."""
    temperature: float = 1.0
    operating_point: Optional[str] = None
    thresholds: dict = field(default_factory=dict)
    fitted_on: Optional[dict] = None
    multi_label: bool = False  # per-finding probabilities sigmoid(logits / T) (nearl_rt.multilabel), {finding: t}

    @property
    def fitted(self) -> bool:
        return self.operating_point is not None

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "operating_point": self.operating_point,
                "thresholds": dict(self.thresholds), "fitted_on": self.fitted_on,
                **({"multi_label": True} if self.multi_label else {})}

    @classmethod
    def from_dict(cls, record: Optional[dict], where: str = "checkpoint") -> "Calibration":
        """A stored record (None: the identity); a malformed one raises CalibrationError naming `where`."""
        if record is None:
            return cls()
        try:
            cal = cls(float(record["temperature"]), record.get("operating_point"),
                      {str(k): float(v) for k, v in (record.get("thresholds") or {}).items()}, record.get("fitted_on"),
                      bool(record.get("multi_label", False)))
        except (TypeError, ValueError, KeyError, AttributeError):
            raise CalibrationError(f"{where} has a malformed calibration record; recalibrate it with "
                                   f"`python -m nearl_rt.calibrate`") from None
        if not (math.isfinite(cal.temperature) and cal.temperature > 0) or \
                not all(0.0 <= t <= 1.0 for t in cal.thresholds.values()):
            raise CalibrationError(f"{where} has an invalid calibration (temperature {cal.temperature}, thresholds "
                                   f"{cal.thresholds}); recalibrate it with `python -m nearl_rt.calibrate`")
        return cal

    def probabilities(self, logits) -> np.ndarray:
        if self.multi_label:
            return special.expit(np.asarray(logits, dtype=np.float64) / self.temperature)
        return softmax(logits, self.temperature)


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the classes, in float64: [N, C]."""
    return special.softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float:
    """Mean -log p(true class) under softmax(logits / temperature)."""
    logp = special.log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits, labels) -> float:
    """The temperature T (within TEMPERATURE_BOUNDS) minimising the summed NLL of softmax(logits / T) on these
    images plus (ln T)^2 / 2 (a standard-normal prior on ln T: with few images it keeps T near 1)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    n = len(labels)

    def objective(log_t: float) -> float:
        return n * negative_log_likelihood(logits, labels, math.exp(log_t)) + 0.5 * log_t ** 2

    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = optimize.minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-7})
    return float(math.exp(result.x))


def reliability(labels, probs, bins: int = ECE_BINS) -> dict:
    """Top-label reliability in `bins` equal-width confidence bins on [0, 1] (the last bin closed): per bin the
    image count, accuracy and mean confidence (NaN for empty bins), and the bin edges."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    means, edges, _ = stats.binned_statistic(confidence, [correct, confidence], statistic="mean", bins=bins,
                                             range=(0.0, 1.0))
    counts, _, _ = stats.binned_statistic(confidence, confidence, statistic="count", bins=bins, range=(0.0, 1.0))
    return {"count": counts.astype(np.int64), "accuracy": means[0], "confidence": means[1], "edges": edges}


def expected_calibration_error(labels, probs, bins: int = ECE_BINS) -> float:
    """sum over bins of (n_bin / N) * |accuracy_bin - confidence_bin| (see reliability)."""
    r = reliability(labels, probs, bins)
    full = r["count"] > 0
    gap = np.abs(r["accuracy"][full] - r["confidence"][full])
    return float((r["count"][full] * gap).sum() / r["count"].sum())


def decision_classes(class_names: Sequence[str]) -> list:
    """Indices of the classes that get an operating point: the positive class (index 1) of a binary model,
    every class (one-vs-rest) otherwise."""
    return [1] if len(class_names) == 2 else list(range(len(class_names)))


def fit_threshold(positive, scores, rule: OperatingPointRule, what: str = "the positive class") -> float:
    """The threshold on `scores` (positive when score >= t) that `rule` picks on these images."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise CalibrationError(f"the images to fit on have {'no' if n_pos == 0 else 'only'} images of {what}: an "
                               f"operating point needs positives and negatives; fit on a labelled split with "
                               f"images of every class")
    fpr, tpr, thresholds = skm.roc_curve(positive, scores, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # [0] is +inf: nothing positive
    if rule.kind == "youden":
        return float(thresholds[np.argmax(tpr - fpr)])  # ties: the highest threshold
    if rule.kind == "sensitivity":
        ok = np.flatnonzero(tpr >= rule.target - _RATE_SLACK)
        return float(thresholds[ok[0]])  # tpr reaches 1 at the lowest score: never empty
    ok = np.flatnonzero(1.0 - fpr >= rule.target - _RATE_SLACK)
    if len(ok) == 0:
        raise CalibrationError(f"no threshold reaches {rule} for {what} on the images to fit on ({n_neg} "
                               f"negatives, the highest-scoring image is a negative); use more images or a lower "
                               f"target")
    return float(thresholds[ok[-1]])


def fit_thresholds(labels, probs, class_names: Sequence[str], rule: OperatingPointRule) -> dict:
    """{class name: threshold} for decision_classes, one-vs-rest on the calibrated probabilities."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    return {class_names[c]: fit_threshold(labels == c, probs[:, c], rule, f"class {class_names[c]!r}")
            for c in decision_classes(class_names)}


def fit_calibration(logits, labels, class_names: Sequence[str], rule: OperatingPointRule,
                    fitted_on: Optional[dict] = None) -> tuple[Calibration, dict]:
    """Temperature, then thresholds on the probabilities it calibrates, from held-out logits [N, C] and labels
    [N]. Returns (Calibration, its fit report: NLL and ECE before/after on these images)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or logits.shape != (len(labels), len(class_names)):
        raise ValueError(f"logits must be [{len(labels)}, {len(class_names)}], got {logits.shape}")
    missing = [class_names[c] for c in range(len(class_names)) if not (labels == c).any()]
    if missing:
        raise CalibrationError(f"the images to fit on have no images of class(es) {missing} (only of "
                               f"{sorted({class_names[c] for c in labels})}): no temperature or operating point "
                               f"can be fitted; use a labelled split with images of every class")
    temperature = fit_temperature(logits, labels)
    calibrated = softmax(logits, temperature)
    calibration = Calibration(temperature, str(rule), fit_thresholds(labels, calibrated, class_names, rule),
                              {**(fitted_on or {}), "images": int(len(labels))})
    report = {"nll": negative_log_likelihood(logits, labels), "nll_calibrated": negative_log_likelihood(
        logits, labels, temperature), "ece": expected_calibration_error(labels, softmax(logits)),
              "ece_calibrated": expected_calibration_error(labels, calibrated)}
    return calibration, report
