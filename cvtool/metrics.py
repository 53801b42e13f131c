"""Classification metrics in plain NumPy: accuracy, rank-N, per-class report, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def rank_accuracy(true_rank: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the top ``k`` (``true_rank`` is 0 for top-1)."""
    true_rank = np.asarray(true_rank)
    return float(np.mean(true_rank < k)) if true_rank.size else 0.0


def true_class_rank(probs: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """Position of the true class when classes are sorted by score (ties count against it)."""
    p_true = probs[np.arange(len(y_true)), y_true]
    return np.sum(probs > p_true[:, None], axis=1) + np.sum(
        (probs == p_true[:, None]) & (np.arange(probs.shape[1])[None, :] < y_true[:, None]), axis=1
    )


def per_class_report(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """Precision, recall, F1 and support per class, with macro and weighted averages."""
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    support = cm.sum(axis=1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
    }
    present = support > 0
    total = support.sum()

    def avg(values, weights=None):
        if weights is None:
            return float(values[present].mean()) if present.any() else 0.0
        return float((values * weights).sum() / total) if total else 0.0

    return {
        "per_class": per_class,
        "macro_avg": {"precision": avg(precision), "recall": avg(recall), "f1": avg(f1), "support": int(total)},
        "weighted_avg": {
            "precision": avg(precision, support),
            "recall": avg(recall, support),
            "f1": avg(f1, support),
            "support": int(total),
        },
    }


PROBABILITY_FLOOR = 1e-7  # Keras' epsilon: a probability of 0 costs -log(1e-7) = 16.1, not infinity


def mean_cross_entropy(p_true) -> float:
    """Mean of -log(probability given to the true class), floored at :data:`PROBABILITY_FLOOR`.

    ``evaluate``'s loss and training's ``val_loss``: one formula, so both report the same
    figure for one model on one set of images. Example: ``mean_cross_entropy([0.5, 1.0])`` is 0.3466.
    """
    p = np.clip(np.asarray(p_true, float), PROBABILITY_FLOOR, 1.0)
    return float(-np.mean(np.log(p))) if p.size else 0.0


def summarise(y_true, y_pred, true_rank, p_true, class_names: Sequence[str], ranks: Sequence[int]) -> dict:
    """All metrics for one model over one data set, as written to metrics.json."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    n = len(y_true)
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    return {
        "samples": int(n),
        "accuracy": float(np.mean(y_true == y_pred)) if n else 0.0,
        "loss": mean_cross_entropy(p_true),
        "top_k_accuracy": {str(k): rank_accuracy(true_rank, k) for k in ranks if k <= len(class_names)},
        **per_class_report(cm, class_names),
    }, cm


CALIBRATION_BINS = 15


def calibration(confidence, correct, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error and its reliability table, over ``bins`` equal-width confidence bins.

    ``confidence`` is each prediction's top-1 probability, ``correct`` whether it was right. Bin ``b``
    holds confidences in ``(b / bins, (b + 1) / bins]`` (the first bin also holds 0). ECE is the
    sample-weighted mean of ``|accuracy - mean confidence|`` over the bins (Guo et al. 2017).

    Example: ``calibration([0.9, 0.6], [True, False])["ece"]`` is 0.35.
    """
    conf = np.clip(np.asarray(confidence, float), 0.0, 1.0)
    hit = np.asarray(correct, bool)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.where(count > 0, np.bincount(which, hit, bins) / count, 0.0)
        mean_conf = np.where(count > 0, np.bincount(which, conf, bins) / count, 0.0)
    n = int(count.sum())
    ece = float(np.sum(count * np.abs(accuracy - mean_conf)) / n) if n else 0.0
    return {
        "ece": ece,
        "bins": bins,
        "bin_count": count.astype(int).tolist(),
        "bin_accuracy": [float(a) for a in accuracy],
        "bin_confidence": [float(c) for c in mean_conf],
    }
