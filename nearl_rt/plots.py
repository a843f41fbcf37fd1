"""The figures `evaluate --plots DIR` writes (matplotlib): ROC curves, precision-recall curves and the
reliability diagram, for the classes that get an operating point (the positive class of a binary model, every
class one-vs-rest otherwise), with the operating point marked and the 95 % intervals in the legends."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn import metrics as skm

from nearl_rt.calibration import ECE_BINS, decision_classes, reliability, softmax
from nearl_rt.core.atomic import atomic_output

RANDOM_BACKBONE_NOTE = "random backbone weights: a pipeline check, not an accuracy claim"
FILES = ("roc.png", "pr.png", "reliability.png")


def _interval(values: dict, key: str) -> str:
    ci = values.get("ci95", {}).get(key)
    return "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _roc(ax, labels, probs, class_names, m) -> None:
    for c in decision_classes(class_names):
        name, v = class_names[c], m["per_class"][class_names[c]]
        if v["auc"] is None:
            continue
        fpr, tpr, _ = skm.roc_curve(labels == c, probs[:, c])
        line, = ax.plot(fpr, tpr, label=f"{name}: AUROC {v['auc']:.3f}{_interval(v, 'auc')}")
        if "threshold" in v and v["sensitivity"] is not None and v["specificity"] is not None:
            ax.plot(1 - v["specificity"], v["sensitivity"], "o", color=line.get_color(),
                    label=f"  operating point {m['operating_point']}, p >= {v['threshold']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(0, 1), ylim=(0, 1.01))


def _pr(ax, labels, probs, class_names, m) -> None:
    for c in decision_classes(class_names):
        name, v = class_names[c], m["per_class"][class_names[c]]
        if v["auprc"] is None:
            continue
        precision, recall, _ = skm.precision_recall_curve(labels == c, probs[:, c])
        line, = ax.step(recall, precision, where="post",
                        label=f"{name}: AUPRC {v['auprc']:.3f}{_interval(v, 'auprc')}")
        ax.axhline(np.mean(labels == c), ls=":", color=line.get_color(), lw=0.8)  # a random ranking's precision
        if "threshold" in v and v["sensitivity"] is not None and v["ppv"] is not None:
            ax.plot(v["sensitivity"], v["ppv"], "o", color=line.get_color(),
                    label=f"  operating point {m['operating_point']}, p >= {v['threshold']:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.01))


def _reliability(ax, hist, labels, logits, m) -> None:
    width = 1.0 / ECE_BINS
    for probs, label, offset in ((softmax(logits), f"uncalibrated: ECE {m['ece']:.3f}", -0.2),
                                 (softmax(logits, m["temperature"]),
                                  f"temperature {m['temperature']:.3g}: ECE {m['ece_calibrated']:.3f}", 0.2)):
        r = reliability(labels, probs)
        centres = (r["edges"][:-1] + r["edges"][1:]) / 2
        full = r["count"] > 0
        ax.plot(r["confidence"][full], r["accuracy"][full], "o-", label=label)
        hist.bar(centres + offset * width, r["count"], width=0.4 * width)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    ax.set(ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1.01))
    hist.set(xlabel=f"confidence (largest probability), {ECE_BINS} equal-width bins", ylabel="images", xlim=(0, 1))


def write_evaluation_plots(out_dir: Path, labels, logits, class_names: Sequence[str], m: dict, title: str, *,
                           random_backbone: bool = False) -> list:
    """roc.png, pr.png and reliability.png in `out_dir` (created if missing) for integer labels [N], raw logits
    [N, C] and evaluate's metrics `m` of them. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, logits = np.asarray(labels), np.asarray(logits, dtype=np.float64)
    probs = softmax(logits, m["temperature"])
    title = f"{title}\n{RANDOM_BACKBONE_NOTE}" if random_backbone else title
    out_dir = Path(out_dir)
    out_dir.mkdir(exist_ok=True)
    figures = []
    for name, draw in (("roc.png", _roc), ("pr.png", _pr)):
        fig, ax = plt.subplots(figsize=(6.4, 5.6))
        draw(ax, labels, probs, list(class_names), m)
        ax.legend(fontsize=7, loc="lower right" if name == "roc.png" else "lower left")
        ax.grid(alpha=0.3)
        figures.append((name, fig, ax))
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6.4, 6.8), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    _reliability(ax, hist, labels, logits, m)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    figures.append(("reliability.png", fig, ax))
    written = []
    for name, fig, ax in figures:
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        with atomic_output(out_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written
