"""Robust aggregation: coordinate-wise median and trimmed mean, their config, and plain
gossip driven by hand with one neighbour sending huge weights."""

import doctest

import numpy as np
import pytest

from p2p_fl.config import ConfigError, parse_topology
from p2p_fl.federate import complete, robust
from p2p_fl.federate.robust import (
    median_vectors,
    robust_aggregate,
    trimmed_count,
    trimmed_mean_vectors,
)
from p2p_fl.net import wire
from p2p_fl.protocols import Finish, GossipProtocol, Send
from p2p_fl.protocols.actions import Checkpoint
from p2p_fl.protocols.gossip import mixing_weights


def test_docstring_examples():
    result = doctest.testmod(robust, extraglobs={"np": np}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 4


def test_median_and_trimmed_mean_match_numpy_and_scipy_on_random_data():
    from scipy.stats import trim_mean

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 10):
        vectors = rng.normal(size=(n, 50))
        np.testing.assert_allclose(median_vectors(vectors), np.median(vectors, axis=0), rtol=1e-6)
        for trim in (0.0, 0.1, 0.2, 0.3):
            expected = trim_mean(vectors, trim, axis=0) if trimmed_count(n, trim) == int(trim * n) else None
            got = trimmed_mean_vectors(vectors, trim)
            if expected is not None:
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # With no cut the trimmed mean is the mean.
    vectors = rng.normal(size=(4, 7))
    np.testing.assert_allclose(trimmed_mean_vectors(vectors, 0.0), vectors.mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_one_huge_model_cannot_move_the_result_outside_the_honest_range(rule):
    rng = np.random.default_rng(1)
    honest = [{"conv/kernel": rng.normal(size=(3, 3)).astype(np.float32),
               "bn/mean": rng.normal(size=4).astype(np.float32)} for _ in range(4)]
    attacker = {k: v * 1e6 for k, v in honest[0].items()}
    out = robust_aggregate(honest + [attacker], rule, trim=0.2)
    for name in honest[0]:
        stack = np.stack([h[name] for h in honest])
        assert out[name].dtype == np.float32 and out[name].shape == honest[0][name].shape
        assert np.all(out[name] >= stack.min(axis=0) - 1e-6) and np.all(out[name] <= stack.max(axis=0) + 1e-6)
    # The plain mean, for contrast, is dragged by about 1e6 / 5.
    mean = np.mean([m["conv/kernel"] for m in honest + [attacker]], axis=0)
    assert np.abs(mean).max() > 1e4


def test_trimmed_count_never_cuts_everything_and_refuses_bad_fractions():
    assert [trimmed_count(n, 0.2) for n in (1, 2, 4, 5, 9, 10)] == [0, 0, 0, 1, 1, 2]
    assert trimmed_count(2, 0.49) == 0 and trimmed_count(3, 0.49) == 1
    for bad in (-0.1, 0.5, 1.0):
        with pytest.raises(ValueError, match="trim must be in"):
            trimmed_count(5, bad)


def test_models_that_differ_in_names_or_shapes_are_refused():
    with pytest.raises(ValueError, match="model 1"):
        robust_aggregate([{"w": np.zeros(2, np.float32)}, {"w": np.zeros(3, np.float32)}], "median")
    with pytest.raises(ValueError, match="model 1"):
        robust_aggregate([{"w": np.zeros(2, np.float32)}, {"v": np.zeros(2, np.float32)}], "median")
    with pytest.raises(ValueError, match="not one of"):
        robust_aggregate([{"w": np.zeros(2, np.float32)}], "mode")


PEERS = "".join(f'[[peers]]\nname = "{n}"\n' for n in "abcd")


@pytest.mark.parametrize("table, error", [
    ('aggregation = "median"', "gossip.aggregation 'median' needs every neighbour's model in the clear"),
    ('aggregation = "trimmed-mean"\nsecure = true', "gossip.aggregation 'trimmed-mean'"),
    ('aggregation = "mode"\nsecure = false', "gossip.aggregation 'mode' is not one of mean, median, trimmed-mean"),
    ('aggregation = "trimmed-mean"\nsecure = false\ntrim = 0.5', "gossip.trim must be in [0, 0.5)"),
    ('aggregation = "median"\nsecure = false', None),
    ('aggregation = "trimmed-mean"\nsecure = false\ntrim = 0.25', None),
])
def test_robust_rules_are_refused_with_secure_sums_at_config_load(table, error):
    import tomllib

    raw = tomllib.loads(f'federation = "f"\nprotocol = "gossip"\n[gossip]\n{table}\n{PEERS}')
    if error is None:
        assert parse_topology(raw).gossip.aggregation in ("median", "trimmed-mean")
        return
    with pytest.raises(ConfigError) as err:
        parse_topology(raw)
    assert error in str(err.value) and "\n" not in str(err.value)


def model(value):
    return {"w": np.full(3, value, np.float32), "b": np.full(1, value, np.float32)}


def test_plain_gossip_with_median_ignores_a_neighbour_sending_huge_weights():
    """Site a mixes its own model (1.0) with b (2.0), c (3.0) and d (1e6, the attacker)."""
    graph = complete(list("abcd"))
    finals = {}
    for rule in ("mean", "median", "trimmed-mean"):
        site = GossipProtocol("a", graph, mixing_weights(graph, {}), 1, round_timeout_s=10.0,
                              aggregation=rule, trim=0.25)
        site.start(0.0)
        actions = site.on_trained(0, model(1.0), now=0.0)
        assert all(isinstance(a, (Send, Checkpoint)) for a in actions)
        for sender, value in (("b", 2.0), ("c", 3.0), ("d", 1e6)):
            actions = site.on_message(wire.Message(wire.GOSSIP_MODEL, "f", sender, 0, 0, model(value)), now=1.0)
        (final,) = [a for a in actions if not isinstance(a, Checkpoint)]
        assert isinstance(final, Finish) and list(final.weights) == ["w", "b"]
        finals[rule] = final.weights["w"][0]
    assert finals["median"] == pytest.approx(2.5)  # median of 1, 2, 3, 1e6
    assert finals["trimmed-mean"] == pytest.approx(2.5)  # 1 and 1e6 cut
    assert finals["mean"] > 1e5


def test_secure_gossip_refuses_a_robust_rule():
    graph = complete(list("abc"))
    with pytest.raises(ValueError, match="only mean with secure sums"):
        GossipProtocol("a", graph, mixing_weights(graph, {}), 1, round_timeout_s=1.0,
                       secure=object(), aggregation="median")
