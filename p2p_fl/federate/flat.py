"""Named weights <-> one flat float32 vector, and the plain weighted average.

Masks and fixed-point encoding work on one contiguous vector; the model is a dict of named
arrays. `flatten` fixes the order by sorted name, so two nodes that built their dicts in a
different order still agree coordinate by coordinate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


class LeafSpec(NamedTuple):
    """Where one named array lives in the flat vector."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


Spec = list[LeafSpec]


def _check_exact_in_float32(name: str, dtype: np.dtype) -> None:
    # float32 holds every value of these dtypes exactly, so flatten/unflatten round-trips.
    if not np.can_cast(dtype, np.float32, casting="safe"):
        raise ValueError(
            f"weight {name!r} has dtype {dtype}, which float32 cannot hold exactly; "
            "cast it to float32 before federating"
        )


def flatten(weights: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Spec]:
    """Concatenates named arrays, in sorted name order, into one float32 vector.

    Args:
        weights: name -> array. Dtypes must be exactly representable in float32 (float32,
            float16, bfloat16, bool, integers of at most 16 bits).

    Returns:
        (vector, spec): a fresh 1-D float32 array and the list of `LeafSpec` needed by
        `unflatten` to rebuild the dict exactly.

    Example:
        >>> v, spec = flatten({"b": np.ones(2, np.float32), "a": np.zeros((1, 2), np.float32)})
        >>> v
        array([0., 0., 1., 1.], dtype=float32)
        >>> unflatten(v, spec)["a"].shape
        (1, 2)
    """
    spec: Spec = []
    for name in sorted(weights):
        array = np.asarray(weights[name])
        _check_exact_in_float32(name, array.dtype)
        spec.append(LeafSpec(name, array.dtype, tuple(array.shape)))
    total = sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in spec)
    vector = np.empty(total, np.float32)
    offset = 0
    for leaf in spec:
        size = int(np.prod(leaf.shape, dtype=np.int64))
        vector[offset:offset + size] = np.asarray(weights[leaf.name]).reshape(-1)
        offset += size
    return vector, spec


def unflatten(vector: np.ndarray, spec: Spec) -> dict[str, np.ndarray]:
    """Inverse of `flatten`: splits `vector` back into named arrays of the recorded dtypes.

    Args:
        vector: 1-D array with exactly as many elements as `spec` describes.
        spec: as returned by `flatten`.

    Returns:
        name -> fresh array with the shape and dtype of `spec` (values are cast, so a
        non-integral average of an integer leaf is truncated by the cast).
    """
    vector = np.asarray(vector)
    total = sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in spec)
    if vector.ndim != 1 or vector.size != total:
        raise ValueError(f"vector has shape {vector.shape}, the spec needs ({total},)")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for leaf in spec:
        size = int(np.prod(leaf.shape, dtype=np.int64))
        out[leaf.name] = vector[offset:offset + size].reshape(leaf.shape).astype(leaf.dtype)
        offset += size
    return out


def weighted_average(models: Sequence[Mapping[str, np.ndarray]],
                     weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_i weights[i] * models[i] / sum_i weights[i], leaf by leaf.

    The plain (non-secure) gossip step, and the reference the secure sum is tested against.
    Accumulates in float64 so the order of the models does not matter to float32 precision.

    Args:
        models: dicts with identical names and shapes.
        weights: one non-negative weight per model, not all zero (normalised here).

    Returns:
        name -> float32 array.

    Example:
        >>> weighted_average([{"w": np.zeros(2)}, {"w": np.ones(2)}], [1, 3])["w"]
        array([0.75, 0.75], dtype=float32)
    """
    if len(models) != len(weights) or not models:
        raise ValueError(f"need one weight per model and at least one model, got {len(models)} models "
                         f"and {len(weights)} weights")
    w = np.asarray(weights, np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
    w = w / w.sum()
    names = set(models[0])
    for i, model in enumerate(models[1:], start=1):
        if set(model) != names:
            raise ValueError(f"model {i} has names {sorted(model)}, model 0 has {sorted(names)}")
    out: dict[str, np.ndarray] = {}
    for name in sorted(names):
        shape = np.shape(models[0][name])
        total = np.zeros(shape, np.float64)
        for i, model in enumerate(models):
            leaf = np.asarray(model[name])
            if leaf.shape != shape:
                raise ValueError(f"weight {name!r} of model {i} has shape {leaf.shape}, "
                                 f"model 0 has {shape}")
            total += w[i] * leaf.astype(np.float64)
        out[name] = total.astype(np.float32)
    return out
