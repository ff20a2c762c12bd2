"""The gossip state machine, driven by hand: no sockets, a fake clock."""

import dataclasses

import numpy as np
import pytest
from routing import route

from p2p_fl.federate import complete, metropolis_hastings_weights, ring_neighbours
from p2p_fl.net import wire
from p2p_fl.protocols import Finish, GossipProtocol, Send, Train
from p2p_fl.protocols.actions import CHECKPOINT, Checkpoint
from p2p_fl.protocols.gossip import mixing_weights


def moves(actions):
    """The actions but checkpoints (which the driver writes before the others)."""
    return [a for a in actions if not isinstance(a, Checkpoint)]


def model(value):
    return {"w": np.full(3, value, np.float32), "b": np.full(1, value, np.float32)}


def message(sender, round_, value, type_=wire.GOSSIP_MODEL):
    return wire.Message(type_, "fed", sender, round_, seq=0, tensors=model(value))


def gossip(me, graph, rounds=1, samples=None, timeout=10.0, secure=None):
    return GossipProtocol(me, graph, mixing_weights(graph, samples or {}), rounds, round_timeout_s=timeout,
                          secure=secure and secure[me])


def over_the_wire(sender, send):
    """The message as the receiver gets it: encoded, then checked by `wire.decode`."""
    frames = wire.encode(send.type, federation="fed", sender=sender, round=send.round, seq=0,
                         tensors=send.weights, meta=send.meta)
    frames = [bytes(f) for f in frames]
    return wire.decode(frames, federation="fed", senders={sender}, tensor_spec=wire.spec_of(model(0.0)))


def run(graph, rounds, samples, train, silent=(), tick=None, secure=None):
    """Every site's protocol on `graph`, routed (`routing.route`); `train(site, round,
    weights)` trains. Sites in `silent` only exchange run keys. Returns site -> its Finish."""
    sites = {n: gossip(n, graph, rounds, samples, secure=secure) for n in graph}
    return route(sites, lambda site, step: train(site, step.round, step.weights), over_the_wire,
                 silent=frozenset(silent), tick_s=tick).finals


def test_complete_graph_is_fedavg_with_sample_count_weights():
    graph = complete("abc")
    samples = {"a": 100, "b": 200, "c": 700}
    value = {"a": 1.0, "b": 2.0, "c": 4.0}
    finals = run(graph, 1, samples, lambda site, r, w: model(value[site]))
    expected = (100 * 1 + 200 * 2 + 700 * 4) / 1000
    for final in finals.values():
        np.testing.assert_allclose(final.weights["w"], expected, rtol=1e-6)
        assert list(final.weights) == ["w", "b"]  # the model's order: the wire checks it
        assert final.meta["survivors"] == 2 and final.meta["dropped"] == ""


def test_ring_graph_uses_metropolis_hastings_and_converges_to_the_plain_mean():
    names = [f"s{i}" for i in range(5)]
    graph = ring_neighbours(names)
    value = {n: float(i) for i, n in enumerate(names)}
    # Training keeps the model: only mixing moves it, so sites approach the mean, 2.0.
    finals = run(graph, 40, {},
                 lambda site, r, w: model(value[site]) if w is None else w)
    for final in finals.values():
        np.testing.assert_allclose(final.weights["w"], 2.0, atol=1e-3)
    row = metropolis_hastings_weights(graph)["s0"]
    assert gossip("s0", graph).row == pytest.approx(row)


def test_training_resumes_from_the_mixed_model_and_rounds_never_mix():
    graph = complete("ab")
    seen = []

    def train(site, round_, weights):
        seen.append((site, round_, None if weights is None else float(weights["w"][0])))
        return model(10.0 * round_ + (1.0 if site == "a" else 3.0))

    finals = run(graph, 2, {}, train)
    assert sorted(seen) == [("a", 0, None), ("a", 1, 2.0), ("b", 0, None), ("b", 1, 2.0)]
    np.testing.assert_allclose(finals["a"].weights["w"], 12.0)


def test_a_model_for_the_next_round_waits_and_stale_or_far_ones_are_refused():
    graph = complete("abc")
    a = gossip("a", graph, rounds=3)
    a.start(0)
    a.on_message(message("b", 1, 5.0), 0)  # b is one round ahead: kept
    # Further ahead: only each sender's latest model is kept (what a site behind rejoins
    # with), and never one for a round past the run.
    a.on_message(message("b", 2, 5.0), 0)
    for bad in (message("b", 2, 6.0), message("c", 3, 5.0)):
        with pytest.raises(wire.WireError, match="round"):
            a.on_message(bad, 0)
    assert a.on_message(message("b", 0, 2.0), 0) == []
    actions = a.on_trained(0, model(1.0), 0)
    assert [x.to for x in actions if isinstance(x, Send)] == ["b", "c"]
    actions = a.on_message(message("c", 0, 3.0), 0)
    (train,) = moves(actions)
    assert train.round == 1 and train.meta["mixed_round"] == 0
    np.testing.assert_allclose(train.weights["w"], 2.0)
    with pytest.raises(wire.WireError, match="round 0"):
        a.on_message(message("c", 0, 3.0), 1)  # too late: round 0 is mixed
    a.on_message(message("c", 1, 9.0), 1)
    (train,) = moves(a.on_trained(1, model(3.0), 1))[2:]  # b's round-1 model was kept
    np.testing.assert_allclose(train.weights["w"], (3.0 + 5.0 + 9.0) / 3)


def test_a_silent_neighbour_is_dropped_at_the_deadline():
    graph = complete("abc")
    a = gossip("a", graph, rounds=1, timeout=5.0)
    a.start(0)
    a.on_trained(0, model(1.0), now=100.0)
    assert a.on_message(message("b", 0, 3.0), 101.0) == []
    assert a.on_tick(104.9) == []
    (finish,) = moves(a.on_tick(105.0))
    assert isinstance(finish, Finish) and a.finished
    np.testing.assert_allclose(finish.weights["w"], 2.0)  # renormalised over a and b
    assert finish.meta["dropped"] == "c" and finish.meta["survivors"] == 1


def test_a_whole_run_with_a_silent_site_finishes_with_the_others():
    finals = run(complete("abcd"), 2, {}, lambda s, r, w: model(1.0), silent="d", tick=1.0)
    assert sorted(finals) == ["a", "b", "c"]
    assert all(f.meta["dropped"] == "d" for f in finals.values())


@pytest.mark.parametrize("msg, reason", [
    (message("b", 0, 1.0, type_=wire.MODEL), "unexpected"),
    (message("c", 0, 1.0), "not a neighbour"),
])
def test_refusals_name_the_reason(msg, reason):
    a = gossip("a", ring_neighbours(["a", "b", "x", "c", "y"]))
    a.start(0)
    with pytest.raises(wire.WireError, match=reason):
        a.on_message(msg, 0)


def test_a_second_model_for_the_same_round_is_refused():
    a = gossip("a", complete("abc"))
    a.start(0)
    a.on_message(message("b", 0, 1.0), 0)
    with pytest.raises(wire.WireError, match="second"):
        a.on_message(message("b", 0, 9.0), 0)


# The [gossip] section of a topology: wrong graphs are refused at start-up, naming the field.

PEERS = "".join(f'[[peers]]\nname = "{n}"\n' for n in "abcd")


def topology(gossip_table):
    return f'federation = "f"\nprotocol = "gossip"\n[gossip]\n{gossip_table}\n{PEERS}'


@pytest.mark.parametrize("table, field", [
    ('graph = "edges"\nedges = [["a", "b"], ["c", "d"]]\nsecure = false', "disconnected"),
    ('graph = "edges"\nedges = [["a", "b"], ["b", "zed"]]\nsecure = false', "gossip.edges: edge 'b' - 'zed' names unknown peer 'zed'"),
    ('graph = "edges"\nedges = [["a", "b", "c"]]', "gossip.edges must be a list"),
    ('edges = [["a", "b"]]', "gossip.edges is given but gossip.graph is 'complete'"),
    ('graph = "star"', "gossip.graph: 'star' is not one of"),
    ('graph = "regular:3"\nsecure = false\n', None),
    ('graph = "regular:5"', "gossip.graph: a 5-regular graph needs"),
    ('graph = "edges"\nedges = [["a", "b"], ["b", "c"], ["c", "d"]]', "a secure sum at a would reveal b's model alone"),
    ('graph = "edges"\nedges = [["a", "b"], ["b", "c"], ["c", "d"]]\nsecure = false', None),
    ('round_timeout_s = 0', "gossip.round_timeout_s"),
    ('samples = {a = 1, b = 2, c = 3}', "gossip.samples has no count for d"),
    ('samples = {a = 1, b = 2, c = 3, d = 4, e = 5}', "gossip.samples names unknown peers e"),
    ('samples = {a = 1, b = 2, c = 3, d = 0}', "gossip.samples must be positive integers; not for d"),
    ('secure = "yes"', "gossip.secure must be bool"),
    ('secure = true\n[network]\ninsecure = true', "network.insecure = true has none"),
    ('clip = -1.0', "gossip.clip must be > 0"),
])
def test_gossip_config_is_checked(table, field):
    import tomllib

    from p2p_fl.config import ConfigError, gossip_graph, parse_topology

    raw = tomllib.loads(topology(table))
    if field is None:
        assert len(gossip_graph(parse_topology(raw))) == 4
        return
    with pytest.raises(ConfigError, match=None) as err:
        parse_topology(raw)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_every_site_builds_the_same_random_regular_graph():
    import tomllib

    from p2p_fl.config import gossip_graph, parse_topology

    peers = "".join(f'[[peers]]\nname = "s{i}"\n' for i in range(10))
    text = f'federation = "f"\nprotocol = "gossip"\n[gossip]\ngraph = "regular:4"\ngraph_seed = 7\n{peers}'
    graphs = [gossip_graph(parse_topology(tomllib.loads(text))) for _ in range(2)]
    assert graphs[0] == graphs[1] and all(len(n) == 4 for n in graphs[0].values())


# Secure gossip: the same routing, every message through wire.encode/decode.

def secure_setups(graph, clip=8.0):
    import zmq

    from p2p_fl.federate import shared_secrets_with
    from p2p_fl.protocols.gossip import SecureSetup, secure_fixed_point

    keys = {n: zmq.curve_keypair() for n in graph}
    publics = {n: pub for n, (pub, _) in keys.items()}
    fixed_point = secure_fixed_point(graph, clip)
    return {n: SecureSetup("fed", shared_secrets_with(keys[n][1], publics, n), fixed_point) for n in graph}


def start_all(sites, now=0.0):
    """Starts every site and delivers their run keys (gossip-hello) to each other; returns
    whatever else the starts asked for."""
    queue = [(n, a) for n, site in sites.items() for a in site.start(now)]
    rest = []
    while queue:
        n, action = queue.pop(0)
        if isinstance(action, Send) and action.type == wire.GOSSIP_HELLO:
            queue += [(action.to, x) for x in sites[action.to].on_message(over_the_wire(n, action), now)]
        else:
            rest.append((n, action))
    return rest


def random_model(site, round_):
    rng = np.random.default_rng([ord(site), round_])
    return {"w": rng.normal(size=3).astype(np.float32), "b": rng.normal(size=1).astype(np.float32)}


@pytest.mark.parametrize("graph, samples", [
    (complete("abcd"), {"a": 10, "b": 20, "c": 30, "d": 40}),
    (ring_neighbours(list("abcde")), {}),
])
def test_secure_gossip_gives_the_plain_models_within_the_fixed_point_error(graph, samples):
    from p2p_fl.federate import error_bound

    def train(site, round_, weights):  # deterministic "training": add a site-and-round step
        step = random_model(site, round_)
        return step if weights is None else {k: weights[k] + step[k] for k in step}

    setups = secure_setups(graph)
    plain = run(graph, 3, samples, train)
    secure = run(graph, 3, samples, train, secure=setups)
    bound = error_bound(next(iter(setups.values())).fixed_point, num_contributions=4)
    for site in graph:
        assert secure[site].meta["kept_own"] is False and secure[site].meta["survivors"] == len(graph[site])
        for name in ("w", "b"):
            # Three rounds of rounding, each amplified at most by the (averaging) mixing.
            np.testing.assert_allclose(secure[site].weights[name], plain[site].weights[name], rtol=0, atol=3 * bound + 1e-6)
            assert secure[site].weights[name].dtype == np.float32
    if samples:  # the complete graph: every site added the same integers, its own model's too
        for site in graph:
            for name in ("w", "b"):
                np.testing.assert_array_equal(secure[site].weights[name], secure["a"].weights[name])


def test_secure_gossip_with_a_silent_site_keeps_own_models_then_sums_the_survivors():
    graph = complete("abcd")
    setups = secure_setups(graph)
    finals = run(graph, 2, {}, lambda s, r, w: random_model(s, r), silent="d", tick=1.0, secure=setups)
    assert sorted(finals) == ["a", "b", "c"]
    # Round 1 asked only the live neighbours: the sum over {a, b, c} is everyone's model.
    for site, final in finals.items():
        assert final.meta["kept_own"] is False and final.meta["members"] == 2
        expected = {k: np.mean([random_model(s, 1)[k] for s in "abc"], axis=0) for k in ("w", "b")}
        for k in expected:
            np.testing.assert_allclose(final.weights[k], expected[k], atol=1e-6)


def test_a_secure_round_with_a_dropout_in_a_group_of_three_keeps_the_own_model():
    graph = complete("abcd")
    setups = secure_setups(graph)
    sites = {n: gossip(n, graph, rounds=2, timeout=5.0, secure=setups) for n in graph}
    start_all(sites)
    a = sites["a"]
    sends = moves(a.on_trained(0, random_model("a", 0), now=0.0))
    assert sorted(s.to for s in sends) == ["b", "c", "d"] and {s.type for s in sends} == {wire.GOSSIP_GROUP}
    replies = []
    for n in "bc":  # d never answers
        sites[n].on_trained(0, random_model(n, 0), now=0.0)
        (reply,) = moves(sites[n].on_message(over_the_wire("a", next(s for s in sends if s.to == n)), 0.0))
        replies.append((n, reply))
    for n, reply in replies:
        assert a.on_message(over_the_wire(n, reply), 1.0) == []
    (train,) = moves(a.on_tick(5.0))
    assert train.meta["kept_own"] is True and train.meta["dropped"] == "d"
    assert "can drop safely" in train.meta["failure"]
    np.testing.assert_array_equal(train.weights["w"], random_model("a", 0)["w"])
    assert "d" in a.mixer._suspects


def test_requests_wait_for_the_members_own_training_and_foreign_groups_are_refused():
    graph = ring_neighbours(list("abcde"))  # a's neighbours: b, e
    setups = secure_setups(graph)
    sites = {n: gossip(n, graph, rounds=2, secure=setups) for n in graph}
    start_all(sites)
    a = sites["a"]
    request = wire.Message(wire.GOSSIP_GROUP, "fed", "b", 0, 0, {}, {"members": "a,c", "threshold": 2})
    assert a.on_message(request, 0.0) == []  # waits: a has not trained round 0 yet
    actions = a.on_trained(0, random_model("a", 0), 0.0)
    masked = [x for x in moves(actions) if x.type == wire.GOSSIP_MASKED]
    assert [x.to for x in masked] == ["b"] and masked[0].meta == {"share_for": "c"}
    foreign = wire.Message(wire.GOSSIP_GROUP, "fed", "e", 0, 0, {}, {"members": "a,b", "threshold": 2})
    with pytest.raises(wire.WireError, match="not neighbours of 'e'"):
        a.on_message(foreign, 0.0)
    with pytest.raises(wire.WireError, match="round 3"):
        a.on_message(dataclasses.replace(request, round=3), 0.0)


# The secure-sum messages on the wire: every tensor checked against what the meta announces.

def test_wire_sizes_match_the_federate_layer():
    from p2p_fl.federate import encrypt_share, new_self_seed, seed_commitment, split_seed

    seed = new_self_seed()
    shares = split_seed(seed, ["a", "b", "c"], 2)
    assert {len(s) for s in shares.values()} == {wire.SHARE_BYTES}
    blob = encrypt_share(shares["b"], key=bytes(32), federation="f", round=0, aggregator="x", sender="a",
                         recipient="b", members=("a", "b", "c"))
    assert len(blob) == wire.ENCRYPTED_SHARE_BYTES
    assert len(seed_commitment(seed, federation="f", round=0, aggregator="x", owner="a")) == wire.COMMITMENT_BYTES


def masked_message(length=4, share_for="b,c", shares=("b", "c"), share_bytes=wire.ENCRYPTED_SHARE_BYTES):
    tensors = {"masked": np.zeros(length, np.uint32), "commitment": np.zeros(32, np.uint8),
               **{wire.SHARE_PREFIX + k: np.zeros(share_bytes, np.uint8) for k in shares}}
    return wire.encode(wire.GOSSIP_MASKED, federation="fed", sender="a", round=0, seq=1, tensors=tensors,
                       meta={"share_for": share_for})


def decode(frames):
    return wire.decode([bytes(f) for f in frames], federation="fed", senders={"a", "b", "c"},
                       tensor_spec=wire.spec_of(model(0.0)))


def test_a_well_formed_masked_reply_decodes():
    msg = decode(masked_message())
    assert list(msg.tensors) == ["masked", "commitment", "share/b", "share/c"]


@pytest.mark.parametrize("frames, reason", [
    (masked_message(length=5), "shape"),
    (masked_message(shares=("b",)), "tensors listed"),
    (masked_message(share_for="c,b", shares=("c", "b")), "not sorted"),
    (masked_message(share_for="b,b", shares=("b", "b")), "not sorted or repeats"),
    (masked_message(share_bytes=43), "shape"),
    (wire.encode(wire.GOSSIP_MASKED, federation="fed", sender="a", round=0, seq=1), "share_for"),
    (wire.encode(wire.GOSSIP_GROUP, federation="fed", sender="a", round=0, seq=1,
                 meta={"members": "b,c", "threshold": "2"}), "threshold"),
    (wire.encode(wire.GOSSIP_RELEASE, federation="fed", sender="a", round=0, seq=1,
                 meta={"shares_of": "b", "correction": 1}), "correction"),
    (wire.encode(wire.GOSSIP_RELEASE, federation="fed", sender="a", round=0, seq=1,
                 tensors={"share/b": np.zeros(16, np.uint8)}, meta={"shares_of": "b", "correction": True}),
     "tensors listed"),
    (wire.encode(wire.GOSSIP_ANNOUNCE, federation="fed", sender="a", round=0, seq=1,
                 meta={"survivors": "b,c", "shares_from": ""}), "dropped"),
])
def test_malformed_secure_sum_messages_are_refused(frames, reason):
    with pytest.raises(wire.WireError, match=reason):
        decode(frames)


# Every gossip message's layout (gossip_messages.py): what a builder writes, wire.decode
# accepts, and the parser gives back what was built.

def test_every_gossip_message_round_trips_through_its_layout():
    from p2p_fl.federate import Announcement, GroupRequest, MaskedReply, Release
    from p2p_fl.protocols import gossip_messages as messages

    def blob(i, size=wire.ENCRYPTED_SHARE_BYTES):
        return bytes([i]) * size

    flat = np.arange(4, dtype=np.uint32)  # model(): w (3) and b (1)
    request = GroupRequest("fed", 2, "a", ("b", "c", "d"), 2)
    reply = MaskedReply(flat, {"d": blob(2), "c": blob(1)}, blob(9, wire.COMMITMENT_BYTES))
    announcement = Announcement("fed", 2, "a", ("b", "c"), ("d",), {"c": blob(3)})
    releases = [Release({"d": blob(6, wire.SHARE_BYTES), "c": blob(5, wire.SHARE_BYTES)}, flat + 7),
                Release({"c": blob(5, wire.SHARE_BYTES)}, None)]

    send = messages.group("b", request)
    assert (send.type, send.round, send.weights, send.meta) == (wire.GOSSIP_GROUP, 2, None,
                                                                {"members": "b,c,d", "threshold": 2})
    assert messages.parse_group(over_the_wire("a", send), "fed") == request

    send = messages.masked("a", 2, reply)
    assert list(send.weights) == ["masked", "commitment", "share/c", "share/d"]
    got = messages.parse_masked(over_the_wire("b", send), request.members)
    np.testing.assert_array_equal(got.masked, flat)
    assert (got.encrypted_shares, got.seed_commitment) == (reply.encrypted_shares, reply.seed_commitment)
    with pytest.raises(wire.WireError, match="made for another group"):
        messages.parse_masked(over_the_wire("b", send), ("b", "c"))

    send = messages.announce("b", announcement)
    assert send.meta == {"survivors": "b,c", "dropped": "d", "shares_from": "c"}
    assert messages.parse_announce(over_the_wire("a", send), "fed") == announcement

    for release in releases:
        send = messages.release("a", 2, release)
        assert send.meta["correction"] is (release.correction is not None)
        got = messages.parse_release(over_the_wire("b", send))
        assert got.shares == release.shares
        if release.correction is None:
            assert got.correction is None
        else:
            np.testing.assert_array_equal(got.correction, release.correction)

    key = blob(4, wire.RUN_KEY_BYTES)
    assert messages.parse_hello(over_the_wire("b", messages.hello("a", key, have=False))) == (key, False)
    weights = model(3.0)
    got = messages.parse_model(over_the_wire("b", messages.model("a", 1, weights)))
    assert list(got) == ["w", "b"] and all(np.array_equal(got[k], weights[k]) for k in weights)


def test_a_message_whose_layout_does_not_fit_is_refused_by_its_parser():
    from p2p_fl.protocols import gossip_messages as messages

    group = wire.Message(wire.GOSSIP_GROUP, "fed", "b", 0, 0, {}, {"members": "a,c", "threshold": 2})
    with pytest.raises(wire.WireError, match="gossip-announce was expected"):
        messages.parse_announce(group, "fed")
    stray = wire.Message(wire.GOSSIP_ANNOUNCE, "fed", "b", 0, 0, {},
                         {"survivors": "a,c", "dropped": "", "shares_from": "c"})
    with pytest.raises(wire.WireError, match="its meta announces"):
        messages.parse_announce(stray, "fed")
    with pytest.raises(wire.WireError, match="threshold"):
        messages.parse_group(dataclasses.replace(group, meta={"members": "a,c", "threshold": "2"}), "fed")


def test_each_mode_gets_its_mixer_and_a_subclass_can_swap_it():
    from p2p_fl.protocols.gossip_plain import PlainMixer
    from p2p_fl.protocols.gossip_secure import SecureMixer

    graph = complete("abc")
    assert type(gossip("a", graph).mixer) is PlainMixer
    assert type(gossip("a", graph, secure=secure_setups(graph)).mixer) is SecureMixer

    class Mine(SecureMixer):
        pass

    class Site(GossipProtocol):
        secure_mixer = Mine

    site = Site("a", graph, mixing_weights(graph, {}), 1, round_timeout_s=1.0, secure=secure_setups(graph)["a"])
    assert type(site.mixer) is Mine and site.mixer.site is site


def test_a_group_of_four_survives_one_dropout_with_pairwise_corrections():
    graph = complete("abcde")
    setups = secure_setups(graph)
    finals = run(graph, 1, {}, lambda s, r, w: random_model(s, r), silent="e", tick=1.0, secure=setups)
    expected = {k: np.mean([random_model(s, 0)[k] for s in "abcd"], axis=0) for k in ("w", "b")}
    for final in finals.values():
        # e was asked, never replied: the survivors' corrections remove its pairwise masks.
        assert final.meta["kept_own"] is False and final.meta["dropped"] == "e" and final.meta["survivors"] == 3
        for k in expected:
            np.testing.assert_allclose(final.weights[k], expected[k], atol=1e-6)


def test_a_bad_group_request_is_refused_when_it_arrives_not_when_training_ends():
    """Reviewed on the old code: a bad request waited for the member's training, then raised
    inside on_trained, which nothing caught: the node crashed (6 times in 90 s)."""
    graph = complete("abcd")
    setups = secure_setups(graph)
    sites = {n: gossip(n, graph, rounds=2, secure=setups) for n in graph}
    start_all(sites)  # a is training round 0
    a = sites["a"]
    for meta in ({"members": "a,c", "threshold": 1}, {"members": "a,b", "threshold": 2}):
        with pytest.raises(wire.WireError, match="refused"):
            a.on_message(wire.Message(wire.GOSSIP_GROUP, "fed", "b", 0, 0, {}, meta), 0.0)
    actions = a.on_trained(0, random_model("a", 0), 0.0)  # nothing waits that could raise
    assert {x.type for x in actions if isinstance(x, Send)} == {wire.GOSSIP_GROUP}


def test_a_member_whose_own_model_went_nan_refuses_the_waiting_request_and_goes_on():
    from p2p_fl.protocols import Refuse

    graph = complete("abcd")
    setups = secure_setups(graph)
    sites = {n: gossip(n, graph, rounds=2, secure=setups) for n in graph}
    start_all(sites)
    a = sites["a"]
    request = wire.Message(wire.GOSSIP_GROUP, "fed", "b", 0, 0, {}, {"members": "a,c,d", "threshold": 2})
    assert a.on_message(request, 0.0) == []  # valid: waits for a's training
    broken = {k: np.full_like(v, np.nan) for k, v in random_model("a", 0).items()}
    actions = a.on_trained(0, broken, 0.0)
    refusals = [x for x in actions if isinstance(x, Refuse)]
    assert len(refusals) == 1 and "NaN" in refusals[0].reason
    assert not [x for x in actions if isinstance(x, Send) and x.type == wire.GOSSIP_MASKED]


def test_a_trained_model_is_checkpointed_before_it_leaves():
    """Found in review: plain gossip sent its trained model with no checkpoint after the
    training; a crash then resumed with the key from before it, and a DP site would have
    trained again with the same noise (two releases, one noise) and not counted the first."""
    graph = complete("abc")
    a = gossip("a", graph, rounds=2)
    a.start(0.0)
    actions = a.on_trained(0, model(1.0), 0.0)
    assert [x.type for x in actions if isinstance(x, Send)] == [wire.GOSSIP_MODEL] * 2
    assert CHECKPOINT in actions


def test_a_plain_site_that_caught_up_while_listening_after_a_restart_trains_once():
    """Found by a randomised comparison of the gossip split: a restarted plain site that
    caught up from its neighbours' models during its listening window started a second
    Train of the same round when the window ended; its on_trained then raised."""
    graph = complete("abc")
    a = gossip("a", graph, rounds=5)
    a.start(0.0)
    state, arrays = a.snapshot()
    resumed = gossip("a", graph, rounds=5)
    resumed.restore(state, arrays, 10.0)
    assert moves(resumed.start(10.0)) == []  # listens first
    resumed.on_message(message("b", 3, 2.0), 10.5)
    (train,) = moves(resumed.on_message(message("c", 3, 4.0), 10.5))  # two neighbours at round 3
    assert isinstance(train, Train) and train.round == 3 and train.meta["rejoined_from"] == 0
    assert moves(resumed.on_tick(10.0 + resumed.resume_wait_s + 1)) == []  # no second Train
    actions = moves(resumed.on_trained(3, model(3.0), 20.0))
    (mixed,) = [x for x in actions if isinstance(x, Train)]
    assert mixed.round == 4 and mixed.meta["mixed_round"] == 3
    np.testing.assert_allclose(mixed.weights["w"], 3.0)


def test_a_site_that_mixed_with_nobody_ends_saying_so_not_as_a_normal_finish():
    """b is down after the start: a trains both rounds but every mix holds only its own
    model; the finish says so (the node then exits 3). With b there, no shortfall."""
    graph = complete("ab")
    sites = {n: gossip(n, graph, rounds=2, timeout=3.0) for n in graph}
    trace = route(sites, lambda site, step: model(1.0), over_the_wire, silent={"b"}, tick_s=1.0)
    assert "a" in trace.finals
    assert "mixed with no neighbour in any of the 2 rounds" in sites["a"].shortfall()
    together = {n: gossip(n, graph, rounds=2) for n in graph}
    route(together, lambda site, step: model(1.0), over_the_wire)
    assert all(site.finished and site.shortfall() is None for site in together.values())


def test_a_site_whose_last_mixes_no_neighbour_reached_ends_saying_so():
    """Found by p2p-fl chaos: a site back after the others had finished mixed its first round
    with them (their models were waiting) and trained the rest alone, then ended as if it
    had taken part. Its final model is not the federation's: the finish says so (exit 3),
    and the count survives a restart."""
    a = gossip("a", complete("ab"), rounds=3, timeout=3.0)
    a.start(0.0)
    a.on_trained(0, model(1.0), 0.0)
    (train,) = [x for x in a.on_message(message("b", 0, 3.0), 0.5) if isinstance(x, Train)]
    assert train.round == 1 and train.meta["survivors"] == 1 and a.shortfall() is None
    a.on_trained(1, model(1.0), 1.0)
    (train,) = [x for x in a.on_tick(5.0) if isinstance(x, Train)]  # b is gone: a mixes alone
    assert train.round == 2 and train.meta["survivors"] == 0
    assert "last 1 of 3 rounds" in a.shortfall()
    state, arrays = a.snapshot()
    resumed = gossip("a", complete("ab"), rounds=3, timeout=3.0)
    resumed.restore(state, arrays, 6.0)
    assert "last 1 of 3 rounds" in resumed.shortfall()
    a.on_trained(2, model(1.0), 6.0)
    a.on_tick(10.0)
    assert a.final is not None and "last 2 of 3 rounds' mixes" in a.shortfall()


def test_a_site_that_sees_its_neighbours_dead_waits_for_them_until_the_round_deadline():
    """Found by p2p-fl chaos: with two of four sites frozen for a few seconds, the other two
    saw too few live neighbours for a secure sum and raced through every round alone (and a
    plain site that saw all its neighbours dead did the same). A mix that would hold no
    neighbour's model waits for the dead until the round's deadline; one back in time is in it."""
    graph = complete("ab")
    a = gossip("a", graph, rounds=2, timeout=5.0)
    a.start(0.0)
    a.on_peers({"b"}, set(), {}, 0.5)
    assert moves(a.on_trained(0, model(1.0), 1.0)) == []  # b dead: nobody to send to
    assert moves(a.on_tick(3.0)) == []  # waits for b, within the round's deadline (6.0)
    a.on_peers(set(), {"b"}, {"b": 0}, 4.0)  # b is back and sends its round-0 model
    (train,) = [x for x in a.on_message(message("b", 0, 3.0), 4.5) if isinstance(x, Train)]
    assert train.round == 1 and train.meta["survivors"] == 1
    np.testing.assert_allclose(train.weights["w"], 2.0)
    # Past the deadline it mixes alone, as before.
    a.on_peers({"b"}, set(), {}, 5.0)
    a.on_trained(1, model(1.0), 5.0)
    assert moves(a.on_tick(9.0)) == []
    (final,) = [x for x in a.on_tick(10.5) if isinstance(x, Finish)]
    assert final.meta["survivors"] == 0


def test_a_secure_site_with_too_few_live_neighbours_waits_for_the_dead_until_the_deadline():
    graph = complete("abcd")
    setups = secure_setups(graph)
    sites = {n: gossip(n, graph, rounds=2, timeout=5.0, secure=setups) for n in graph}
    start_all(sites)
    a = sites["a"]
    a.on_peers({"c", "d"}, set(), {}, 0.5)  # two of its three neighbours frozen
    assert [x for x in moves(a.on_trained(0, random_model("a", 0), now=1.0)) if isinstance(x, Train)] == []
    assert [x for x in a.on_tick(3.0) if isinstance(x, Train)] == []  # no sum, no lone mix yet
    a.on_peers(set(), {"c", "d"}, {}, 4.0)  # back before the deadline (6.0)
    groups = [x for x in moves(a.on_tick(4.0)) if isinstance(x, Send) and x.type == wire.GOSSIP_GROUP]
    assert sorted(s.to for s in groups) == ["b", "c", "d"]  # a's sum now asks all three


def hand_delivery(sites, held, *, train_below=1, trained=None):
    """Delivers actions by hand: each Send goes over the wire to its site, a Train of a round
    below `train_below` is trained at once (`trained(site, round)`, random models by
    default), and later Trains wait in `held` (site -> Train) for the test to play."""
    trained = trained or random_model

    def deliver(actions, now):
        queue = list(actions)
        while queue:
            n, action = queue.pop(0)
            if isinstance(action, Send):
                queue += [(action.to, x) for x in sites[action.to].on_message(over_the_wire(n, action), now)]
            elif isinstance(action, Train) and action.round < train_below:
                queue += [(n, x) for x in sites[n].on_trained(action.round, trained(n, action.round), now)]
            elif isinstance(action, Train):
                held[n] = action

    return deliver


def test_a_secure_sum_waits_once_more_for_a_live_member_still_a_round_behind():
    """Found in test_fault_tolerance on a busy machine: c did not wait for a dead site in
    round 6 while the others did, so c reached the last round a round-timeout ahead, its sum
    got no reply before its deadline and it ended alone. A member whose heartbeats say it is
    a round behind answers when it gets here: the aggregator waits one more round time for
    it (once), and the sum takes it in."""
    graph = complete("abcd")
    setups = secure_setups(graph)
    sites = {n: gossip(n, graph, rounds=2, timeout=5.0, secure=setups) for n in graph}
    first = start_all(sites)  # every site's Train for round 0
    held = {}  # site -> its round-1 Train

    deliver = hand_delivery(sites, held)

    deliver(first, 0.0)
    assert sorted(held) == list("abcd")  # round 0 mixed everywhere
    a = sites["a"]
    a.on_peers(set(), set(), {"b": 1, "c": 1, "d": 0}, 10.0)  # d's heartbeat: still at round 0
    deliver([("a", x) for x in a.on_trained(1, random_model("a", 1), 10.0)], 10.0)  # a asks b, c, d
    for n in "bc":
        deliver([(n, x) for x in sites[n].on_trained(1, random_model(n, 1), 10.0)], 10.0)
    assert [x for x in a.on_tick(15.5) if isinstance(x, (Finish, Train))] == []  # past the deadline: waits on
    deliver([("d", x) for x in sites["d"].on_trained(1, random_model("d", 1), 17.0)], 17.0)  # d gets there
    deliver([("a", x) for x in a.on_tick(17.5)], 17.5)
    assert a.final is not None and a.final.meta["survivors"] == 3 and a.final.meta["kept_own"] is False
    assert sites["a"].mixer._aggregation is None


def test_a_secure_sum_waits_once_more_for_a_member_that_was_behind_and_still_trains_at_the_deadline():
    """Found on CI: d was a round behind when a's last sum opened, reached a's round a second
    before a's deadline and was still training at it; judged at the deadline alone, d was
    "not behind", a's sum failed and a ended keeping its own model. A member seen behind
    during the sum earns the one extension."""
    graph = complete("abcd")
    setups = secure_setups(graph)
    sites = {n: gossip(n, graph, rounds=2, timeout=5.0, secure=setups) for n in graph}
    first = start_all(sites)
    held = {}

    deliver = hand_delivery(sites, held)

    deliver(first, 0.0)
    a = sites["a"]
    a.on_peers(set(), set(), {"b": 1, "c": 1, "d": 0}, 10.0)  # d: still at round 0
    deliver([("a", x) for x in a.on_trained(1, random_model("a", 1), 10.0)], 10.0)
    for n in "bc":
        deliver([(n, x) for x in sites[n].on_trained(1, random_model(n, 1), 10.0)], 10.0)
    a.on_tick(12.0)
    a.on_peers(set(), set(), {"d": 1}, 14.5)  # d reached round 1 and trains it
    assert [x for x in a.on_tick(15.5) if isinstance(x, (Finish, Train))] == []  # past the deadline: waits on
    deliver([("d", x) for x in sites["d"].on_trained(1, random_model("d", 1), 17.0)], 17.0)
    deliver([("a", x) for x in a.on_tick(17.5)], 17.5)
    assert a.final is not None and a.final.meta["survivors"] == 3 and a.final.meta["kept_own"] is False


def test_plain_gossip_waits_once_more_for_a_neighbour_seen_a_round_behind():
    """The secure sums' rule, in plain gossip: a neighbour seen a round behind (it waited a
    deadline for a dying site that we did not) sends its model when it gets here. Without
    the wait the site mixed without it, got a round ahead, and at the last round ended alone."""
    graph = complete("abcd")
    sites = {n: gossip(n, graph, rounds=2, timeout=5.0) for n in graph}
    held = {}

    deliver = hand_delivery(sites, held, trained=lambda n, r: model({"a": 1, "b": 2, "c": 3, "d": 4}[n]))

    deliver(start_all(sites), 0.0)
    assert sorted(held) == list("abcd")
    a = sites["a"]
    a.on_peers(set(), set(), {"b": 1, "c": 1, "d": 0}, 10.0)  # d: still at round 0
    for n in "abc":
        deliver([(n, x) for x in sites[n].on_trained(1, model(1.0), 10.0)], 10.0)
    assert [x for x in a.on_tick(15.5) if isinstance(x, (Finish, Train))] == []  # past the deadline: waits on
    deliver([("d", x) for x in sites["d"].on_trained(1, model(5.0), 17.0)], 17.0)
    assert a.final is not None and a.final.meta["survivors"] == 3, a.final
    np.testing.assert_allclose(a.final.weights["w"], 2.0)  # (1 + 1 + 1 + 5) / 4


def test_a_secure_sum_leaves_out_a_neighbour_two_rounds_behind():
    """Found by the in-process engine and on CI: a site back from its checkpoint two rounds
    behind refuses requests that far ahead (it rejoins through a sum of its own); asked
    into a sum anyway, it cost that sum its whole deadline and, in a group of 3, the sum."""
    graph = complete("abcd")
    setups = secure_setups(graph)
    sites = {n: gossip(n, graph, rounds=3, timeout=5.0, secure=setups) for n in graph}
    held = {}

    deliver = hand_delivery(sites, held, train_below=2)

    deliver(start_all(sites), 0.0)
    assert sorted(held) == list("abcd")  # rounds 0 and 1 mixed everywhere
    a = sites["a"]
    a.on_peers(set(), set(), {"b": 2, "c": 2, "d": 0}, 10.0)  # d restarted from an old checkpoint
    groups = [x for x in moves(a.on_trained(2, random_model("a", 2), 10.0)) if isinstance(x, Send)]
    assert sorted(x.to for x in groups if x.type == wire.GOSSIP_GROUP) == ["b", "c"]


def test_a_secure_sum_does_not_wait_longer_for_a_member_that_is_not_behind():
    graph = complete("abcd")
    setups = secure_setups(graph)
    sites = {n: gossip(n, graph, rounds=2, timeout=5.0, secure=setups) for n in graph}
    start_all(sites)
    a = sites["a"]
    a.on_peers(set(), set(), {"d": 0}, 0.0)  # at our round, silent: not catching up
    sends = moves(a.on_trained(0, random_model("a", 0), now=0.0))
    for n in "bc":
        sites[n].on_trained(0, random_model(n, 0), now=0.0)
        (reply,) = moves(sites[n].on_message(over_the_wire("a", next(s for s in sends if s.to == n)), 0.0))
        a.on_message(over_the_wire(n, reply), 1.0)
    (train,) = [x for x in moves(a.on_tick(5.0)) if isinstance(x, Train)]  # at the deadline, as before
    assert train.round == 1 and train.meta["dropped"] == "d"

