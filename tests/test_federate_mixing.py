"""federate.mixing: graphs from the topology and their mixing weights."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_fl.federate import (
    complete,
    edge_list,
    is_connected,
    metropolis_hastings_weights,
    random_regular,
    ring_neighbours,
    sample_count_weights,
)

NAMES = [f"h{i:02d}" for i in range(12)]


def as_matrix(weights):
    names = sorted(weights)
    return np.array([[weights[i].get(j, 0.0) for j in names] for i in names])


def test_complete_and_ring():
    assert complete(["a", "b", "c"]) == {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}
    assert ring_neighbours(["a", "b", "c", "d"]) == {"a": {"b", "d"}, "b": {"a", "c"},
                                                     "c": {"b", "d"}, "d": {"a", "c"}}
    assert ring_neighbours(["a", "b"]) == {"a": {"b"}, "b": {"a"}}
    assert ring_neighbours(["a"]) == {"a": set()}
    with pytest.raises(ValueError, match="'a' is listed twice"):
        complete(["a", "b", "a"])


def test_edge_list_and_its_errors():
    assert edge_list(["a", "b", "c"], [("a", "b"), ("b", "a")]) == {"a": {"b"}, "b": {"a"}, "c": set()}
    with pytest.raises(ValueError, match="unknown peer 'zz'"):
        edge_list(["a", "b"], [("a", "zz")])
    with pytest.raises(ValueError, match="self loop"):
        edge_list(["a", "b"], [("a", "a")])


def test_connectivity():
    assert is_connected(ring_neighbours(NAMES))
    assert is_connected(complete(["solo"]))
    assert not is_connected(edge_list(["a", "b", "c", "d"], [("a", "b"), ("c", "d")]))
    assert not is_connected(random_regular(NAMES[:4], 0, seed=1))


def test_mh_weights_exact_on_a_path():
    w = metropolis_hastings_weights(edge_list(["a", "b", "c"], [("a", "b"), ("b", "c")]))
    expected = {"a": {"a": 2 / 3, "b": 1 / 3}, "b": {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3},
                "c": {"b": 1 / 3, "c": 2 / 3}}
    assert w.keys() == expected.keys()
    for i in w:
        assert w[i] == pytest.approx(expected[i], abs=1e-15)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), density=st.floats(0.1, 1.0), seed=st.integers(0, 10**6))
def test_mh_weights_symmetric_and_doubly_stochastic(n, density, seed):
    rng = np.random.default_rng(seed)
    names = NAMES[:n]
    edges = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if rng.random() < density]
    m = as_matrix(metropolis_hastings_weights(edge_list(names, edges)))
    np.testing.assert_allclose(m, m.T, atol=0)
    np.testing.assert_allclose(m.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(m >= 0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), k=st.integers(0, 11), seed=st.integers(0, 10**6))
def test_random_regular_degree_and_reproducibility(n, k, seed):
    if k >= n or n * k % 2:
        with pytest.raises(ValueError, match="regular"):
            random_regular(NAMES[:n], k, seed)
        return
    adj = random_regular(NAMES[:n], k, seed)
    assert all(len(nbrs) == k for nbrs in adj.values())
    assert all(node not in nbrs and all(node in adj[v] for v in nbrs) for node, nbrs in adj.items())
    # Same graph for the same seed whatever the order the names are listed in.
    assert random_regular(list(reversed(NAMES[:n])), k, seed) == adj


def test_random_regular_depends_on_seed_and_refuses_impossible_degrees():
    graphs = {frozenset((u, v) for u, nbrs in random_regular(NAMES[:10], 4, s).items() for v in nbrs)
              for s in range(5)}
    assert len(graphs) > 1
    with pytest.raises(ValueError, match="peers \\* k = 15 is odd"):
        random_regular(NAMES[:5], 3, seed=0)
    with pytest.raises(ValueError, match="0 <= k < number of peers"):
        random_regular(NAMES[:4], 4, seed=0)


def test_sample_count_weights_are_fedavg_on_the_complete_graph():
    adj = complete(["a", "b", "c"])
    w = sample_count_weights(adj, {"a": 100, "b": 300, "c": 0})
    assert w["a"] == w["b"] == w["c"] == {"a": 0.25, "b": 0.75, "c": 0.0}
    with pytest.raises(ValueError, match="need the complete graph"):
        sample_count_weights(ring_neighbours(["a", "b", "c", "d"]), dict.fromkeys("abcd", 1))
    with pytest.raises(ValueError, match="no sample count for \\['c'\\]"):
        sample_count_weights(adj, {"a": 1, "b": 1})
