"""Masks never repeat across runs (docs/protocols.md, "What holds against whom").

Pairwise mask seeds and share keys used to depend only on the long-term CURVE keys and
(federation, round, aggregator, pair): rerunning a federation repeated every mask, and an
aggregator that lied about a dropout in one run (collecting the dropped member's pairwise
corrections) unmasked that member in the next run, where its self-mask is released
honestly. Each site now draws a run key (`RunKey`) and every pair's secret mixes both
sites' run keys into the long-term one.
"""

import numpy as np
import pytest
import zmq
from processes import p2p_fl

from p2p_fl.federate import (
    Announcement,
    JoinedRounds,
    RunKey,
    complete,
    encode,
    fixed_point_for,
    join,
    prg,
    run_pair_secret,
    shared_secrets_with,
    start_sum,
)
from p2p_fl.federate import shares
from p2p_fl.net import wire
from p2p_fl.protocols import GossipProtocol, Send
from p2p_fl.protocols.gossip import SecureSetup, mixing_weights, secure_fixed_point

FED, AGG, GROUP, ROUND, LENGTH = "fed-runs", "z", ["a", "b", "c", "d"], 3, 2048
GRAPH = complete([AGG, *GROUP])
KEYS = {n: zmq.curve_keypair() for n in GRAPH}
STATIC = {n: shared_secrets_with(KEYS[n][1], {p: k[0] for p, k in KEYS.items()}, n) for n in GRAPH}
WEIGHTS = {m: 0.2 for m in GROUP}
CFG = fixed_point_for(clip=4.0, num_contributions=len(GROUP))


def run_secrets() -> dict:
    """The pair secrets of one run: every site draws its run key."""
    run_key = {n: RunKey() for n in GRAPH}
    return {n: {p: run_pair_secret(STATIC[n][p], run_key[n], run_key[p].public) for p in GRAPH if p != n}
            for n in GRAPH}


def one_sum(shared, models, told_dropped=()):
    """The aggregator's sum of round ROUND; it tells the members `told_dropped` dropped
    (a lie: every member replied). Returns the replies and the members' releases."""
    session = start_sum(federation=FED, round=ROUND, me=AGG, members=GROUP, weights=WEIGHTS,
                        fixed_point=CFG, length=LENGTH)
    members, replies = {}, {}
    for m in GROUP:  # each run starts with no sum joined
        members[m], replies[m] = join(session.request, federation=FED, me=m, topology=GRAPH, shared=shared[m],
                                      contribution=models[m], weight=WEIGHTS[m], fixed_point=CFG,
                                      joined=JoinedRounds())
    survivors = [m for m in GROUP if m not in told_dropped]

    def announcement(k):
        return Announcement(FED, ROUND, AGG, tuple(survivors), tuple(told_dropped),
                            {j: replies[j].encrypted_shares[k] for j in survivors if j != k})

    return replies, {k: members[k].release(announcement(k)) for k in survivors}


def unmask_across_runs(run1_shared, run2_shared) -> tuple[np.ndarray, np.ndarray]:
    """The attack: run 1, the aggregator says d dropped and collects the others' corrections
    for d (d's pairwise masks); run 2, all honest, it rebuilds d's self-mask from the shares
    and removes run 1's pairwise masks from d's reply. Returns (its guess, d's encoding)."""
    rng = np.random.default_rng(7)
    models = [{m: rng.uniform(-1, 1, LENGTH).astype(np.float32) for m in GROUP} for _ in range(2)]
    _, lied = one_sum(run1_shared, models[0], told_dropped=("d",))
    pairwise = sum(r.correction for r in lied.values())  # what d's pair masks add up to, negated
    replies, honest = one_sum(run2_shared, models[1])
    self_seed = shares.combine_seed({k: r.shares["d"] for k, r in honest.items()}, GROUP, 3)
    guess = replies["d"].masked - prg(self_seed, LENGTH) + pairwise
    return guess, encode(models[1]["d"], CFG, weight=WEIGHTS["d"])[0]


def test_an_aggregator_lying_about_a_dropout_in_one_run_learns_nothing_in_the_next():
    static = {n: dict(STATIC[n]) for n in GRAPH}
    guess, truth = unmask_across_runs(static, static)
    np.testing.assert_array_equal(guess, truth)  # without run keys: d's model, exactly
    guess, truth = unmask_across_runs(run_secrets(), run_secrets())
    assert np.mean(guess == truth) < 0.01  # with them: still masked


def sites(setups, run_key=None):
    graph = complete(sorted(setups))
    return {n: GossipProtocol(n, graph, mixing_weights(graph, {}), 2, round_timeout_s=10.0, secure=setups[n],
                              run_key=run_key if n == "a" else None) for n in graph}


def exchange(protocols):
    queue = [(n, a) for n, p in protocols.items() for a in p.start(0.0)]
    while queue:
        sender, action = queue.pop(0)
        if isinstance(action, Send) and action.type == wire.GOSSIP_HELLO:
            msg = wire.Message(action.type, "fed", sender, 0, 0, dict(action.weights), dict(action.meta))
            queue += [(action.to, a) for a in protocols[action.to].on_message(msg, 0.0)]


def test_every_run_of_the_same_federation_has_its_own_pair_secrets_and_a_restart_keeps_them():
    keys = {n: zmq.curve_keypair() for n in "abc"}
    graph = complete("abc")
    setups = {n: SecureSetup("fed", shared_secrets_with(keys[n][1], {p: k[0] for p, k in keys.items()}, n),
                             secure_fixed_point(graph, 8.0)) for n in "abc"}
    runs = [sites(setups) for _ in range(2)]
    for run in runs:
        exchange(run)
        assert run["a"]._run_shared["b"] == run["b"]._run_shared["a"]  # both ends agree
    assert runs[0]["a"]._run_shared["b"] != runs[1]["a"]._run_shared["b"]
    # A node restarted from its checkpoint stays in its run: same key, same secrets.
    state, arrays = runs[0]["a"].snapshot()
    resumed = sites(setups)["a"]
    resumed.restore(state, arrays, 0.0)
    assert resumed._run_shared == runs[0]["a"]._run_shared


def test_a_peer_cannot_change_its_run_key_within_a_run():
    keys = {n: zmq.curve_keypair() for n in "abc"}
    graph = complete("abc")
    setups = {n: SecureSetup("fed", shared_secrets_with(keys[n][1], {p: k[0] for p, k in keys.items()}, n),
                             secure_fixed_point(graph, 8.0)) for n in "abc"}
    run = sites(setups)
    exchange(run)
    second = np.frombuffer(RunKey().public, np.uint8)
    msg = wire.Message(wire.GOSSIP_HELLO, "fed", "b", 0, 0, {"run_key": second}, {"have": True})
    with pytest.raises(wire.WireError, match="different run key"):
        run["a"].on_message(msg, 0.0)
    low_order = wire.Message(wire.GOSSIP_HELLO, "fed", "c", 0, 0, {"run_key": np.zeros(32, np.uint8)}, {"have": True})
    fresh = sites(setups)["a"]
    with pytest.raises(wire.WireError, match="run key of c"):
        fresh.on_message(low_order, 0.0)


def test_a_site_refuses_to_take_part_twice_in_a_finished_run(tmp_path):
    config = tmp_path / "t.toml"
    config.write_text('federation = "once"\nprotocol = "local"\n[network]\ninsecure = true\n[[peers]]\nname = "a"\n')
    out = tmp_path / "a"
    out.mkdir()
    (out / "result.json").write_text('{"name": "a"}')
    done = p2p_fl("node", "--config", str(config), "--name", "a", "--out", str(out), timeout=300)
    assert done.returncode == 2, done.stderr
    assert "holds a finished run" in done.stderr and "Traceback" not in done.stderr
    assert (out / "result.json").read_text() == '{"name": "a"}'
