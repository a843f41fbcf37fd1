"""Metrics against hand-computed values and brute-force definitions on random inputs."""
import numpy as np
import pytest

from nearl_rt.metrics import SUMMARY_KEYS, aggregate, binary_auc, classification_metrics, confusion_matrix


def brute_auc(pos, scores):
    """P(score of a random positive > score of a random negative), ties 1/2: all pairs."""
    p, n = scores[pos], scores[~pos]
    return ((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (len(p) * len(n))


def test_hand_computed_binary_example():
    labels = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.3, 0.8, 0.4])          # predictions: 0 1 0 1 0
    m = classification_metrics(labels, np.stack([1 - p1, p1], 1), ["a", "b"])
    assert m["confusion_matrix"] == [[2, 1], [1, 1]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    f1_a, f1_b = 2 * (2 / 3) * (2 / 3) / (4 / 3), 2 * 0.5 * 0.5 / 1.0  # precision a 2/3, recall a 2/3; b: 1/2, 1/2
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    # positives (0.8, 0.4) vs negatives (0.1, 0.6, 0.3): 0.8 beats 3, 0.4 beats 2 -> 5/6
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["per_class_accuracy"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(0.5)}


@pytest.mark.parametrize("seed", range(4))
def test_random_multiclass_against_definitions(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(7, 60)), int(rng.integers(2, 6))
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)).round(1)      # rounding makes ties in the AUC
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = [f"c{i}" for i in range(c)]
    m = classification_metrics(labels, probs, names)
    preds = probs.argmax(1)
    cm = np.zeros((c, c), int)
    for t, p in zip(labels, preds):
        cm[t, p] += 1
    assert m["confusion_matrix"] == cm.tolist()
    assert m["accuracy"] == pytest.approx(np.mean(preds == labels))
    present = [k for k in range(c) if (labels == k).any()]
    recalls = [np.mean(preds[labels == k] == k) for k in present]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    f1s = []
    for k in range(c):
        if not ((labels == k).any() or (preds == k).any()):
            continue  # sklearn's macro-F1 averages over classes seen in labels or predictions
        tp = np.sum((preds == k) & (labels == k))
        prec = tp / max(np.sum(preds == k), 1)
        rec = tp / max(np.sum(labels == k), 1)
        f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    aucs = [brute_auc(labels == k, probs[:, k]) for k in present if (labels != k).any()]
    assert m["auc"] == pytest.approx(np.mean(aucs))


def test_macro_f1_counts_a_class_that_is_only_predicted():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])  # both images are class 0; class 1 predicted once
    m = classification_metrics(np.array([0, 0]), probs, ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)  # class c: neither seen nor predicted
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["per_class_accuracy"]["b"] is None


def test_auc_edge_cases():
    assert binary_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert binary_auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert binary_auc(np.array([1, 0, 1, 0]), np.full(4, 0.5)) == 0.5
    assert np.isnan(binary_auc(np.array([1, 1]), np.array([0.3, 0.4])))


def test_confusion_matrix_counts_every_image():
    rng = np.random.default_rng(7)
    labels, preds = rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    cm = confusion_matrix(labels, preds, 4)
    assert cm.sum() == 100 and (cm.sum(1) == np.bincount(labels, minlength=4)).all()
    assert (cm.sum(0) == np.bincount(preds, minlength=4)).all()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics(np.array([0, 1]), np.zeros((2, 3)), ["a", "b"])


def test_aggregate_mean_and_sample_std():
    rng = np.random.default_rng(3)
    runs = [{k: float(rng.random()) for k in SUMMARY_KEYS} for _ in range(3)]
    agg = aggregate(runs)
    vals = np.array([r["macro_f1"] for r in runs])
    assert agg["runs"] == 3
    assert agg["macro_f1"]["mean"] == pytest.approx(vals.mean())
    assert agg["macro_f1"]["std"] == pytest.approx(vals.std(ddof=1))
