"""The outer optimizer (FedAvgM, FedAdam without a server): the step, its checkpoint, and
gossip sites on the complete graph that stay identical while they take it."""

import json
import tomllib

import numpy as np
import optax
import pytest
from processes import p2p_fl, shipped_topology, small_dataset
from routing import route
from test_protocol_gossip import model, over_the_wire, secure_setups

from p2p_fl.config import ConfigError, parse_topology
from p2p_fl.federate import complete
from p2p_fl.learn.outer import OuterOptimizer
from p2p_fl.protocols import GossipProtocol
from p2p_fl.protocols.gossip import mixing_weights


@pytest.mark.pure
def test_momentum_steps_along_start_minus_average_and_statistics_take_the_average():
    outer = OuterOptimizer("momentum", learning_rate=0.5, momentum=0.9, statistics={"bn/mean"})
    start = {"w": np.array([1.0, 2.0], np.float32), "bn/mean": np.array([5.0], np.float32)}
    average = {"w": np.array([0.0, 1.0], np.float32), "bn/mean": np.array([3.0], np.float32)}
    first = outer.step(start, average)
    # Nesterov SGD on the pseudo-gradient g = start - average = 1: momentum 1, step lr * (g + 0.9 * 1).
    np.testing.assert_allclose(first["w"], start["w"] - 0.5 * 1.9, rtol=1e-6)
    np.testing.assert_array_equal(first["bn/mean"], average["bn/mean"])
    assert first["w"].dtype == np.float32
    second = outer.step(first, {"w": first["w"] - 1.0, "bn/mean": np.array([2.0], np.float32)})
    # Momentum carried over: 0.9 * 1 + 1 = 1.9, Nesterov step lr * (1 + 0.9 * 1.9).
    np.testing.assert_allclose(second["w"], first["w"] - 0.5 * (1 + 0.9 * 1.9), rtol=1e-5)


@pytest.mark.pure
def test_adam_matches_optax_and_its_state_survives_a_checkpoint():
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=5).astype(np.float32)}
    gradients = [rng.normal(size=5).astype(np.float32) for _ in range(3)]
    outer = OuterOptimizer("adam", learning_rate=0.01, momentum=0.9)
    reference = optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-3)
    state = reference.init(start)
    x = y = start
    for i, g in enumerate(gradients):
        if i == 2:  # a restart between rounds: the state comes back from the checkpoint's arrays
            saved = outer.snapshot()
            outer = OuterOptimizer("adam", learning_rate=0.01, momentum=0.9)
            outer.restore(saved, template=x)
        x = outer.step(x, {"w": x["w"] - g})  # the round's average moved by -g
        updates, state = reference.update({"w": g}, state, y)
        y = optax.apply_updates(y, updates)
        np.testing.assert_allclose(x["w"], np.asarray(y["w"]), rtol=1e-5, atol=1e-6)


def _gossip_sites(graph, outer_name, secure=None):
    initial = model(0.0)
    return {n: GossipProtocol(n, graph, mixing_weights(graph, {}), 4, round_timeout_s=10.0,
                              secure=secure and secure[n], initial=initial,
                              outer=OuterOptimizer(outer_name, 0.7, 0.9)) for n in graph}


@pytest.mark.pure
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_sites_on_the_complete_graph_take_the_same_outer_step_and_stay_identical(secure):
    graph = complete("abcd")
    sites = _gossip_sites(graph, "momentum", secure_setups(graph) if secure else None)
    shift = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.6}

    def train(site, step):  # each site moves its start model by its own amount
        base = step.weights if step.weights is not None else model(0.0)
        return {k: v + shift[site] for k, v in base.items()}

    finals = route(sites, train, over_the_wire).finals
    values = {n: float(f.weights["w"][0]) for n, f in finals.items()}
    assert max(values.values()) - min(values.values()) < 1e-4, values
    # The reference: one server running FedAvgM on the mean update 0.3 per round.
    reference = OuterOptimizer("momentum", 0.7, 0.9)
    x = model(0.0)
    for _ in range(4):
        x = reference.step(x, {k: v + 0.3 for k, v in x.items()})
    assert values["a"] == pytest.approx(float(x["w"][0]), abs=1e-4)
    assert values["a"] > 4 * 0.3  # momentum went further than plain averaging would


def _parse(text):
    return parse_topology(tomllib.loads(text))


@pytest.mark.pure
def test_an_unknown_outer_optimizer_or_a_bad_rate_is_one_line():
    base = 'federation = "f"\nprotocol = "gossip"\n[network]\ninsecure = true\n[gossip]\nsecure = false\n'
    peers = '[[peers]]\nname = "a"\n[[peers]]\nname = "b"\n[[peers]]\nname = "c"\n'
    with pytest.raises(ConfigError, match="outer_optimizer"):
        _parse(base + 'outer_optimizer = "lamb"\n' + peers)
    with pytest.raises(ConfigError, match="outer_learning_rate"):
        _parse(base + 'outer_optimizer = "adam"\nouter_learning_rate = 0\n' + peers)
    assert _parse(base + 'outer_optimizer = "adam"\n' + peers).gossip.outer_optimizer == "adam"


def test_a_site_killed_inside_a_sum_resumes_its_outer_optimizer_from_the_checkpoint(tmp_path):
    """Real sites in one process (the in-process engine: the node's Site, driver, secure
    sums and checkpoints): FedAdam on 4 sites, hospital-03 dies inside round 1's sum and
    restarts from its checkpoint a round later. The others never lost a member of their
    sums, so they end identical; the victim rejoins and ends with the federation."""
    data = small_dataset(tmp_path / "small.npz", train=400, val=80, test=120)
    topology = shipped_topology(tmp_path, "gossip-10.toml", **{'outer_optimizer = "momentum"': 'outer_optimizer = "adam"',
                                                              "outer_learning_rate = 1.0": "outer_learning_rate = 0.01"})
    out = tmp_path / "out"
    proc = p2p_fl("launch", str(topology), "--out", str(out), "--data", str(data), "--peers", "4", "--rounds", "4",
                  "--local-epochs", "1", "--engine", "inproc", "--kill", "hospital-03:1:sum:1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    nodes = {n["name"]: n for n in summary["nodes"]}
    assert summary["outer_optimizer"] == "adam" and nodes["hospital-03"]["resumes"] == 1
    finals = {n: dict(np.load(out / n / "final_model.npz")) for n in nodes}
    others = [n for n in nodes if n != "hospital-03"]
    for n in others[1:]:
        for k in finals[n]:
            np.testing.assert_allclose(finals[n][k], finals[others[0]][k], atol=1e-4)
    assert all(n.get("test_auc") is not None for n in nodes.values())
