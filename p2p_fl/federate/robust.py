"""Robust aggregation for plain gossip: coordinate-wise median and trimmed mean.

A weighted mean follows any one model as far as it likes: a site that sends weights scaled
by 1e6 moves every coordinate of the mean by about 1e6 / n. The coordinate-wise median and
the trimmed mean take, coordinate by coordinate, a statistic that ignores the extremes, so
one site (a minority, in general) cannot drag the result outside the range of the others.

They need every model in the clear: with secure sums a site learns only the masked sum of
its neighbours' models, and no per-model statistic exists (docs/protocols.md).

Both ignore mixing weights: a weighted median would let a site with a large listed sample
count decide alone. The site's own model counts as one model among the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from p2p_fl.federate.flat import flatten, unflatten

AGGREGATIONS = ("mean", "median", "trimmed-mean")


def trimmed_count(num_models: int, trim: float) -> int:
    """How many models a trimmed mean cuts at each end: floor(trim * n), always leaving one.

    Example:
        >>> trimmed_count(10, 0.2), trimmed_count(4, 0.2), trimmed_count(3, 0.4)
        (2, 0, 1)
    """
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    cut = math.floor(trim * num_models)
    return min(cut, (num_models - 1) // 2)


def median_vectors(vectors: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of the rows of an (n, d) array, as float32.

    Example:
        >>> median_vectors(np.array([[0., 1.], [2., 3.], [1e6, -1e6]]))
        array([2., 1.], dtype=float32)
    """
    vectors = _rows(vectors)
    return np.median(vectors, axis=0).astype(np.float32)


def trimmed_mean_vectors(vectors: np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise mean of the rows of an (n, d) array after cutting, in each
    coordinate, the `trimmed_count(n, trim)` smallest and largest values; float32.

    Example:
        >>> trimmed_mean_vectors(np.array([[0.], [1.], [2.], [3.], [1e6]]), 0.2)
        array([2.], dtype=float32)
    """
    vectors = _rows(vectors)
    cut = trimmed_count(vectors.shape[0], trim)
    ordered = np.sort(vectors, axis=0)
    kept = ordered[cut:vectors.shape[0] - cut]
    return kept.mean(axis=0).astype(np.float32)


def robust_aggregate(models: Sequence[Mapping[str, np.ndarray]], rule: str,
                     trim: float = 0.2) -> dict[str, np.ndarray]:
    """The coordinate-wise median ("median") or trimmed mean ("trimmed-mean") of weight
    dicts with identical names and shapes; the result has the names and dtypes of models[0].

    Example:
        >>> honest = [{"w": np.full(2, v, np.float32)} for v in (1.0, 2.0, 3.0)]
        >>> robust_aggregate(honest + [{"w": np.full(2, 1e6, np.float32)}], "median")["w"]
        array([2.5, 2.5], dtype=float32)
    """
    if not models:
        raise ValueError("need at least one model")
    flats = []
    spec = None
    for i, model in enumerate(models):
        flat, model_spec = flatten(model)
        if spec is not None and model_spec != spec:
            raise ValueError(f"model {i} has other names, shapes or dtypes than model 0")
        spec = model_spec
        flats.append(flat)
    stacked = np.stack(flats)
    if rule == "median":
        vector = median_vectors(stacked)
    elif rule == "trimmed-mean":
        vector = trimmed_mean_vectors(stacked, trim)
    else:
        raise ValueError(f"robust rule {rule!r} is not one of median, trimmed-mean")
    return unflatten(vector, spec)


def _rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float64)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"need an (n, d) array with n >= 1, got shape {vectors.shape}")
    return vectors
