"""Median aggregation resists one node sending huge weights, over real processes.

Three honest node processes run plain gossip (one round, tiny shards) with a fourth site
whose keys were stolen: a real process on the real Peer and wire, which answers every
honest model with that model scaled by 1e6 (valid: the right spec, finite values, sent by
the authenticated peer, so every node accepts it). With the mean the honest sites' final
models are dragged to ~1e6 / 4 times their scale; with the coordinate-wise median they stay
in the honest range and predict as well as ever. Two federations, about a minute here.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import ROOT, run_nodes, small_shards, wait_listening, write_federation

from p2p_fl.config import load_topology
from p2p_fl.launch import node_env

HONEST = ["a", "b", "c"]
ATTACKER = "m"
SCALE = 1e6

# The attacker: a real peer with m's valid keys. Every honest model it hears for a round is
# answered, to every honest site, by that model times SCALE for the same round.
ATTACK = """
import sys, time
from pathlib import Path
from p2p_fl.site import site_curve
from p2p_fl.config import load_topology
from p2p_fl.learn import Learner
from p2p_fl.net import Peer, wire
config, keys, until = sys.argv[1], sys.argv[2], float(sys.argv[3])
t = load_topology(config)
me = t.peer("m")
curve = site_curve(t, "m", Path(keys) / "m.key_secret", Path(config))
others = {p.name: p.address for p in t.peers if p.name != "m"}
# Heartbeats like any node's, so the honest sites keep it among the living; under the
# federation's fingerprint, which an insider computes from the topology like any site.
from p2p_fl.fingerprint import federation_fingerprint
spec = Learner("small-cnn").weight_spec()
fingerprint = federation_fingerprint(t, (28, 28, 1), 2, spec, "p2p_fl")
peer = Peer("m", me.address, others, t.federation, spec, curve=curve, fingerprint=fingerprint,
            heartbeat_interval_s=t.network.heartbeat_interval_s, peer_timeout_s=t.network.peer_timeout_s)
attacked = set()
end = time.monotonic() + until
while time.monotonic() < end:
    peer.pulse(max(attacked, default=0))
    for msg in peer.receive(0.05):
        if msg.type == wire.GOSSIP_MODEL and msg.round not in attacked:
            attacked.add(msg.round)
            huge = {k: (v * %r).astype(v.dtype) for k, v in msg.tensors.items()}
            for to in others:
                peer.send(to, wire.GOSSIP_MODEL, msg.round, huge)
            print("attacked round", msg.round, flush=True)
peer.close()
""" % SCALE


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    return small_shards(tmp, HONEST, train=1536, val=192, test=96)


def run_poisoned(shards, out: Path, aggregation: str) -> dict:
    """Three honest nodes and the attacker; returns site -> result.json, models in `models`."""
    config = write_federation(out, HONEST + [ATTACKER], federation="robust-e2e", settings=(
        'protocol = "gossip"\n[training]\nrounds = 1\nlocal_epochs = 2\nbatch_size = 32\n'
        f'[gossip]\nsecure = false\naggregation = "{aggregation}"\nround_timeout_s = 60.0\n'))
    attacker = subprocess.Popen([sys.executable, "-c", ATTACK, str(config), str(out / "keys"), "240"], cwd=ROOT,
                                env=node_env(len(HONEST)), stdout=subprocess.PIPE, stderr=(out / "m.log").open("wb"))
    port = int(load_topology(config).peer(ATTACKER).address.rsplit(":", 1)[1])
    wait_listening(port, [attacker])  # up before the honest sites start counting its silence
    try:
        failed = run_nodes(config, shards, out)
    finally:
        if attacker.poll() is None:
            attacker.kill()
    attack_log = attacker.communicate()[0].decode()
    assert failed == {}, failed
    assert "attacked round 0" in attack_log, (out / "m.log").read_text()[-2000:]
    return {n: {**json.loads((out / n / "result.json").read_text()),
                "models": dict(np.load(out / n / "final_model.npz"))} for n in HONEST}


@pytest.fixture(scope="module")
def poisoned(setup, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {rule: run_poisoned(setup, base / rule, rule) for rule in ("mean", "median")}


def largest_weight(result) -> float:
    return max(float(np.abs(v).max()) for k, v in result["models"].items() if not k.endswith("/var"))


def test_every_honest_site_accepted_the_attackers_model(poisoned):
    for rule, results in poisoned.items():
        for n, r in results.items():
            assert r["final_survivors"] == 3 and r["final_dropped"] == "", (rule, n)  # a, b/c and m all heard
            assert r["dropped"] == {}, (rule, n, r["dropped"])


def test_with_the_mean_the_attacker_drags_every_honest_model(poisoned):
    for n, r in poisoned["mean"].items():
        assert largest_weight(r) > SCALE / 100, n


def test_with_the_median_the_honest_models_stay_sane(poisoned):
    for n, r in poisoned["median"].items():
        assert largest_weight(r) < 100, n
        assert r["test_loss"] is not None and r["test_loss"] < 1.0, n
        assert r["test_auc"] > 0.8, (n, r["test_auc"], "mean run:", poisoned["mean"][n]["test_auc"])
