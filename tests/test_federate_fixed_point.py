"""federate.fixed_point: exact encodings, the documented error bound, overflow and clipping."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_fl.federate import (
    FixedPoint,
    check_capacity,
    choose_frac_bits,
    decode_sum,
    encode,
    error_bound,
    fixed_point_for,
    modular_sum,
)


def test_negative_numbers_encode_as_twos_complement():
    cfg = FixedPoint(32, 4, 8.0)
    encoded, clipped = encode(np.array([-1.0, -0.0625, 0.0, 2.5], np.float32), cfg)
    assert clipped == 0
    np.testing.assert_array_equal(encoded, [2**32 - 16, 2**32 - 1, 0, 40])
    np.testing.assert_array_equal(decode_sum(encoded, cfg), [-1.0, -0.0625, 0.0, 2.5])


def test_weight_is_applied_before_rounding_and_sums_decode_exactly():
    cfg = FixedPoint(32, 4, 8.0)
    a, _ = encode(np.array([1.0, -2.5]), cfg, weight=0.5)
    b, _ = encode(np.array([0.25, 3.0]), cfg, weight=0.25)
    np.testing.assert_array_equal(decode_sum(modular_sum([a, b]), cfg), [0.5625, -0.5])


def test_uint64_round_trip():
    cfg = fixed_point_for(clip=8.0, num_contributions=3, bits=64)
    assert cfg.frac_bits > 50
    x = np.array([-7.999, 1e-9, 3.25], np.float32)
    encoded, _ = encode(x, cfg)
    assert encoded.dtype == np.uint64
    np.testing.assert_array_equal(decode_sum(encoded, cfg), x)


def test_clipping_is_counted_and_applied():
    cfg = FixedPoint(32, 8, 2.0)
    encoded, clipped = encode(np.array([-5.0, -2.0, 1.0, 2.5, 100.0], np.float32), cfg)
    assert clipped == 3  # -5, 2.5 and 100; exactly +-2 is inside.
    np.testing.assert_array_equal(decode_sum(encoded, cfg), [-2.0, -2.0, 1.0, 2.0, 2.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad):
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode(np.array([0.0, bad], np.float32), FixedPoint(32, 8, 2.0))


def test_choose_frac_bits_is_the_finest_scale_that_cannot_wrap():
    f = choose_frac_bits(clip=8.0, num_contributions=10, total_weight=1.0)
    assert f == 27
    check_capacity(FixedPoint(32, f, 8.0), num_contributions=10, total_weight=1.0)
    with pytest.raises(ValueError, match="wrap around"):
        check_capacity(FixedPoint(32, f + 1, 8.0), num_contributions=10, total_weight=1.0)
    # Heavier totals and larger clips get coarser scales.
    assert choose_frac_bits(clip=8.0, num_contributions=10, total_weight=4.0) == 25
    assert choose_frac_bits(clip=100.0, num_contributions=50) == 24


def test_overflow_is_refused_where_the_sum_would_really_wrap():
    # Two contributions of weight 1 at +clip: each is 2 * 2^29 = 2^30 and fits int32, but
    # their sum 2^31 does not, and would decode as -4 instead of +4.
    cfg = FixedPoint(32, 29, 2.0)
    with pytest.raises(ValueError, match="wrap around"):
        check_capacity(cfg, num_contributions=2, total_weight=2.0)
    a, _ = encode(np.array([2.0]), cfg, weight=1.0)
    assert decode_sum(modular_sum([a, a]), cfg)[0] == -4.0  # What the check prevents.
    check_capacity(FixedPoint(32, 28, 2.0), num_contributions=2, total_weight=2.0)
    with pytest.raises(ValueError, match="use bits=64 or a smaller clip"):
        choose_frac_bits(clip=1e6, num_contributions=1000, min_frac_bits=16)
    with pytest.raises(ValueError, match="does not fit 32 bits"):
        encode(np.array([1.0]), FixedPoint(32, 30, 4.0))


def test_config_is_validated():
    with pytest.raises(ValueError, match="32 or 64"):
        encode(np.zeros(1), FixedPoint(16, 4, 1.0))
    with pytest.raises(ValueError, match="clip must be a positive"):
        encode(np.zeros(1), FixedPoint(32, 4, 0.0))
    with pytest.raises(ValueError, match="expected uint32"):
        decode_sum(np.zeros(2, np.int32), FixedPoint(32, 4, 1.0))


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 12),
    length=st.integers(1, 200),
    clip=st.sampled_from([0.5, 1.0, 8.0, 100.0]),
    bits=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_error_bound_holds(n, length, clip, bits, seed):
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(n)) * rng.uniform(0.1, 1.0)
    total_weight = float(weights.sum())
    cfg = fixed_point_for(clip=clip, num_contributions=n, total_weight=total_weight, bits=bits)
    xs = (rng.uniform(-1.2, 1.2, (n, length)) * clip).astype(np.float32)
    encoded = []
    clipped_total = 0
    for x, w in zip(xs, weights):
        e, c = encode(x, cfg, weight=float(w))
        encoded.append(e)
        clipped_total += c
    assert clipped_total == int(np.count_nonzero(np.abs(xs) > clip))
    decoded = decode_sum(modular_sum(encoded), cfg)
    exact = (weights[:, None] * np.clip(xs.astype(np.float64), -clip, clip)).sum(axis=0)
    bound = error_bound(cfg, num_contributions=n, total_weight=total_weight)
    # Documented bound, plus half a float32 ulp of the decoded value.
    assert np.all(np.abs(decoded - exact) <= bound + 2.0**-24 * np.abs(exact) * (1 + 1e-9))
