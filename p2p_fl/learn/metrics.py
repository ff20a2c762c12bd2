"""Classification metrics on host arrays (numpy only, no JAX: launch and reports import it).

Binary problems take ``probs`` of shape (N,), the probability of class 1
(the positive class, e.g. pneumonia); multiclass problems take (N, K) class
probabilities. Labels are integers of shape (N,) or (N, 1). A sample is
predicted positive when its probability is >= the threshold.

Example:
    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
"""

from __future__ import annotations

import numpy as np

# Probabilities are clipped away from 0 and 1 before the log of the loss.
_PROB_EPSILON = 1e-7


def _as_labels(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels).reshape(-1).astype(np.int64)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    Tied scores count one half, as in the trapezoidal ROC area.

    Args:
      labels: (N,) binary labels, 1 = positive.
      scores: (N,) scores, higher = more likely positive.

    Returns:
      The AUC in [0, 1], or nan if only one class is present or a score is nan
      (a diverged model).
    """
    labels = _as_labels(labels) == 1
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    num_pos = int(labels.sum())
    num_neg = labels.size - num_pos
    if num_pos == 0 or num_neg == 0 or np.isnan(scores).any():
        return float("nan")
    ranks = _average_ranks(scores)
    u_statistic = ranks[labels].sum() - num_pos * (num_pos + 1) / 2
    return float(u_statistic / (num_pos * num_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of values, ties given their average rank (scipy's rankdata, without
    importing scipy.stats: a second of every node's start-up)."""
    _, position, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2)[position.reshape(-1)]


def roc_curve(labels: np.ndarray, scores: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve, one point per distinct score.

    Args:
      labels: (N,) binary labels, 1 = positive.
      scores: (N,) scores.

    Returns:
      (fpr, tpr, thresholds): point i is the rate of predicting positive when
      ``score >= thresholds[i]``. Thresholds decrease; the first point is
      (0, 0) at threshold +inf. Rates are nan for an absent class.
    """
    labels = _as_labels(labels) == 1
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.size == 0:
        raise ValueError("roc_curve needs at least one sample")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last index of each run of equal scores closes one ROC point.
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), labels.size - 1]
    true_pos = np.cumsum(sorted_labels)[last_of_run]
    false_pos = (last_of_run + 1) - true_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0, true_pos] / labels.sum()
        fpr = np.r_[0, false_pos] / (~labels).sum()
    thresholds = np.r_[np.inf, sorted_scores[last_of_run]]
    return fpr, tpr, thresholds


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """Threshold that maximises Youden's J (sensitivity + specificity - 1).

    Meant for validation data; the result is then applied to test data.

    Args:
      labels: (N,) binary labels.
      probs: (N,) probabilities of the positive class.

    Returns:
      The threshold (the highest of equally good ones), or 0.5 if a class is
      absent and no threshold can be chosen.
    """
    fpr, tpr, thresholds = roc_curve(labels, probs)
    youden_j = (tpr - fpr)[1:]  # Skip the +inf point: it predicts nothing positive.
    if youden_j.size == 0 or np.isnan(youden_j).all():
        return 0.5
    return float(thresholds[1:][np.argmax(youden_j)])


def _binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    clipped = np.clip(probs, _PROB_EPSILON, 1 - _PROB_EPSILON)
    loss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
    predicted = probs >= threshold
    positive = labels == 1
    return {
        "loss": float(loss),
        "acc": float(np.mean(predicted == positive)),
        "auc": roc_auc(labels, probs),
        "sens": _rate(predicted[positive]),
        "spec": _rate(~predicted[~positive]),
    }


def _rate(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else float("nan")


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _multiclass_metrics(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> dict:
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, num_classes)
    label_probs = probs[np.arange(labels.size), labels]
    loss = -np.mean(np.log(np.clip(label_probs, _PROB_EPSILON, 1.0)))
    predicted = probs.argmax(axis=1)
    classes = range(num_classes)
    return {
        "loss": float(loss),
        "acc": float(np.mean(predicted == labels)),
        # One-vs-rest, averaged over the classes present.
        "auc": _nanmean([roc_auc(labels == k, probs[:, k]) for k in classes]),
        "sens": _nanmean([_rate(predicted[labels == k] == k) for k in classes]),
        "spec": _nanmean([_rate(predicted[labels != k] != k) for k in classes]),
    }


def classification_metrics(labels: np.ndarray, probs: np.ndarray, num_classes: int,
                           threshold: float = 0.5) -> dict[str, float]:
    """Loss, accuracy, AUC, sensitivity and specificity.

    Args:
      labels: (N,) or (N, 1) integer labels.
      probs: (N,) positive-class probabilities if ``num_classes == 2``, else
        (N, K) class probabilities.
      num_classes: number of classes.
      threshold: decision threshold (binary only; multiclass uses argmax).

    Returns:
      Dict with ``loss`` (cross-entropy of the clipped probabilities), ``acc``,
      ``auc`` (binary AUC, or one-vs-rest macro AUC), ``sens`` and ``spec``
      (binary: of class 1; multiclass: macro recall and macro specificity).
      Metrics undefined for the data (e.g. AUC with one class) are nan.
    """
    labels = _as_labels(labels)
    if num_classes == 2:
        return _binary_metrics(labels, probs, threshold)
    return _multiclass_metrics(labels, probs, num_classes)


def evaluation_report(test_labels: np.ndarray, test_probs: np.ndarray, num_classes: int,
                      val_labels: np.ndarray | None = None,
                      val_probs: np.ndarray | None = None) -> dict[str, float]:
    """Test metrics at 0.5 and, for binary tasks, at a threshold chosen on validation.

    Args:
      test_labels: (N,) test labels.
      test_probs: test probabilities (see ``classification_metrics``).
      num_classes: number of classes.
      val_labels: optional validation labels.
      val_probs: optional validation probabilities, required with ``val_labels``.

    Returns:
      ``classification_metrics`` at 0.5. For binary tasks with validation
      data, also ``threshold`` (Youden's J on validation) and
      ``acc_at_val_threshold``, ``sens_at_val_threshold``,
      ``spec_at_val_threshold`` on test. Multiclass tasks use argmax, so no
      threshold keys appear.
    """
    if (val_labels is None) != (val_probs is None):
        raise ValueError("give both val_labels and val_probs, or neither")
    report = classification_metrics(test_labels, test_probs, num_classes)
    if num_classes == 2 and val_labels is not None:
        threshold = choose_threshold(val_labels, val_probs)
        at_threshold = classification_metrics(test_labels, test_probs, num_classes, threshold)
        report["threshold"] = threshold
        for key in ("acc", "sens", "spec"):
            report[f"{key}_at_val_threshold"] = at_threshold[key]
    return report


def bootstrap_auc_interval(labels: np.ndarray, scores: np.ndarray, *, resamples: int = 1000,
                           level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the AUC: test images resampled with replacement,
    `resamples` times (seeded: the same report twice gives the same interval).

    Returns:
      (low, high); (nan, nan) when a class is absent.
    """
    labels, scores = _as_labels(labels), np.asarray(scores, dtype=np.float64)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(resamples, len(labels)))
    aucs = np.array([roc_auc(labels[d], scores[d]) for d in draws])
    aucs = aucs[np.isfinite(aucs)]  # a resample without one class has no AUC
    tail = (1 - level) / 2 * 100
    return float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (_as_labels(labels), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def calibration_bins(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> list[dict]:
    """Reliability of binary probabilities: per equal-width bin of predicted probability, the
    images in it, their mean prediction and the observed rate of class 1 (empty bins left out)."""
    labels, probs = _as_labels(labels), np.asarray(probs, dtype=np.float64)
    index = np.minimum((probs * bins).astype(np.int64), bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            rows.append({"low": b / bins, "high": (b + 1) / bins, "count": int(inside.sum()),
                         "mean_predicted": float(probs[inside].mean()), "observed": float(labels[inside].mean())})
    return rows


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Sum over bins of (bin share of images) x |observed rate - mean prediction|."""
    rows = calibration_bins(labels, probs, bins)
    total = sum(r["count"] for r in rows)
    return float(sum(r["count"] / total * abs(r["observed"] - r["mean_predicted"]) for r in rows)) if total else float("nan")
