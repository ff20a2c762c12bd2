"""Fixed-point encoding of float weights into integers modulo 2^bits, for exact masking.

Masks must cancel exactly and hide completely, which floats cannot do: a value x becomes
round(w * clip(x) * 2^frac_bits) modulo 2^bits (uint32 or uint64), masks are added with
wrap-around, and the modular sum is read back as a two's-complement signed integer.

Error bound, per coordinate, for a sum of n contributions w_j * x_j with total weight
W = sum_j |w_j| (see `error_bound`):

    |decode_sum - sum_j w_j * clip(x_j)|  <=  n * 2^-(frac_bits + 1)  +  2^-52 * clip * W

(the first term is rounding each contribution to the nearest step of 2^-frac_bits; the
second, the float64 product w * x, is negligible for uint32). On top of that comes the
float32 rounding of the decoded result (half an ulp: at most 2^-24 * |result|) and, for
every clipped value, w_j * (|x_j| - clip): clipping is counted by `encode`, never silent.

Nothing wraps as long as the largest possible sum fits the signed range, which
`check_capacity` enforces and `choose_frac_bits` guarantees:

    clip * W * 2^frac_bits * (1 + 2^-50) + n  <=  2^(bits - 1) - 1.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np


class FixedPoint(NamedTuple):
    """How floats become integers modulo 2^bits.

    Attributes:
        bits: 32 or 64, the width of the unsigned integers (and of the masks).
        frac_bits: the scale: one integer step is 2^-frac_bits.
        clip: model values are clipped to [-clip, clip] before weighting (and counted).
    """

    bits: int
    frac_bits: int
    clip: float


_UNSIGNED = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
_SIGNED = {32: np.dtype(np.int32), 64: np.dtype(np.int64)}
# The largest frac_bits we allow keeps 2^-frac_bits a normal float32 when decoding.
_MAX_FRAC_BITS = 100


def uint_dtype(cfg: FixedPoint) -> np.dtype:
    """The unsigned dtype (uint32 or uint64) of encoded vectors and masks under `cfg`."""
    _check_config(cfg)
    return _UNSIGNED[cfg.bits]


def _check_config(cfg: FixedPoint) -> None:
    if cfg.bits not in _UNSIGNED:
        raise ValueError(f"fixed-point bits must be 32 or 64, got {cfg.bits}")
    if not 0 <= cfg.frac_bits <= _MAX_FRAC_BITS:
        raise ValueError(f"frac_bits must be in [0, {_MAX_FRAC_BITS}], got {cfg.frac_bits}")
    if not (math.isfinite(cfg.clip) and cfg.clip > 0):
        raise ValueError(f"clip must be a positive finite number, got {cfg.clip}")


def _check_sum_args(num_contributions: int, total_weight: float) -> None:
    if num_contributions < 1:
        raise ValueError(f"need at least one contribution, got {num_contributions}")
    if not (math.isfinite(total_weight) and total_weight > 0):
        raise ValueError(f"total weight must be positive and finite, got {total_weight}")


def _fits(bits: int, frac_bits: int, clip: float, num_contributions: int, total_weight: float) -> bool:
    # Exact rational arithmetic: the check itself must not round its way past the limit.
    # (1 + 2^-50) covers the float64 rounding of w * x * 2^f; n covers rounding each term.
    largest = (Fraction(clip) * Fraction(total_weight) * 2**frac_bits * (1 + Fraction(1, 2**50))
               + num_contributions)
    return largest <= 2 ** (bits - 1) - 1


def check_capacity(cfg: FixedPoint, *, num_contributions: int, total_weight: float) -> None:
    """Refuses a configuration under which a sum could wrap around 2^bits.

    Args:
        cfg: the encoding.
        num_contributions: how many encoded vectors are summed (the group size).
        total_weight: sum of |w_j| over the contributions.

    Raises:
        ValueError: naming the numbers, when n * range does not fit the modulus.
    """
    _check_config(cfg)
    _check_sum_args(num_contributions, total_weight)
    if not _fits(cfg.bits, cfg.frac_bits, cfg.clip, num_contributions, total_weight):
        raise ValueError(
            f"a sum of {num_contributions} contributions with clip {cfg.clip}, total weight "
            f"{total_weight} and {cfg.frac_bits} fractional bits can exceed the signed range of "
            f"{cfg.bits} bits and wrap around; lower frac_bits (see choose_frac_bits), lower clip "
            "or use bits=64"
        )


def choose_frac_bits(*, clip: float, num_contributions: int, total_weight: float = 1.0,
                     bits: int = 32, min_frac_bits: int = 8) -> int:
    """The finest scale at which no sum of the given contributions can wrap.

    Args:
        clip: model values are clipped to [-clip, clip].
        num_contributions: the largest number of vectors ever summed (largest group).
        total_weight: the largest sum of |w_j| in one sum (1 for mixing weights).
        bits: 32 or 64.
        min_frac_bits: refuse rather than return a scale coarser than 2^-min_frac_bits.

    Returns:
        frac_bits, the largest value satisfying `check_capacity`.

    Raises:
        ValueError: if even `min_frac_bits` would let the sum wrap.

    Example:
        >>> choose_frac_bits(clip=8.0, num_contributions=10)
        27
    """
    _check_config(FixedPoint(bits, 0, clip))
    _check_sum_args(num_contributions, total_weight)
    room = 2 ** (bits - 1) - 1 - num_contributions
    if room <= 0:
        raise ValueError(f"{num_contributions} contributions leave no room in {bits} bits")
    frac_bits = min(_MAX_FRAC_BITS, math.floor(math.log2(room / (clip * total_weight))))
    while frac_bits >= min_frac_bits and not _fits(bits, frac_bits, clip, num_contributions, total_weight):
        frac_bits -= 1
    while frac_bits < _MAX_FRAC_BITS and _fits(bits, frac_bits + 1, clip, num_contributions, total_weight):
        frac_bits += 1
    if frac_bits < min_frac_bits:
        raise ValueError(
            f"clip {clip} times total weight {total_weight} over {num_contributions} contributions "
            f"leaves fewer than {min_frac_bits} fractional bits in {bits} bits; use bits=64 or a "
            "smaller clip"
        )
    return frac_bits


def fixed_point_for(*, clip: float, num_contributions: int, total_weight: float = 1.0,
                    bits: int = 32) -> FixedPoint:
    """`FixedPoint` with the finest safe scale (see `choose_frac_bits`)."""
    frac_bits = choose_frac_bits(clip=clip, num_contributions=num_contributions,
                                 total_weight=total_weight, bits=bits)
    return FixedPoint(bits, frac_bits, clip)


def error_bound(cfg: FixedPoint, *, num_contributions: int, total_weight: float = 1.0) -> float:
    """Largest per-coordinate error of `decode_sum` from fixed-point rounding.

    Excludes clipping (counted by `encode`) and the float32 rounding of the decoded value
    (at most 2^-24 times its magnitude).

    Args:
        cfg: the encoding.
        num_contributions: n, the number of encoded vectors summed.
        total_weight: sum of |w_j| of those contributions.

    Returns:
        n * 2^-(frac_bits + 1) + 2^-52 * clip * total_weight.
    """
    _check_config(cfg)
    _check_sum_args(num_contributions, total_weight)
    return num_contributions * 2.0 ** -(cfg.frac_bits + 1) + 2.0**-52 * cfg.clip * total_weight


def encode(x: np.ndarray, cfg: FixedPoint, *, weight: float = 1.0) -> tuple[np.ndarray, int]:
    """round(weight * clip(x) * 2^frac_bits) modulo 2^bits.

    The weight is applied in float before rounding, so the decoded sum of several members'
    encodings is their weighted sum.

    Args:
        x: float vector (any shape; flattened).
        cfg: the encoding; the caller has checked its capacity for the whole sum.
        weight: this contribution's mixing weight w_ij, finite, |weight| <= the total
            weight that capacity was checked for.

    Returns:
        (encoded, clipped): a fresh 1-D uint32/uint64 array, and how many values of `x`
        lay outside [-clip, clip] and were clipped.

    Raises:
        ValueError: if `x` holds NaN or infinity, or `weight` is not finite.

    Example:
        >>> u, clipped = encode(np.array([-1.5, 0.25, 9.0], np.float32), FixedPoint(32, 2, 8.0))
        >>> u, clipped
        (array([4294967290,          1,         32], dtype=uint32), 1)
    """
    _check_config(cfg)
    if not math.isfinite(weight):
        raise ValueError(f"weight must be finite, got {weight}")
    if not _fits(cfg.bits, cfg.frac_bits, cfg.clip, 1, abs(weight) or 1.0):
        raise ValueError(f"weight {weight} times clip {cfg.clip} does not fit {cfg.bits} bits "
                         f"at {cfg.frac_bits} fractional bits")
    values = np.array(x, dtype=np.float64, copy=True).reshape(-1)
    if not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise ValueError(f"cannot encode {bad} NaN or infinite values: the model has diverged")
    clipped = int(np.count_nonzero(values > cfg.clip) + np.count_nonzero(values < -cfg.clip))
    np.clip(values, -cfg.clip, cfg.clip, out=values)
    # weight * 2^f is exact (a power-of-two scaling), so each value is rounded once by the
    # product and once by rint: the error_bound terms.
    values *= weight * 2.0**cfg.frac_bits
    np.rint(values, out=values)
    # Capacity guarantees one contribution fits the signed type; the view reinterprets it
    # as two's complement, which is the value modulo 2^bits.
    return values.astype(_SIGNED[cfg.bits]).view(_UNSIGNED[cfg.bits]), clipped


def decode_sum(encoded_sum: np.ndarray, cfg: FixedPoint) -> np.ndarray:
    """Reads a modular sum of encodings back as float32.

    Args:
        encoded_sum: uint32/uint64 vector, the sum modulo 2^bits (masks removed).
        cfg: the encoding every contribution used.

    Returns:
        float32 vector: the signed (two's complement) value times 2^-frac_bits.

    Example:
        >>> decode_sum(np.array([4294967290, 1, 32], np.uint32), FixedPoint(32, 2, 8.0))
        array([-1.5 ,  0.25,  8.  ], dtype=float32)
    """
    _check_config(cfg)
    encoded_sum = np.asarray(encoded_sum)
    if encoded_sum.dtype != _UNSIGNED[cfg.bits]:
        raise ValueError(f"expected {_UNSIGNED[cfg.bits]} for {cfg.bits}-bit fixed point, "
                         f"got {encoded_sum.dtype}")
    # One rounding to float32, then an exact power-of-two scaling.
    out = encoded_sum.view(_SIGNED[cfg.bits]).astype(np.float32)
    out *= np.float32(2.0**-cfg.frac_bits)
    return out
