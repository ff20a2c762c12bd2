"""Chunked secure sums ([gossip] chunked, the complete graph): each site sums one slice of the
model over all the others and sends its mix of that slice to each of them. The state
machines routed by hand, every message through wire.encode/decode, as in
test_protocol_gossip.py; the attacks are protocol-valid messages from a site holding a
valid key."""

import dataclasses
import tomllib

import numpy as np
import pytest
from routing import route
from test_protocol_gossip import moves, secure_setups, start_all

from p2p_fl.config import chunked_sums, parse_topology
from p2p_fl.federate import Slices, chunk_spans, complete, error_bound, isolating_view, start_sum
from p2p_fl.net import wire
from p2p_fl.protocols import GossipProtocol, Send
from p2p_fl.protocols import gossip_messages as messages
from p2p_fl.protocols.gossip import mixing_weights

SIZE = 25_000  # values in the test model (100 kB): the messages' headers and shares count little beside it


def model_of(site, round_):
    rng = np.random.default_rng([ord(site), round_])
    return {"w": rng.normal(size=SIZE - 8).astype(np.float32), "b": rng.normal(size=8).astype(np.float32)}


def deliver(sender, send):
    frames = [bytes(f) for f in wire.encode(send.type, federation="fed", sender=sender, round=send.round, seq=0,
                                            tensors=send.weights, meta=send.meta)]
    return wire.decode(frames, federation="fed", senders={sender}, tensor_spec=wire.spec_of(model_of("a", 0)))


def sent_bytes(sender, send):
    return sum(len(bytes(f)) for f in wire.encode(send.type, federation="fed", sender=sender, round=send.round,
                                                  seq=0, tensors=send.weights, meta=send.meta))


def setups(graph, chunked=True):
    plain = secure_setups(graph)
    slices = Slices.of(graph, SIZE) if chunked else None
    return {n: dataclasses.replace(s, slices=slices) for n, s in plain.items()}


def sites_of(graph, rounds, samples, secure, timeout=10.0):
    weights = mixing_weights(graph, samples)
    return {n: GossipProtocol(n, graph, weights, rounds, round_timeout_s=timeout, secure=secure and secure[n],
                              initial=model_of("0", 0)) for n in graph}


def train(site, step):
    step_model = model_of(site, step.round)
    if step.weights is None:
        return step_model
    return {k: step.weights[k] + 0.1 * step_model[k] for k in step_model}


SAMPLES = {"a": 10, "b": 20, "c": 30, "d": 40, "e": 50}


def test_chunked_sums_give_every_site_the_full_sums_model_to_the_last_bit_and_the_plain_one_within_rounding():
    graph = complete("abcde")
    plain = route(sites_of(graph, 3, SAMPLES, None), train, deliver).finals
    full = route(sites_of(graph, 3, SAMPLES, setups(graph, chunked=False)), train, deliver).finals
    chunked = route(sites_of(graph, 3, SAMPLES, setups(graph)), train, deliver).finals
    bound = error_bound(secure_setups(graph)["a"].fixed_point, num_contributions=5)
    for site in graph:
        assert chunked[site].meta["chunks_heard"] == 4 and chunked[site].meta["chunks_missing"] == ""
        for k in ("w", "b"):
            # The same integers summed, only slice by slice at different sites.
            np.testing.assert_array_equal(chunked[site].weights[k], full[site].weights[k])
            np.testing.assert_array_equal(chunked[site].weights[k], chunked["a"].weights[k])
            np.testing.assert_allclose(chunked[site].weights[k], plain[site].weights[k], rtol=0, atol=3 * bound + 1e-6)


def test_a_site_sends_about_twice_its_model_a_round_not_once_per_neighbour():
    graph = complete("abcde")
    model_bytes = sum(a.nbytes for a in model_of("a", 0).values())

    def per_site_round(secure):
        trace = route(sites_of(graph, 2, SAMPLES, secure), train, deliver)
        sent = {n: 0 for n in graph}
        for sender, send in trace.sent:
            sent[sender] += sent_bytes(sender, send)
        return max(sent.values()) / 2

    full, chunked = per_site_round(setups(graph, chunked=False)), per_site_round(setups(graph))
    # Full sums: the masked model to each of 4 neighbours. Chunked: 4/5 of it out as masked
    # slices, 4/5 as the mix of our slice, plus shares and requests.
    assert full > 4 * model_bytes
    assert chunked < 2.5 * model_bytes
    assert chunked < full / 2


def test_a_slice_whose_site_is_down_keeps_the_start_values_at_every_site_and_is_not_waited_for_again():
    graph = complete("abcde")
    secure = setups(graph)
    sites = sites_of(graph, 2, SAMPLES, secure, timeout=5.0)
    trace = route(sites, train, deliver, silent=frozenset("e"), tick_s=1.0)
    lo, hi = secure["a"].slices.spans["e"]
    finals = trace.finals
    assert sorted(finals) == list("abcd")
    flat = {n: np.concatenate([finals[n].weights["b"], finals[n].weights["w"]]) for n in finals}
    for n in finals:
        assert finals[n].meta["chunks_missing"] == "e" and finals[n].meta["chunks_heard"] == 3
        # Every other slice is the same everywhere: the survivors' mix.
        for m in finals:
            np.testing.assert_array_equal(np.delete(flat[n], np.s_[lo:hi]), np.delete(flat[m], np.s_[lo:hi]))
    # e's slice: where the run started, at every site (no mix of it ever came).
    initial = np.concatenate([model_of("0", 0)["b"], model_of("0", 0)["w"]])
    for n in finals:
        np.testing.assert_array_equal(flat[n][lo:hi], initial[lo:hi])
    # Round 1 did not wait for e's slice: every site trained round 1 at the first round's deadline.
    trained_round_1 = [step for _, step in trace.trained if step.round == 1]
    assert len(trained_round_1) == 4 and all(s.meta["chunks_missing"] == "e" for s in trained_round_1)


def started(graph):
    secure = setups(graph)
    sites = sites_of(graph, 2, SAMPLES, secure)
    start_all(sites)
    return sites, secure


def test_a_member_refuses_a_sum_over_a_slice_that_is_not_the_aggregators():
    graph = complete("abcde")
    sites, secure = started(graph)
    a = sites["a"]
    a.on_trained(0, model_of("a", 0), 0.0)
    for span in (secure["a"].slices.spans["c"], None, (0, SIZE)):
        # b, holding its valid key, asks for c's slice (or the whole model) to learn what
        # c's published mix would not tell it.
        session = start_sum(federation="fed", round=0, me="b", members="acde", weights={m: 0.25 for m in "acde"},
                            fixed_point=secure["b"].fixed_point, length=SIZE if span is None else span[1] - span[0],
                            span=span)
        with pytest.raises(wire.WireError, match="slice"):
            a.on_message(deliver("b", messages.group("a", session.request)), 0.0)
    session = start_sum(federation="fed", round=0, me="b", members="acde", weights={m: 0.25 for m in "acde"},
                        fixed_point=secure["b"].fixed_point, length=np.subtract(*secure["b"].slices.spans["b"][::-1]),
                        span=secure["b"].slices.spans["b"])
    (reply,) = moves(a.on_message(deliver("b", messages.group("a", session.request)), 0.0))
    assert reply.type == wire.GOSSIP_MASKED and reply.weights["masked"].shape == (SIZE // 5,)


def test_a_mix_for_another_slice_out_of_range_or_sent_twice_is_refused():
    graph = complete("abcde")
    sites, secure = started(graph)
    a = sites["a"]
    a.on_trained(0, model_of("a", 0), 0.0)
    lo, hi = secure["a"].slices.spans["b"]
    good = np.zeros(hi - lo, np.float32)
    with pytest.raises(wire.WireError, match="slice"):  # b claims c's slice
        a.on_message(deliver("b", messages.chunk("a", 0, secure["a"].slices.spans["c"], good)), 0.0)
    for bad in (np.full(hi - lo, np.nan, np.float32), np.full(hi - lo, 1e30, np.float32)):
        with pytest.raises(wire.WireError, match="NaN|no mix can take"):
            a.on_message(deliver("b", messages.chunk("a", 0, (lo, hi), bad)), 0.0)
    with pytest.raises(wire.WireError, match="round 5"):
        a.on_message(deliver("b", messages.chunk("a", 5, (lo, hi), good)), 0.0)
    assert a.on_message(deliver("b", messages.chunk("a", 0, (lo, hi), good)), 0.0) == []
    with pytest.raises(wire.WireError, match="second"):
        a.on_message(deliver("b", messages.chunk("a", 0, (lo, hi), good)), 0.0)


def test_a_federation_without_chunked_sums_refuses_a_slice():
    graph = complete("abcd")
    secure = secure_setups(graph)
    sites = sites_of(graph, 2, {}, secure)
    start_all(sites)
    send = Send("a", wire.GOSSIP_CHUNK, 0, {"mix": np.zeros(2, np.float32)}, {"span_lo": 0, "span_hi": 2})
    frames = [bytes(f) for f in wire.encode(send.type, federation="fed", sender="b", round=0, seq=0,
                                            tensors=send.weights, meta=send.meta)]
    msg = wire.decode(frames, federation="fed", senders={"b"}, tensor_spec=[("w", "float32", (3,)), ("b", "float32", (1,))])
    with pytest.raises(wire.WireError, match="not chunked"):
        sites["a"].on_message(msg, 0.0)


def test_what_a_site_learns_from_the_published_mixes_isolates_nobody():
    # On each other site's slice a site learns that site's mix: its model plus the sum over
    # at least the fewest survivors of its group, which holds the site itself and others.
    for n in (3, 4, 5, 10):
        assert isolating_view(complete([f"s{i}" for i in range(n)]), chunked=True) is None


def test_sums_are_chunked_by_default_where_every_site_has_the_same_neighbourhood():
    import zmq

    text = """
federation = "fed"
protocol = "gossip"
[gossip]
secure = true
""" + "".join(f'[[peers]]\nname = "{n}"\naddress = "tcp://127.0.0.1:500{i}"\n'
              f'public_key = "{zmq.curve_keypair()[0].decode()}"\n' for i, n in enumerate("abcd"))
    assert chunked_sums(parse_topology(tomllib.loads(text)))
    assert not chunked_sums(parse_topology(tomllib.loads(text.replace("secure = true", "secure = true\nchunked = false"))))
    # Plain gossip holds models in the clear; on a ring each site's neighbourhood is its own.
    for other in ("secure = false", 'secure = true\ngraph = "ring"'):
        assert not chunked_sums(parse_topology(tomllib.loads(text.replace("secure = true", other))))


def test_slices_cover_the_model_once_in_name_order():
    spans = chunk_spans(["c", "a", "b"], 10)
    assert spans == {"a": (0, 3), "b": (3, 6), "c": (6, 10)}
    with pytest.raises(ValueError, match="non-empty"):
        chunk_spans(["a", "b", "c"], 2)


def test_the_slice_of_a_site_known_down_is_summed_by_its_backup_and_every_site_ends_with_one_model():
    graph = complete("abcde")
    secure = setups(graph)
    assert secure["a"].slices.backup("e") == "d" and secure["a"].slices.backup("c") == "d"
    sites = sites_of(graph, 2, SAMPLES, secure, timeout=5.0)
    for name, site in sites.items():  # the heartbeats have told everyone: e is down
        site.on_peers({"e"}, set(), {}, 0.0)
    trace = route(sites, train, deliver, silent=frozenset("e"), tick_s=1.0)
    finals = trace.finals
    assert sorted(finals) == list("abcd")
    for n in finals:
        assert finals[n].meta["chunks_missing"] == "" and finals[n].meta["survivors"] == 3
        assert finals[n].meta["chunks_stood_in"] == "e"
        for k in ("w", "b"):
            np.testing.assert_array_equal(finals[n].weights[k], finals["a"].weights[k])
    groups = [s for _, s in trace.sent if s.type == wire.GOSSIP_GROUP]
    d_span = secure["a"].slices.span("d", down={"e"})
    assert d_span == (secure["a"].slices.spans["d"][0], SIZE)  # d's slice and e's: the end of the model
    assert {(s.meta["span_lo"], s.meta["span_hi"]) for s in groups if s.meta["span_hi"] == SIZE} == {d_span}


def test_a_member_gives_each_value_to_one_sum_a_round_so_no_two_published_mixes_can_be_subtracted():
    # b stands in for a (a's backup) claiming a is down while a is not: the members that
    # answered b's sum over a's slice and b's refuse a's own sum of round 0. Were they to
    # join both, b's mix and a's would differ by the members a's sum has and b's lacks.
    graph = complete("abcde")
    sites, secure = started(graph)
    c = sites["c"]
    c.on_trained(0, model_of("c", 0), 0.0)
    slices = secure["a"].slices
    weights = {m: 0.25 for m in "acde"}
    cover = start_sum(federation="fed", round=0, me="b", members="acde", weights=weights,
                      fixed_point=secure["b"].fixed_point, length=slices.spans["b"][1], span=(0, slices.spans["b"][1]))
    (reply,) = moves(c.on_message(deliver("b", messages.group("c", cover.request)), 0.0))
    assert reply.type == wire.GOSSIP_MASKED
    own = start_sum(federation="fed", round=0, me="a", members="bcde", weights={m: 0.25 for m in "bcde"},
                    fixed_point=secure["a"].fixed_point, length=slices.spans["a"][1], span=slices.spans["a"])
    with pytest.raises(wire.WireError, match="one sum a round"):
        c.on_message(deliver("a", messages.group("c", own.request)), 0.0)
    # The ledger is in the checkpoint: a restarted c refuses too.
    state, arrays = c.snapshot()
    restarted = sites_of(graph, 2, SAMPLES, secure)["c"]
    restarted.restore(state, arrays, 0.0)
    assert restarted.mixer._joined_rounds.given == {0: [(0, slices.spans["b"][1])]}


def test_a_site_back_asking_to_sum_a_round_already_mixed_gets_the_members_published_mixes_once():
    from p2p_fl.protocols import Refuse

    graph = complete("abcde")
    secure = setups(graph)
    sites = sites_of(graph, 2, SAMPLES, secure, timeout=5.0)
    for site in sites.values():
        site.on_peers({"e"}, set(), {}, 0.0)
    route(sites, train, deliver, silent=frozenset("e"), tick_s=1.0)
    # e is back and rejoins round 1: its members gave e's slice to d, e's backup, that round.
    request = start_sum(federation="fed", round=1, me="e", members="abcd", weights={m: 0.25 for m in "abcd"},
                        fixed_point=secure["e"].fixed_point, length=np.subtract(*secure["e"].slices.spans["e"][::-1]),
                        span=secure["e"].slices.spans["e"]).request
    actions = sites["a"].on_message(deliver("e", messages.group("a", request)), 100.0)
    (mix,) = [x for x in actions if isinstance(x, Send)]
    assert mix.type == wire.GOSSIP_CHUNK and mix.to == "e" and mix.round == 1
    assert (mix.meta["span_lo"], mix.meta["span_hi"]) == secure["a"].slices.spans["a"]
    assert any(isinstance(x, Refuse) and "one sum a round" in x.reason for x in actions)
    with pytest.raises(wire.WireError, match="one sum a round"):  # the mix went once: now just the refusal
        sites["a"].on_message(deliver("e", messages.group("a", request)), 100.0)
    # Requests for rounds no mix of ours can be for are not remembered (memory stays bounded).
    asked = dict(sites["a"].mixer._asked)
    for round_ in (50, 900_000):
        far = request._replace(round=round_)
        with pytest.raises(wire.WireError):
            sites["a"].on_message(deliver("e", messages.group("a", far)), 100.0)
    assert sites["a"].mixer._asked == asked


def test_mixes_of_the_latest_two_rounds_ahead_are_kept():
    graph = complete("abcde")
    secure = setups(graph)
    sites = sites_of(graph, 1000, SAMPLES, secure)
    start_all(sites)
    a = sites["a"]
    span = secure["a"].slices.spans["b"]
    mix = np.zeros(span[1] - span[0], np.float32)
    for round_ in (3, 7, 900):  # a is at round 0: the latest two kept for a rejoin
        assert a.on_message(deliver("b", messages.chunk("a", round_, span, mix)), 0.0) == []
    assert sorted(a.mixer._chunks) == [7, 900]
    with pytest.raises(wire.WireError, match="later ones"):
        a.on_message(deliver("c", messages.chunk("a", 5, secure["a"].slices.spans["c"], mix)), 0.0)
