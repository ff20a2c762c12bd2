"""Sites that come and go: heartbeats, checkpoints, [[events]] and the protocols' answers to them.

Pure parts driven by hand (no sockets, a hand-moved clock); the checkpoint's atomicity is
checked against real `kill -9`s of a writing process.
"""

import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from p2p_fl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from p2p_fl.config import ConfigError, parse_topology
from p2p_fl.federate import complete
from p2p_fl.net import wire
from p2p_fl.net.heartbeat import DEAD, SUSPECT, ALIVE, Heartbeats
from p2p_fl.protocols import GossipProtocol, Send, Train
from p2p_fl.protocols.gossip import mixing_weights
from p2p_fl.protocols.actions import Checkpoint
from p2p_fl.protocols.ring import RingProtocol, ring_cycles
from routing import route

# -- heartbeats ---------------------------------------------------------------------------


def moves(actions):
    """The actions but checkpoints (which the driver writes before the others)."""
    return [a for a in actions if not isinstance(a, Checkpoint)]


def test_a_silent_peer_turns_suspect_then_dead_and_is_back_when_it_speaks():
    hb = Heartbeats(["b", "c"], interval_s=1.0, timeout_s=5.0, now=0.0)
    assert hb.state("b", 2.0) == ALIVE
    hb.heard("c", 3.0)
    assert hb.state("b", 3.5) == SUSPECT and hb.state("c", 3.5) == ALIVE
    assert hb.changes(5.5) == ({"b"}, set())
    assert hb.changes(5.6) == (set(), set())  # reported once
    hb.heard("b", 6.0, progress=7)
    assert hb.changes(6.0) == (set(), {"b"}) and hb.progress == {"b": 7}


def test_peers_that_fall_silent_together_are_reported_dead_together():
    """Found by p2p-fl chaos: a node whose link was cut saw b's timeout expire while c and d
    were only suspect, believed most of the ring alive and skipped b. A death waits while
    another peer is suspect; a lone death is reported at once (above)."""
    hb = Heartbeats(["b", "c", "d"], interval_s=1.0, timeout_s=5.0, now=0.0)
    hb.heard("c", 0.3)
    hb.heard("d", 0.6)  # then the link goes down: nothing more from anyone
    assert hb.changes(5.2) == (set(), set())  # b dead, c and d suspect: wait
    assert hb.state("b", 5.2) == DEAD and hb.state("c", 5.2) == SUSPECT
    assert hb.changes(5.4) == (set(), set())
    assert hb.changes(5.7) == ({"b", "c", "d"}, set())  # all three at once
    hb.heard("c", 6.0)
    assert hb.changes(6.0) == (set(), {"c"})


def test_heartbeats_go_out_every_interval_and_to_the_dead_only_now_and_then():
    hb = Heartbeats(["b"], interval_s=1.0, timeout_s=4.0, now=0.0)
    sent = [t / 10 for t in range(0, 100) if hb.due(t / 10)]
    assert sent[:5] == [0.0, 1.0, 2.0, 3.0, 4.0]  # alive and suspect: every interval
    assert sent[5:] == [8.0]  # dead after 4.0: once per timeout, so a cut link can heal


def test_heartbeat_interval_must_be_below_the_timeout():
    with pytest.raises(ValueError, match="interval"):
        Heartbeats(["b"], interval_s=5.0, timeout_s=5.0, now=0.0)


# -- checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trips_state_and_arrays(tmp_path):
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, {"round": 3, "joined": {"a": 2}}, {"w": np.arange(4, dtype=np.float32)})
    state, arrays = load_checkpoint(path)
    assert state == {"round": 3, "joined": {"a": 2}}
    np.testing.assert_array_equal(arrays["w"], np.arange(4, dtype=np.float32))


def test_an_unreadable_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="move it away"):
        load_checkpoint(path)


def test_kill_9_while_writing_checkpoints_always_leaves_a_valid_one(tmp_path):
    """A process rewrites its checkpoint as fast as it can; killed at 25 random moments, the
    file left behind always loads and is self-consistent (state and arrays of one write)."""
    path = tmp_path / "checkpoint.npz"
    writer = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import numpy as np
        from p2p_fl.checkpoint import save_checkpoint
        i = int(sys.argv[1])
        while True:
            save_checkpoint(Path({str(path)!r}), {{"i": i}}, {{"w": np.full(200_000, i, np.float32)}})
            if i == int(sys.argv[1]):
                print("writing", flush=True)
            i += 1
    """)
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(25):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(trial * 1_000_000)], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"writing\n"
        time.sleep(float(rng.uniform(0.0, 0.2)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state, arrays = load_checkpoint(path)
        assert np.all(arrays["w"] == state["i"])
        assert state["i"] >= trial * 1_000_000  # this writer's, not an older one left over
        seen.add(state["i"] - trial * 1_000_000)
    assert len(seen) > 1  # the kills did land at different points of the writing


# -- [[events]] in the topology -----------------------------------------------------------

BASE = {"federation": "f", "protocol": "gossip", "training": {"rounds": 6},
        "gossip": {"secure": False}, "peers": [{"name": n} for n in "abcd"]}


def topology(**changes):
    return parse_topology({**BASE, **changes})


def test_events_give_each_peer_the_rounds_it_is_away():
    t = topology(events=[{"round": 2, "peer": "b", "action": "leave"}, {"round": 4, "peer": "b", "action": "join"},
                         {"round": 3, "peer": "c", "action": "join"}, {"round": 5, "peer": "d", "action": "leave"}])
    assert t.absences() == {"b": {2, 3}, "c": {0, 1, 2}, "d": {5}}


@pytest.mark.parametrize("events, gossip, message", [
    ([{"round": 2, "peer": "x", "action": "leave"}], {}, "events[0].peer 'x' is not a peer"),
    ([{"round": 2, "peer": "b", "action": "pause"}], {}, "events[0].action 'pause' is not one of leave, join"),
    ([{"round": 6, "peer": "b", "action": "leave"}], {}, "events[0].round must be in 1..5"),
    ([{"round": 2, "peer": "b", "action": "leave"}, {"round": 3, "peer": "b", "action": "leave"}], {},
     "must alternate leave and join"),
    ([{"round": 1, "peer": n, "action": "leave"} for n in "abc"], {}, "fewer than 2 peers present in round 1"),
    ([], {"secure": True, "on_leave": "keep-last"}, "keep-last\" needs gossip.secure = false"),
    ([], {"secure": False, "on_leave": "remember"}, "gossip.on_leave 'remember' is not one of forget, keep-last"),
])
def test_bad_events_are_refused_naming_the_field(events, gossip, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        topology(events=events, gossip=gossip)


def test_a_ring_leaves_an_absent_site_out_of_its_cycles_and_keeps_the_others_order():
    plain = ring_cycles(list("abcd"), 3, "shuffle", seed=1)
    away = ring_cycles(list("abcd"), 3, "shuffle", seed=1, away={"b": frozenset({1})})
    assert away[0] == plain[0] and away[2] == plain[2]
    assert "b" not in away[1] and set(away[1]) == set("acd")


def test_ring_average_of_a_short_last_cycle_counts_only_its_hops():
    p = RingProtocol("a", ["a", "b", "c", "a", "c"], ack_timeout_s=1, handoff_timeout_s=5,
                     final="average-last-cycle", cycle_lengths=[3, 2])
    assert p.average_from == 3 and p.cycle_of == [0, 0, 0, 1, 1]


# -- gossip with absences, driven by hand ---------------------------------------------------


def model(value):
    return {"w": np.full(3, value, np.float32)}


def over_the_wire(sender, send):
    frames = [bytes(f) for f in wire.encode(send.type, federation="fed", sender=sender, round=send.round, seq=0,
                                            tensors=send.weights, meta=send.meta)]
    return wire.decode(frames, federation="fed", senders={sender}, tensor_spec=wire.spec_of(model(0.0)))


def run_plain(rounds, away, on_leave, train):
    """Three plain-gossip sites on the complete graph; heartbeats' progress fed as sites move."""
    graph = complete("abc")
    sites = {n: GossipProtocol(n, graph, mixing_weights(graph, {}), rounds, round_timeout_s=10.0, away=away,
                               on_leave=on_leave) for n in graph}
    trace = route(sites, train, over_the_wire, tick_s=0.5, heartbeats=True, count_refusals=True, max_steps=10_000)
    assert not trace.refused, trace.refused  # what a node would drop and count
    return trace.finals, [(site, step.round, dict(step.meta)) for site, step in trace.trained]


def test_forget_a_site_away_is_left_out_and_rejoins_with_its_own_model_when_it_returns():
    # b leaves at round 1 and joins again at round 3 of 4. Training adds the site's number.
    add = {"a": 1.0, "b": 10.0, "c": 100.0}
    finals, records = run_plain(4, {"b": frozenset({1, 2})}, "forget",
                                lambda site, step: model((0.0 if step.weights is None else step.weights["w"][0]) + add[site]))
    trained = {(s, r) for s, r, _ in records}
    assert ("b", 1) not in trained and ("b", 2) not in trained and ("b", 3) in trained
    # Rounds 1 and 2 mix a and c only; b's weights count again from round 3, trained from
    # the model it had when it left: nobody hands a site a model on demand.
    x0 = (1 + 10 + 100) / 3
    x = x0
    for _ in (1, 2):
        x = ((x + 1) + (x + 100)) / 2
    x = ((x + 1) + (x0 + 10) + (x + 100)) / 3
    for n in "abc":
        np.testing.assert_allclose(finals[n].weights["w"], x, rtol=1e-5)


def test_keep_last_keeps_an_absent_site_s_last_model_in_the_mean():
    add = {"a": 1.0, "b": 10.0, "c": 100.0}
    finals, _ = run_plain(3, {"b": frozenset({1, 2})}, "keep-last",
                          lambda site, step: model((0.0 if step.weights is None else step.weights["w"][0]) + add[site]))
    x0 = (1 + 10 + 100) / 3  # every site's model after round 0; b's last is 10
    x1 = ((x0 + 1) + 10 + (x0 + 100)) / 3
    x2 = ((x1 + 1) + 10 + (x1 + 100)) / 3
    for n in "ac":
        np.testing.assert_allclose(finals[n].weights["w"], x2, rtol=1e-5)
    assert finals["b"].meta.get("left_at") == 1  # gone for good: its model when it left
    np.testing.assert_allclose(finals["b"].weights["w"], x0, rtol=1e-5)


def test_no_message_asks_a_neighbour_for_its_model_on_demand():
    """Catching up by asking a neighbour for its mixed model let one site solve for the
    others' models (its own sums plus their mixes); the message type is gone from the wire."""
    frames = [b"".join([b""])]
    import msgpack

    header = {"v": wire.PROTOCOL_VERSION, "type": "gossip-fetch", "fed": "fed", "from": "b", "round": 1,
              "seq": 1, "tensors": [], "meta": {}}
    frames = [msgpack.packb(header)]
    with pytest.raises(wire.WireError, match="unknown type"):
        wire.decode(frames, federation="fed", senders={"b"}, tensor_spec=wire.spec_of(model(0.0)))


# -- ring repair, driven by hand -------------------------------------------------------------


def ring_site(me):
    return RingProtocol(me, ["a", "b", "c", "a", "b", "c"], ack_timeout_s=1, handoff_timeout_s=60)


def handed_to_b():
    """Site a trained hop 0 and b acknowledged hop 1."""
    a = ring_site("a")
    a.start(0.0)
    [send] = moves(a.on_trained(0, model(1.0), 0.0))
    assert (send.to, send.round) == ("b", 1)
    a.on_message(wire.Message(wire.ACK, "fed", "b", 1, seq=0, meta={"of": wire.MODEL}), 0.0)
    return a


def test_when_the_holder_dies_mid_training_its_predecessor_hands_its_copy_to_the_next_site():
    a = handed_to_b()
    actions = a.on_peers({"b"}, set(), {"b": 1, "c": 0}, 5.0)
    [send] = [x for x in actions if isinstance(x, Send)]
    assert (send.to, send.round) == ("c", 2) and a.repaired == 1 and a.skipped == ["b"]
    np.testing.assert_array_equal(send.weights["w"], model(1.0)["w"])  # the model b received, not lost


def test_no_repair_once_the_holder_reports_it_handed_the_model_on():
    a = handed_to_b()
    assert a.on_peers(set(), set(), {"b": 2, "c": 2}, 5.0) == []  # b: my hand-off of hop 2 was acknowledged
    assert a.on_peers({"b"}, set(), {}, 6.0) == [] and a.repaired == 0


def test_a_third_site_s_claim_does_not_make_the_predecessor_drop_its_repair_copy():
    """Found in a review: one heartbeat claiming a late hop made the predecessor drop its
    copy, and the holder's death then lost the model."""
    a = handed_to_b()
    assert a.on_peers(set(), set(), {"b": 1, "c": 999}, 5.0) == []
    [send] = [x for x in a.on_peers({"b"}, set(), {}, 6.0) if isinstance(x, Send)]
    assert (send.to, send.round) == ("c", 2) and a.repaired == 1


def test_a_dead_successor_is_skipped_at_once_not_at_the_hand_off_deadline():
    a = ring_site("a")
    a.start(0.0)
    a.on_trained(0, model(1.0), 0.0)  # hop 1 to b, not acknowledged
    [send] = [x for x in a.on_peers({"b"}, set(), {}, 3.0) if isinstance(x, Send)]
    assert (send.to, send.round) == ("c", 2)


def test_a_resumed_holder_given_a_newer_hop_while_it_listens_trains_only_that_one():
    """Found on a quiet machine: the ring had moved on to the resumed site's next hop before
    its listening time ended, and it trained that hop twice."""
    b = RingProtocol("b", ["a", "b", "c", "a", "b", "c"], ack_timeout_s=1, handoff_timeout_s=60)
    b.start(0.0)
    b.on_message(over_the_wire("a", Send("b", wire.MODEL, 1, model(1.0))), 0.0)  # b now trains hop 1
    state, arrays = b.snapshot()
    resumed = RingProtocol("b", ["a", "b", "c", "a", "b", "c"], ack_timeout_s=1, handoff_timeout_s=60,
                           resume_wait_s=1.0)
    resumed.restore(state, arrays, 10.0)
    assert resumed.start(10.0) == []  # listens first
    actions = resumed.on_message(over_the_wire("a", Send("b", wire.MODEL, 4, model(2.0))), 10.5)
    assert [a.round for a in actions if isinstance(a, Train)] == [4]
    assert [a for a in resumed.on_tick(11.5) if isinstance(a, Train)] == []


def test_a_repair_copy_a_live_site_does_not_take_is_dropped_not_passed_on():
    """The holder came back and handed the model on itself: passing our copy further would
    fork the ring with a model missing its work."""
    a = handed_to_b()
    a.on_peers({"b"}, set(), {}, 5.0)  # b died mid-training: our copy goes to c
    a.on_peers(set(), {"b"}, {}, 6.0)  # b is back from its checkpoint
    actions = a.on_tick(5.0 + 61)  # c never took the copy (it heard from b)
    assert not [x for x in actions if isinstance(x, (Send, Train))] and not a._pending


def test_the_federation_s_figures_leave_out_a_site_that_left_for_good():
    """A site gone for good keeps the model it left with: launch's summary averages the sites
    present at the end (the experiment's worst-site column still sees every site)."""
    from p2p_fl.launch import _final_metrics

    topology = parse_topology({"federation": "f", "protocol": "gossip",
                               "peers": [{"name": n} for n in "abc"], "gossip": {"secure": False}})
    nodes = [{"name": "a", "test_auc": 0.9}, {"name": "b", "test_auc": 0.8},
             {"name": "c", "test_auc": 0.5, "final_left_at": 3}]
    assert _final_metrics(topology, nodes)["test_auc"] == pytest.approx(0.85)
    assert _final_metrics(topology, nodes[2:])["test_auc"] == 0.5  # nobody else: what there is
