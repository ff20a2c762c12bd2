"""The ring state machine, driven by hand: no sockets, a fake clock."""

import numpy as np
import pytest

from p2p_fl.net import wire
from p2p_fl.protocols import Finish, RingProtocol, Send, Train, ring_schedule
from p2p_fl.protocols.actions import Checkpoint
from routing import route

W = {"w": np.zeros(2, np.float32)}


def moves(actions):
    """The actions but checkpoints (which the driver writes before the others)."""
    return [a for a in actions if not isinstance(a, Checkpoint)]


def message(type_, sender, round_, tensors=None, **meta):
    return wire.Message(type_, "fed", sender, round_, seq=0, tensors=tensors or {}, meta=meta)


def ring(me, schedule, ack=1.0, handoff=10.0):
    return RingProtocol(me, schedule, ack_timeout_s=ack, handoff_timeout_s=handoff)


def test_schedule_listed_repeats_the_order_every_cycle():
    assert ring_schedule(["a", "b", "c"], 2, "listed", seed=0) == ["a", "b", "c"] * 2


@pytest.mark.parametrize("seed", range(20))
def test_shuffled_schedule_visits_every_site_once_per_cycle_and_never_twice_in_a_row(seed):
    peers = [f"s{i}" for i in range(5)]
    schedule = ring_schedule(peers, 4, "shuffle", seed)
    for c in range(4):
        assert sorted(schedule[c * 5:(c + 1) * 5]) == peers
    assert all(x != y for x, y in zip(schedule, schedule[1:]))
    assert schedule == ring_schedule(peers, 4, "shuffle", seed)



def deliver(sender, send):
    return message(send.type, sender, send.round, send.weights, **send.meta)


def took_final(actions):
    """Whether a site took the final model it was sent: it acknowledges it (and then stays
    until the others hold it too)."""
    return any(isinstance(a, Send) and a.type == wire.ACK and a.meta == {"of": wire.FINAL} for a in actions)


def test_first_site_trains_the_others_wait():
    assert isinstance(ring("a", ["a", "b"]).start(0)[0], Train)
    assert ring("b", ["a", "b"]).start(0) == []


def test_a_full_cwt_run_between_three_state_machines():
    """Routes every Send between three protocols; the model visits the schedule in order."""
    schedule = ring_schedule(["a", "b", "c"], 2, "shuffle", seed=1)
    sites = {n: ring(n, schedule) for n in "abc"}
    trace = route(sites, lambda site, step: {"w": np.full(2, step.round, np.float32)}, deliver,
                  tick_s=0.5, heartbeats=True)
    trained = [site for site, _ in trace.trained]
    finals = {site: finish.weights for site, finish in trace.finals.items()}
    assert trained == schedule
    assert set(finals) == {"a", "b", "c"}
    for weights in finals.values():  # everyone ends with the model of the last hop
        np.testing.assert_array_equal(weights["w"], np.full(2, len(schedule) - 1))


def test_holder_keeps_and_resends_the_model_until_acknowledged():
    p = ring("a", ["a", "b"], ack=1.0)
    p.start(0)
    [send] = moves(p.on_trained(0, W, now=0))
    assert (send.to, send.type, send.round) == ("b", wire.MODEL, 1)
    assert p.on_tick(0.5) == []
    [again] = p.on_tick(1.5)
    assert again.weights is W and again.round == 1
    p.on_message(message(wire.ACK, "b", 1, of=wire.MODEL), now=2)
    assert p.on_tick(10) == []


def test_a_silent_successor_is_skipped_and_the_model_goes_on():
    p = ring("a", ["a", "b", "c"], ack=1.0, handoff=5.0)
    p.start(0)
    p.on_trained(0, W, now=0)
    actions = p.on_tick(6.0)
    sends = [a for a in actions if isinstance(a, Send) and a.type == wire.MODEL]
    assert [(s.to, s.round) for s in sends] == [("c", 2)]
    assert p.skipped == ["b"]


def test_duplicate_model_is_acknowledged_but_not_trained_twice():
    p = ring("b", ["a", "b"])
    first = p.on_message(message(wire.MODEL, "a", 1, W), 0)
    assert [type(a) for a in first] == [Checkpoint, Send, Train]  # on disk before the ack
    again = p.on_message(message(wire.MODEL, "a", 1, W), 1)
    assert [type(a) for a in again] == [Send] and again[0].type == wire.ACK


def test_model_for_a_hop_that_is_not_ours_is_refused():
    p = ring("b", ["a", "b", "c"])
    with pytest.raises(wire.WireError, match="not b's"):
        p.on_message(message(wire.MODEL, "a", 2, W), 0)


def test_final_model_for_the_wrong_round_is_refused():
    p = ring("b", ["a", "b"])
    with pytest.raises(wire.WireError, match="expected 2"):
        p.on_message(message(wire.FINAL, "a", 7, W), 0)


def test_last_holder_finishes_only_when_every_site_has_the_final_model():
    p = ring("b", ["a", "b", "c", "a", "b"])
    p.on_peers(set(), set(), {"c": 3}, 0)  # c handed hop 3 on: the ring is near hop 4
    p.on_message(message(wire.MODEL, "a", 4, W), 0)
    actions = moves(p.on_trained(4, W, 0))
    assert sorted(a.to for a in actions) == ["a", "c"] and all(a.type == wire.FINAL for a in actions)
    assert p.on_message(message(wire.ACK, "a", 5, of=wire.FINAL), 0) == []
    assert p.on_message(message(wire.ACK, "c", 5, of=wire.FINAL), 0) == []  # delivered; c's word comes next
    [finish] = p.on_peers(set(), set(), {"a": 5, "c": 5}, 1.0)  # both hold the final
    assert isinstance(finish, Finish) and finish.weights is W


def test_only_the_site_the_schedule_names_may_hand_on_a_hop():
    p = ring("c", ["a", "b", "c", "d", "e", "c"])
    for sender in ("d", "a"):  # a held hop 0, but b holds hop 1 and is alive
        with pytest.raises(wire.WireError, match="by the schedule"):
            p.on_message(message(wire.MODEL, sender, 2, W), 0)
    # once c itself sees b dead, a (two hops back) may hand hop 2 on: b was skipped
    p.on_peers({"b"}, set(), {}, 0)
    assert isinstance(p.on_message(message(wire.MODEL, "a", 2, W), 0)[-1], Train)


def test_a_hop_far_ahead_needs_another_site_to_put_the_ring_there():
    """Forged in a review: e, which hands c its hop 5, sent hop 5 at once; c skipped its
    hop 2 and the run ended after one real hop."""
    p = ring("c", ["a", "b", "c", "d", "e", "c"])
    p.on_peers(set(), set(), {"e": 4}, 0)  # e's own word does not count
    with pytest.raises(wire.WireError, match="ahead of where the ring is"):
        p.on_message(message(wire.MODEL, "e", 5, W), 0)
    assert p.last_round_accepted == -1
    p.on_peers(set(), set(), {"d": 4}, 0)  # d handed hop 4 to e: the ring is there
    assert isinstance(p.on_message(message(wire.MODEL, "e", 5, W), 0)[-1], Train)


def test_a_final_model_only_from_the_last_holder():
    p = ring("a", ["a", "b", "c", "a", "b", "c"])
    with pytest.raises(wire.WireError, match="last holder"):
        p.on_message(message(wire.FINAL, "b", 6, W), 0)
    assert not p.finished
    assert took_final(p.on_message(message(wire.FINAL, "c", 6, W), 0)) and p.progress == 6


def run_ring(schedule, final):
    """Routes every Send between state machines; training sets every weight to the hop index."""
    sites = {n: ring(n, schedule) for n in set(schedule)}
    for p in sites.values():
        p.__init__(p.me, schedule, ack_timeout_s=1.0, handoff_timeout_s=10.0, final=final)
    trace = route(sites, lambda site, step: {"w": np.full(2, step.round, np.float32),
                                             "v": np.full(3, -step.round, np.float32)}, deliver,
                  tick_s=0.5, heartbeats=True)
    return {site: finish.weights for site, finish in trace.finals.items()}, [send.type for _, send in trace.sent]


def test_average_last_cycle_ends_with_the_mean_of_the_last_cycle_models():
    schedule = ring_schedule(["a", "b", "c"], 3, "shuffle", seed=4)
    finals, types = run_ring(schedule, "average-last-cycle")
    assert types.count(wire.MODEL_AVERAGE) == 2  # the two hand-offs inside the last cycle
    for weights in finals.values():  # hops 6, 7, 8 -> mean 7
        np.testing.assert_allclose(weights["w"], np.full(2, 7.0))
        np.testing.assert_allclose(weights["v"], np.full(3, -7.0))
        assert list(weights) == ["w", "v"]


def test_final_last_keeps_the_last_hop_model():
    finals, types = run_ring(ring_schedule(["a", "b", "c"], 3, "shuffle", seed=4), "last")
    assert wire.MODEL_AVERAGE not in types
    for weights in finals.values():
        np.testing.assert_array_equal(weights["w"], np.full(2, 8.0))


def test_a_running_mean_that_claims_more_models_than_hops_is_refused():
    p = RingProtocol("b", ["a", "b", "a", "b"], ack_timeout_s=1, handoff_timeout_s=5, final="average-last-cycle")
    tensors = {"w": np.zeros(2, np.float32), "average/w": np.zeros(2, np.float32)}
    with pytest.raises(wire.WireError, match="does not fit"):
        p.on_message(message(wire.MODEL_AVERAGE, "a", 3, tensors, averaged=5), 0)


def test_the_last_holder_s_predecessor_cannot_just_claim_it_was_skipped():
    """Found by the insider suite: the site before the last holder sent it a final model at
    the start, as if it had been skipped; it finished at once with an untrained model."""
    p = ring("b", ["a", "m", "b", "a", "m", "b"])
    with pytest.raises(wire.WireError, match="last holder"):
        p.on_message(message(wire.FINAL, "m", 6, W), 0)
    p.on_peers(set(), set(), {"m": 999}, 0)  # m's own word does not count
    with pytest.raises(wire.WireError, match="last holder"):
        p.on_message(message(wire.FINAL, "m", 6, W), 0)
    p.on_peers(set(), set(), {"a": 4}, 0)  # a handed hop 4 to m: we were skipped at hop 5
    assert took_final(p.on_message(message(wire.FINAL, "m", 6, W), 0))


def test_a_site_back_from_a_cut_link_takes_the_final_of_the_site_that_gave_up_on_it():
    """Found on network namespaces: c's link was down while b handed it the last hop; b gave
    up, ended the ring and sent the final; when the link came back c got the queued hop,
    then the final, refused it (c held that hop) and ended with a model of its own."""
    for queued_hop_arrived in (False, True):
        c = ring("c", ["a", "b", "c", "a", "b", "c"])
        c.on_message(message(wire.MODEL, "b", 2, W), 0)  # stale: the ring went on without c
        if queued_hop_arrived:
            c.on_trained(2, W, 0)
            assert isinstance(c.on_message(message(wire.MODEL, "b", 5, W), 0)[-1], Train)
        with pytest.raises(wire.WireError, match="last holder"):
            c.on_message(message(wire.FINAL, "a", 6, W), 0)  # a did not hand c its hops
        assert took_final(c.on_message(message(wire.FINAL, "b", 6, W), 0))


def test_a_final_refused_for_want_of_a_vouch_is_taken_when_the_vouching_heartbeat_follows():
    """Found on network namespaces (a slower machine): c's link came back with b's queued
    finals just ahead of a's heartbeat saying a held the final; c refused them all, b had
    given up resending, and c waited out the run timeout. The refused final is now held and
    taken once a third site's heartbeats vouch for it; the sender's own word still is not."""
    c = ring("c", ["a", "b", "c", "a", "b", "c"])
    c.on_peers({"a", "b"}, set(), {}, 0.0)
    c.on_peers(set(), {"a", "b"}, {"b": 6}, 1.0)  # b's word alone: not enough
    with pytest.raises(wire.WireError, match="last holder"):
        c.on_message(message(wire.FINAL, "b", 6, W), 1.0)
    assert c.on_peers(set(), set(), {"b": 6}, 1.1) == [] and c.progress == 0
    took = c.on_peers(set(), set(), {"a": 6}, 1.2)  # a holds it: the ring ended without c
    assert took_final(took) and [a.to for a in took if isinstance(a, Send)] == ["b"]
    assert c.progress == 6 and "none of its 2 hops" in c.shortfall()


def test_a_final_held_from_before_a_later_hop_is_never_taken():
    """Found by the insider suite: m forged a final in the first cycle; b held it, then took
    hop 5 from m, which made m the hander of b's last hop, and the held final passed the
    end-of-run rule. A hop that comes after a held final shows the run was not over."""
    b = ring("b", ["a", "m", "b"] * 3)
    b.on_message(message(wire.MODEL, "m", 2, W), 0.0)
    b.on_trained(2, W, 0.1)
    with pytest.raises(wire.WireError, match="last holder"):
        b.on_message(message(wire.FINAL, "m", 9, W), 0.2)  # forged: the ring is at hop 3
    b.on_message(message(wire.ACK, "a", 3, of=wire.MODEL), 0.3)
    assert isinstance(b.on_message(message(wire.MODEL, "m", 5, W), 1.0)[-1], Train)
    assert moves(b.on_peers(set(), set(), {"a": 5, "m": 999}, 1.1)) == [] and b.progress == 5


def test_a_hander_cannot_end_its_successor_s_run_before_the_last_cycle():
    b = ring("b", ["a", "m", "b", "a", "m", "b", "a", "m", "b"])
    b.on_message(message(wire.MODEL, "m", 2, W), 0)
    with pytest.raises(wire.WireError, match="last holder"):  # b's hop 5 is not of the last cycle
        b.on_message(message(wire.FINAL, "m", 9, W), 0)


def test_a_site_the_ring_never_reached_ends_saying_so_not_as_a_normal_finish():
    """b is down the whole run: a trains every hop alone (b skipped at each hand-off
    deadline) and its final model holds nobody else's work; a run that did include b
    reports no shortfall."""
    schedule = ring_schedule(["a", "b"], 2, "listed", seed=0)
    sites = {n: ring(n, schedule, handoff=3.0) for n in "ab"}
    trace = route(sites, lambda site, step: {"w": np.full(2, step.round, np.float32)}, deliver,
                  silent={"b"}, tick_s=1.0)
    assert "a" in trace.finals and [site for site, _ in trace.trained] == ["a", "a"]
    assert "no other site's model reached it" in sites["a"].shortfall()
    together = {n: ring(n, schedule) for n in "ab"}
    route(together, lambda site, step: {"w": np.full(2, step.round, np.float32)}, deliver, tick_s=1.0, heartbeats=True)
    assert all(site.finished and site.shortfall() is None for site in together.values())


def test_sites_holding_the_final_stay_until_every_site_does_so_one_back_from_a_crash_can_take_it():
    """Found by the chaos harness: s0 was killed while the ring raced through its last two
    hops (6 and 11, skipped; 6 not of the last cycle); the others got the final and left at
    once, so when s0 came back nobody could vouch that the ring was over: it refused the
    last holder's final and waited for nothing. Now a site holding the final stays (its
    heartbeats say so) until every other site does, or handoff_timeout_s after it came."""
    schedule = ["s0", "s3", "s1", "s2", "s1", "s2", "s0", "s3", "s2", "s3", "s1", "s0"]
    s2 = ring("s2", schedule, handoff=10.0)
    s2.on_peers({"s0"}, set(), {}, 0.0)  # s0 is down: s1 skipped it at hop 11
    assert took_final(s2.on_message(message(wire.FINAL, "s1", 12, W), 0.0))
    assert s2.progress == 12
    assert moves(s2.on_peers(set(), set(), {"s1": 12, "s3": 12}, 1.0)) == []  # s0 lacks it
    assert moves(s2.on_tick(9.0)) == []
    [finish] = moves(s2.on_tick(10.5))  # handoff_timeout_s after it came: s0 is given up on
    assert isinstance(finish, Finish) and np.array_equal(finish.weights["w"], W["w"])
    # s0 as its checkpoint left it: it trained hop 0 and s3 acknowledged hop 1; then it was
    # down for hops 6 and 11. Back, it hears a lingering site's heartbeat:
    s0 = ring("s0", schedule)
    s0.start(0.0)
    s0.on_trained(0, W, 0.0)
    s0.on_message(message(wire.ACK, "s3", 1, of=wire.MODEL), 0.0)
    with pytest.raises(wire.WireError, match="last holder"):
        s0.on_message(message(wire.FINAL, "s1", 12, W), 0.0)  # nobody vouches: it could be a lie
    s0.on_peers(set(), set(), {"s2": 12}, 0.0)
    assert took_final(s0.on_message(message(wire.FINAL, "s1", 12, W), 0.0))


def test_a_site_staying_for_the_others_after_the_final_takes_no_more_hops():
    """While it stays (its heartbeats vouch the ring is over), a hop sent to it, even by the
    site the schedule names, would start training after the end: refused."""
    c = ring("c", ["a", "b", "c", "a", "b", "c"])
    c.on_peers(set(), set(), {"a": 6}, 0.0)  # a holds the final: the ring is over
    assert took_final(c.on_message(message(wire.FINAL, "b", 6, W), 0.0))  # c was skipped at hops 2, 5
    with pytest.raises(wire.WireError, match="after the final model"):
        c.on_message(message(wire.MODEL, "b", 5, W), 0.0)


def test_a_site_cut_off_from_the_others_does_not_carry_the_ring_on_alone():
    """Found by p2p-fl chaos with network cuts: a site whose link went down saw every other
    site dead, skipped them all and trained its own hops to a final model, while the others
    repaired the ring without it: two final models. A site skips or repairs past the dead
    only while it sees most of the ring alive; alone, it keeps its hand-off and resends it."""
    schedule = ["a", "b", "c", "d"] * 2
    a = ring("a", schedule, ack=1.0, handoff=5.0)
    a.start(0)
    [send] = moves(a.on_trained(0, W, now=0))
    assert (send.to, send.round) == ("b", 1)
    assert moves(a.on_peers({"b", "c", "d"}, set(), {}, now=1.0)) == []  # cut off: everyone looks dead
    resends = moves(a.on_tick(20.0))  # long past the hand-off deadline: still b's hop, resent
    assert [(s.to, s.type, s.round) for s in resends] == [("b", wire.MODEL, 1)]
    assert a.skipped == [] and a.progress == 0
    # With most of the ring alive (only b dead), the same site skips b at once.
    other = ring("a", schedule, ack=1.0, handoff=5.0)
    other.start(0)
    other.on_trained(0, W, now=0)
    sends = [x for x in moves(other.on_peers({"b"}, set(), {}, now=1.0)) if isinstance(x, Send)]
    assert [(s.to, s.round) for s in sends] == [("c", 2)] and other.skipped == ["b"]


def test_a_predecessor_cut_off_keeps_its_repair_copy_instead_of_repairing_alone():
    schedule = ["a", "b", "c", "d"] * 2
    a = ring("a", schedule)
    a.start(0)
    a.on_trained(0, W, now=0)
    a.on_message(message(wire.ACK, "b", 1, of=wire.MODEL), now=0.5)  # b holds hop 1; a keeps a copy
    assert moves(a.on_peers({"b", "c", "d"}, set(), {}, now=1.0)) == []  # a alone: no repair
    assert a.repaired == 0
    # Back with the others, b still dead: now a repairs round b.
    sends = [x for x in moves(a.on_peers(set(), {"c", "d"}, {}, now=2.0)) if isinstance(x, Send)]
    assert [(s.to, s.round) for s in sends] == [("c", 2)] and a.repaired == 1


def test_a_site_back_from_a_cut_drops_its_stale_hand_off_when_the_final_comes():
    """Found by p2p-fl chaos: s0, cut off, kept its hand-off (no majority to skip); the others
    finished without it and sent it the final, which it took; then it waited on that
    hand-off to a site that had left until it gave up (exit 4) instead of finishing."""
    schedule = ["a", "b", "c", "d"] * 2
    a = ring("a", schedule, ack=1.0, handoff=5.0)
    a.start(0)
    a.on_trained(0, W, now=0)  # hop 1 to b, unacknowledged: a is cut off
    a.on_peers({"b", "c", "d"}, set(), {}, now=1.0)
    a.on_peers(set(), {"b", "c", "d"}, {"b": 7, "c": 7, "d": 7}, now=2.0)  # back: the ring is at the end
    took = a.on_message(message(wire.FINAL, "d", 8, W), now=2.5)
    assert took_final(took)
    finish = [x for x in a.on_peers(set(), set(), {"b": 8, "c": 8, "d": 8}, now=3.0) if isinstance(x, Finish)]
    assert len(finish) == 1 and a.finished


def test_no_hand_off_after_the_final_whatever_finishes_or_revives_after_it():
    """Found by p2p-fl chaos: back from a cut, a site got the hop it had been handed and the
    final (both held in the sockets during the cut) at once; its training of that hop ended
    after the final, and it handed the model on past the end, then waited on that hand-off
    until it gave up. Nothing is handed on once the final is held: not a hop trained after
    it, not a skip when a majority comes back."""
    schedule = ["a", "b", "c", "d"] * 2
    a = ring("a", schedule, ack=1.0, handoff=5.0)
    a.on_peers(set(), set(), {"b": 3, "c": 3}, now=0.0)
    a.on_message(message(wire.MODEL, "d", 4, W), now=0.0)  # a trains hop 4
    a.on_peers({"b"}, set(), {}, now=0.5)
    assert took_final(a.on_message(message(wire.FINAL, "d", 8, W), now=1.0))
    after = a.on_trained(4, W, now=1.5) + a.on_peers(set(), set(), {"c": 8, "d": 8}, now=2.0) + a.on_tick(9.0)
    assert not [x for x in after if isinstance(x, Send) and x.type in (wire.MODEL, wire.MODEL_AVERAGE)]
    assert a.skipped == [] and a.finished


def test_a_final_that_skipped_a_site_is_believed_once_that_site_says_it_holds_it():
    """Found by p2p-fl chaos: d skipped c's last hop while c was down for a moment; b never
    saw c dead, refused d's final, and waited until the run timeout. b now takes it once c's
    own heartbeats say c holds the final; a third site's word is not enough."""
    schedule = ["a", "b", "d", "c"] * 2
    b = ring("b", schedule)
    b.on_peers(set(), set(), {"a": 3, "c": 3, "d": 6}, now=0.0)
    b.last_round_accepted = 5
    final = message(wire.FINAL, "d", 8, W)
    with pytest.raises(wire.WireError, match="last holder"):
        b.on_message(final, now=1.0)
    b.on_peers(set(), set(), {"a": 8}, now=2.0)  # a third site's word: not enough
    with pytest.raises(wire.WireError, match="last holder"):
        b.on_message(final, now=2.0)
    b.on_peers(set(), set(), {"c": 8}, now=3.0)  # c itself holds the final
    assert took_final(b.on_message(final, now=3.0))
