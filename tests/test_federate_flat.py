"""federate.flat: exact round trips and the plain weighted average."""

import ml_dtypes
import numpy as np
import pytest

from p2p_fl.federate import flatten, unflatten, weighted_average


def test_flatten_orders_by_name_and_round_trips_exactly():
    weights = {
        "z/kernel": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
        "a/bias": np.array([1e-30, -3.0e38], np.float32),
        "count": np.array(7, np.int16),
        "half": np.array([0.1, -65504.0], np.float16),
        "brain": np.array([1.5, -0.0078125], ml_dtypes.bfloat16),
        "flag": np.array([True, False]),
    }
    vector, spec = flatten(weights)
    assert vector.dtype == np.float32 and vector.ndim == 1 and vector.size == 6 + 2 + 1 + 2 + 2 + 2
    assert [leaf.name for leaf in spec] == sorted(weights)
    np.testing.assert_array_equal(vector[:2], weights["a/bias"])  # "a/bias" comes first.
    back = unflatten(vector, spec)
    assert set(back) == set(weights)
    for name, array in weights.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        np.testing.assert_array_equal(back[name], array)


def test_flatten_does_not_depend_on_dict_order():
    a = {"x": np.ones(2, np.float32), "y": np.zeros(3, np.float32)}
    b = {"y": np.zeros(3, np.float32), "x": np.ones(2, np.float32)}
    np.testing.assert_array_equal(flatten(a)[0], flatten(b)[0])
    assert flatten(a)[1] == flatten(b)[1]


def test_unflatten_returns_independent_arrays():
    vector, spec = flatten({"w": np.ones(3, np.float32)})
    out = unflatten(vector, spec)
    vector[:] = 5
    np.testing.assert_array_equal(out["w"], np.ones(3))


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int64])
def test_flatten_refuses_dtypes_float32_cannot_hold(dtype):
    with pytest.raises(ValueError, match="'w' has dtype .* cast it to float32"):
        flatten({"w": np.ones(2, dtype)})


def test_unflatten_refuses_wrong_length():
    _, spec = flatten({"w": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"the spec needs \(3,\)"):
        unflatten(np.ones(4, np.float32), spec)


def test_weighted_average_exact():
    models = [{"w": np.array([0.0, 4.0])}, {"w": np.array([1.0, 8.0])}]
    out = weighted_average(models, [3, 1])
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], [0.25, 5.0])
    # Weights are normalised: scaling them changes nothing.
    np.testing.assert_array_equal(weighted_average(models, [0.75, 0.25])["w"], out["w"])


def test_weighted_average_refuses_mismatches():
    with pytest.raises(ValueError, match="one weight per model"):
        weighted_average([{"w": np.ones(1)}], [1, 2])
    with pytest.raises(ValueError, match="model 1 has names"):
        weighted_average([{"w": np.ones(1)}, {"v": np.ones(1)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        weighted_average([{"w": np.ones(1)}, {"w": np.ones(2)}], [1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_average([{"w": np.ones(1)}, {"w": np.ones(1)}], [1, -1])
