"""Predicting with an ensemble: the mean of the members' output probabilities.

The members are weight sets of one architecture; one `Learner` loads each in turn. The
learner is left holding the first member (a site's own model, by convention).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from p2p_fl.learn import metrics
from p2p_fl.learn.train import Learner

Weights = dict[str, np.ndarray]


def mean_probabilities(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities: the mean over members, computed in float64.

    Example:
        >>> mean_probabilities([np.array([0.2, 0.9]), np.array([0.4, 0.5])])
        array([0.3, 0.7])
    """
    if not member_probs:
        raise ValueError("an ensemble needs at least one member")
    shapes = {np.shape(p) for p in member_probs}
    if len(shapes) != 1:
        raise ValueError(f"members' probabilities differ in shape: {sorted(shapes)}")
    return np.mean(np.stack([np.asarray(p, np.float64) for p in member_probs]), axis=0)


def ensemble_proba(learner: Learner, members: Sequence[Weights], images: np.ndarray) -> np.ndarray:
    """The mean of the members' probabilities on `images` (see `Learner.predict_proba`)."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    probs = []
    for weights in members:
        learner.set_weights(weights)
        probs.append(learner.predict_proba(images))
    learner.set_weights(members[0])
    return mean_probabilities(probs)


def evaluate_ensemble(learner: Learner, members: Sequence[Weights], test_images: np.ndarray,
                      test_labels: np.ndarray, val_images: np.ndarray | None = None,
                      val_labels: np.ndarray | None = None) -> dict[str, float]:
    """`Learner.evaluate` for the ensemble: test metrics of the mean probabilities, with the
    binary threshold chosen on the ensemble's validation probabilities when given."""
    val_probs = None
    if val_images is None or len(val_images) == 0:
        val_labels = None
    else:
        val_probs = ensemble_proba(learner, members, val_images)
    test_probs = ensemble_proba(learner, members, test_images)
    return metrics.evaluation_report(test_labels, test_probs, learner.num_classes, val_labels, val_probs)
