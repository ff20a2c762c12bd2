"""Metrics: exact values on tiny hand-built examples."""

import itertools

import numpy as np
import pytest

from p2p_fl.learn.metrics import (
    choose_threshold,
    classification_metrics,
    evaluation_report,
    roc_auc,
    roc_curve,
)


def pairwise_auc(labels, scores):
    """AUC by definition: P(score of a positive > score of a negative), ties count 1/2."""
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0
               for p, n in itertools.product(positives, negatives))
    return wins / (len(positives) * len(negatives))


def test_auc_hand_examples():
    # Positives 0.35 and 0.8 beat 0.1, 0.35 loses to 0.4: 3 of 4 pairs.
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    # A tie between a positive and a negative counts one half: 3.5 of 4 pairs.
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])) == 0.875
    assert roc_auc(np.array([0, 1, 0, 1]), np.full(4, 0.3)) == 0.5


def test_auc_perfect_inverted_and_one_class():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert roc_auc(labels, scores) == 1.0
    assert roc_auc(labels, -scores) == 0.0
    assert np.isnan(roc_auc(np.ones(4), np.arange(4.0)))
    assert np.isnan(roc_auc(np.zeros(4), np.arange(4.0)))
    assert np.isnan(roc_auc(np.array([0, 1, 1, 0]), np.array([0.1, np.nan, 0.3, 0.2])))  # a diverged model


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 10, 200) / 10.0  # Many ties.
    assert roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)
    assert roc_auc(labels[:, None], scores) == roc_auc(labels, scores)  # (N, 1) labels.


def test_roc_curve_points_and_area():
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.9])
    fpr, tpr, thresholds = roc_curve(labels, scores)
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.8, 0.4, 0.1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores))


def test_choose_threshold_maximises_youden_j():
    labels = np.array([0, 0, 0, 1, 1, 1])
    # Every threshold in (0.3, 0.6] separates the classes; the highest is kept.
    assert choose_threshold(labels, np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])) == 0.6
    # A model that is confident about everything: 0.5 would call all positive.
    assert choose_threshold(labels, np.array([0.6, 0.7, 0.75, 0.9, 0.95, 0.97])) == 0.9
    assert choose_threshold(np.ones(3), np.array([0.2, 0.5, 0.9])) == 0.5


def test_binary_metrics_by_hand():
    labels = np.array([1, 1, 1, 0, 0])
    probs = np.array([0.9, 0.6, 0.4, 0.3, 0.7])
    result = classification_metrics(labels, probs, num_classes=2)
    assert result["acc"] == pytest.approx(3 / 5)
    assert result["sens"] == pytest.approx(2 / 3)
    assert result["spec"] == pytest.approx(1 / 2)
    assert result["auc"] == pytest.approx(pairwise_auc(labels, probs))
    expected_loss = -np.mean(np.log([0.9, 0.6, 0.4, 0.7, 0.3]))
    assert result["loss"] == pytest.approx(expected_loss)
    at_065 = classification_metrics(labels, probs, num_classes=2, threshold=0.65)
    assert (at_065["sens"], at_065["spec"]) == (pytest.approx(1 / 3), pytest.approx(1 / 2))


def test_loss_is_finite_for_certain_wrong_predictions():
    result = classification_metrics(np.array([1, 0]), np.array([0.0, 1.0]), num_classes=2)
    assert np.isfinite(result["loss"]) and result["loss"] > 10


def test_multiclass_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([
        [0.8, 0.1, 0.1],
        [0.4, 0.5, 0.1],  # class 0 predicted as 1
        [0.1, 0.8, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.1, 0.8],
        [0.3, 0.1, 0.6],
    ])
    result = classification_metrics(labels, probs, num_classes=3)
    assert result["acc"] == pytest.approx(5 / 6)
    assert result["sens"] == pytest.approx((1 / 2 + 1 + 1) / 3)  # macro recall
    # Specificity of class 1: one of four non-1 samples called 1; others perfect.
    assert result["spec"] == pytest.approx((1 + 3 / 4 + 1) / 3)
    per_class = [pairwise_auc((labels == k).astype(int), probs[:, k]) for k in range(3)]
    assert result["auc"] == pytest.approx(np.mean(per_class))
    assert result["loss"] == pytest.approx(-np.mean(np.log([0.8, 0.4, 0.8, 0.7, 0.8, 0.6])))


def test_multiclass_auc_perfect_and_absent_class():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.3, 0.7, 0.0], [0.6, 0.4, 0.0]])
    # Class 2 never occurs: averaged over the classes present.
    assert classification_metrics(labels, probs, num_classes=3)["auc"] == 1.0


def test_evaluation_report_uses_validation_threshold():
    val_labels = np.array([0, 0, 0, 1, 1, 1])
    val_probs = np.array([0.6, 0.7, 0.75, 0.9, 0.95, 0.97])
    test_labels = np.array([0, 0, 1, 1])
    test_probs = np.array([0.65, 0.8, 0.92, 0.99])
    report = evaluation_report(test_labels, test_probs, 2, val_labels, val_probs)
    assert report["threshold"] == 0.9
    assert report["acc"] == 0.5 and report["spec"] == 0.0  # at 0.5 all positive
    assert report["acc_at_val_threshold"] == 1.0
    assert report["sens_at_val_threshold"] == 1.0
    assert report["spec_at_val_threshold"] == 1.0


def test_evaluation_report_keys():
    binary = evaluation_report(np.array([0, 1]), np.array([0.2, 0.7]), 2)
    assert set(binary) == {"loss", "acc", "auc", "sens", "spec"}
    multiclass = evaluation_report(np.array([0, 1, 2]), np.eye(3), 3, np.array([0, 1, 2]),
                                   np.eye(3))
    assert set(multiclass) == {"loss", "acc", "auc", "sens", "spec"}
    with pytest.raises(ValueError, match="both"):
        evaluation_report(np.array([0, 1]), np.array([0.2, 0.7]), 2, np.array([0, 1]))


def test_report_statistics_on_known_cases():
    from p2p_fl.learn.metrics import (bootstrap_auc_interval, calibration_bins, confusion_matrix,
                                      expected_calibration_error)

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = labels * 0.6 + rng.random(400) * 0.8  # good but not perfect
    low, high = bootstrap_auc_interval(labels, scores)
    auc = roc_auc(labels, scores)
    assert low < auc < high and 0.02 < high - low < 0.2
    assert bootstrap_auc_interval(labels, scores) == (low, high)  # seeded
    assert all(np.isnan(bootstrap_auc_interval(np.ones(5), np.arange(5.0))))
    assert confusion_matrix([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 2).tolist() == [[1, 1], [1, 2]]
    # Perfectly calibrated by construction: each image's label drawn with its own probability.
    probs = rng.random(20000)
    drawn = (rng.random(20000) < probs).astype(int)
    assert expected_calibration_error(drawn, probs) < 0.02
    assert expected_calibration_error(drawn, probs * 0.5) > 0.2  # under-confident by half
    assert sum(r["count"] for r in calibration_bins(drawn, probs)) == 20000
