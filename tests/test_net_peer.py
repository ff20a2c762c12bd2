"""The peer over real ZeroMQ sockets on tcp loopback, with CURVE: delivery, counting, drops,
and who may connect at all."""

import collections
import logging
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from p2p_fl.launch import free_ports
from p2p_fl.net import Curve, Peer, wire
from p2p_fl.net.drops import DropLog
from p2p_fl.net.peer import Limits, _SenderBudget

FED = "fed-test"
WEIGHTS = {"dense/kernel": np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32),
           "dense/bias": np.zeros(32, np.float32)}
SPEC = wire.spec_of(WEIGHTS)
KEYS = {name: tuple(k.decode() for k in zmq.curve_keypair()) for name in ("a", "b", "mallory")}


def curve_for(me, peers):
    public, secret = KEYS[me]
    return Curve(public, secret, {p: KEYS[p][0] for p in peers})


def make_peer(me, addresses, secure=True, **kwargs):
    others = {n: a for n, a in addresses.items() if n != me}
    return Peer(me, addresses[me], others, FED, SPEC, curve=curve_for(me, others) if secure else None, **kwargs)


@pytest.fixture
def addresses():
    return {n: f"tcp://127.0.0.1:{p}" for n, p in zip("ab", free_ports(2))}


@pytest.fixture
def pair(addresses):
    a, b = make_peer("a", addresses), make_peer("b", addresses)
    yield a, b
    a.close()
    b.close()


def receive_until(peer, count, timeout_s=5.0):
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += peer.receive(0.05)
    return got


def raw_dealer(address, server_public, keys=None):
    """A socket outside the Peer class: how an attacker or a broken client would connect."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey = (k.encode() for k in keys)
        sock.curve_serverkey = server_public.encode()
    sock.connect(address)
    return sock


def test_model_and_ack_travel_both_ways_exactly(pair):
    a, b = pair
    a.send("b", wire.MODEL, 1, WEIGHTS, {"cycle": 0})
    [msg] = receive_until(b, 1)
    assert (msg.sender, msg.type, msg.round, msg.meta) == ("a", wire.MODEL, 1, {"cycle": 0})
    for name in WEIGHTS:
        np.testing.assert_array_equal(msg.tensors[name], WEIGHTS[name])
    b.send("a", wire.ACK, 1, meta={"of": wire.MODEL})
    [ack] = receive_until(a, 1)
    assert (ack.type, ack.sender, ack.round) == (wire.ACK, "b", 1)
    assert a.bytes_sent > sum(w.nbytes for w in WEIGHTS.values()) and a.messages_sent == 1


def test_messages_sent_before_the_receiver_binds_are_delivered(addresses):
    a = make_peer("a", addresses)
    try:
        a.send("b", wire.MODEL, 0, WEIGHTS)
        time.sleep(0.2)
        b = make_peer("b", addresses)
        try:
            assert len(receive_until(b, 1)) == 1
        finally:
            b.close()
    finally:
        a.close()


def test_garbage_from_an_authenticated_peer_is_dropped_counted_and_the_peer_goes_on(pair, addresses):
    a, b = pair
    raw = raw_dealer(addresses["b"], KEYS["b"][0], KEYS["a"])
    raw.send_multipart([b"\x00not msgpack"])
    header = wire.encode(wire.MODEL, federation=FED, sender="a", round=0, seq=1, tensors=WEIGHTS)
    raw.send_multipart([bytes(header[0])])  # tensors listed, frames missing
    nan = dict(WEIGHTS, **{"dense/bias": np.full(32, np.nan, np.float32)})
    raw.send_multipart(wire.encode(wire.MODEL, federation=FED, sender="a", round=0, seq=2, tensors=nan))
    a.send("b", wire.MODEL, 3, WEIGHTS)
    got = receive_until(b, 1)
    raw.close()
    assert [m.round for m in got] == [3]
    assert b.dropped["malformed"] == 3


def test_a_peer_cannot_speak_for_another(addresses):
    """Keys of a, b and mallory are all listed; mallory signs its header as a."""
    addresses = dict(addresses, mallory="tcp://127.0.0.1:1")
    b = make_peer("b", addresses)
    try:
        raw = raw_dealer(addresses["b"], KEYS["b"][0], KEYS["mallory"])
        raw.send_multipart(wire.encode(wire.ACK, federation=FED, sender="a", round=0, seq=1))
        raw.send_multipart(wire.encode(wire.ACK, federation=FED, sender="mallory", round=0, seq=2))
        got = receive_until(b, 1, timeout_s=2.0)
        raw.close()
        assert [m.sender for m in got] == ["mallory"]
        assert b.dropped["malformed"] == 1
    finally:
        b.close()


def test_a_key_not_in_the_topology_is_refused_before_any_message_is_read(pair, addresses):
    _, b = pair
    raw = raw_dealer(addresses["b"], KEYS["b"][0], KEYS["mallory"])
    for seq in range(5):
        raw.send_multipart(wire.encode(wire.ACK, federation=FED, sender="a", round=0, seq=seq))
    assert receive_until(b, 1, timeout_s=1.5) == []
    raw.close()
    assert b.dropped["unknown-key"] >= 1 and b.dropped["malformed"] == 0 and b.bytes_received == 0


def test_a_client_without_curve_cannot_connect(pair, addresses):
    _, b = pair
    raw = raw_dealer(addresses["b"], KEYS["b"][0], keys=None)
    raw.send_multipart(wire.encode(wire.ACK, federation=FED, sender="a", round=0, seq=1))
    assert receive_until(b, 1, timeout_s=1.5) == []
    raw.close()
    assert b.bytes_received == 0


def test_replayed_sequence_number_is_dropped(pair, addresses):
    _, b = pair
    raw = raw_dealer(addresses["b"], KEYS["b"][0], KEYS["a"])
    frames = wire.encode(wire.ACK, federation=FED, sender="a", round=0, seq=10)
    raw.send_multipart(frames)
    raw.send_multipart(frames)
    got = receive_until(b, 2, timeout_s=1.0)
    raw.close()
    assert len(got) == 1 and b.dropped["replayed-seq"] == 1


def test_oversized_message_is_cut_at_the_socket(addresses):
    a = make_peer("a", addresses)
    b = make_peer("b", addresses, max_message_bytes=1024)
    try:
        a.send("b", wire.MODEL, 0, WEIGHTS)  # 8 KiB frame > 1 KiB limit: zmq drops the connection
        assert receive_until(b, 1, timeout_s=1.0) == []
    finally:
        a.close()
        b.close()


def test_insecure_mode_works_but_only_when_asked_for(addresses, caplog):
    a, b = make_peer("a", addresses, secure=False), make_peer("b", addresses, secure=False)
    try:
        a.send("b", wire.ACK, 0)
        assert len(receive_until(b, 1)) == 1
    finally:
        a.close()
        b.close()
    assert "INSECURE" in caplog.text


def test_an_honest_exchange_drops_nothing_and_counts_no_bad_handshake(pair):
    a, b = pair
    for i in range(5):
        a.send("b", wire.ACK, i)
        b.send("a", wire.ACK, i)
    assert len(receive_until(b, 5)) == 5 and len(receive_until(a, 5)) == 5
    assert a.dropped == {} and b.dropped == {}


def test_a_refused_key_is_counted_once_per_attempt_not_also_as_a_bad_handshake(pair, addresses):
    _, b = pair
    raw = raw_dealer(addresses["b"], KEYS["b"][0], KEYS["mallory"])
    raw.send_multipart(wire.encode(wire.ACK, federation=FED, sender="a", round=0, seq=1))
    deadline = time.monotonic() + 5
    while not b.dropped["unknown-key"] and time.monotonic() < deadline:
        b.receive(0.05)
    raw.close()
    b.receive(0.2)
    assert b.dropped["unknown-key"] >= 1 and b.dropped["plaintext-or-bad-handshake"] == 0


def test_a_seq_far_ahead_of_the_clock_is_malformed_and_does_not_lock_the_sender_out(pair, addresses):
    """A key holder sending seq 2**64 - 1 would otherwise make every later message of its
    name a replay; a seq more than wire.MAX_SEQ_AHEAD_US ahead of the clock is refused."""
    a, b = pair
    raw = raw_dealer(addresses["b"], KEYS["b"][0], KEYS["a"])
    try:
        for seq in (2**64 - 1, time.time_ns() // 1000 + wire.MAX_SEQ_AHEAD_US + 10**9):
            raw.send_multipart(wire.encode(wire.ACK, federation=FED, sender="a", round=0, seq=seq))
        deadline = time.monotonic() + 5
        while b.dropped["malformed"] < 2 and time.monotonic() < deadline:
            b.receive(0.05)
    finally:
        raw.close()
    assert b.dropped["malformed"] == 2
    a.send("b", wire.ACK, 4)  # a's own clock-based seq still counts as new
    assert [m.round for m in receive_until(b, 1)] == [4]


def test_frame_limit_is_what_the_model_needs_capped_by_the_configured_size(addresses):
    b = make_peer("b", addresses)
    try:
        assert b.max_frame_bytes == wire.max_frame_bytes(SPEC) + 64 < 512 * 2**20
        assert b._router.getsockopt(zmq.MAXMSGSIZE) == b.max_frame_bytes
        assert b._router.getsockopt(zmq.RCVHWM) == 64
        assert b._router.getsockopt(zmq.HANDSHAKE_IVL) == 5000
    finally:
        b.close()
    capped = make_peer("b", addresses, max_message_bytes=1000)
    try:
        assert capped.max_frame_bytes == 1000
    finally:
        capped.close()


def test_a_message_with_more_frames_than_any_legitimate_one_is_dropped_undecoded(pair, addresses):
    _, b = pair
    raw = raw_dealer(addresses["b"], KEYS["b"][0], KEYS["a"])
    header = wire.encode(wire.ACK, federation=FED, sender="a", round=0, seq=time.time_ns() // 1000)[0]
    try:
        raw.send_multipart([header] + [b""] * wire.max_frames(SPEC))
        deadline = time.monotonic() + 5
        while not b.dropped["oversized"] and time.monotonic() < deadline:
            assert b.receive(0.05) == []
    finally:
        raw.close()
    assert b.dropped == {"oversized": 1}


def test_one_receive_reads_a_bounded_number_of_messages(addresses):
    a = make_peer("a", addresses)
    b = make_peer("b", addresses, limits=Limits(per_receive=20))
    raw = raw_dealer(addresses["b"], KEYS["b"][0], KEYS["a"])
    try:
        for _ in range(300):
            raw.send(b"junk")
        deadline = time.monotonic() + 10
        while b.messages_received < 300 and time.monotonic() < deadline:
            before = b.messages_received
            b.receive(0.05)
            assert b.messages_received - before <= 20
    finally:
        raw.close()
        a.close()
        b.close()
    assert b.messages_received == 300 and sum(b.dropped.values()) == 300


def test_a_sender_over_its_rate_is_limited_then_quarantined_then_heard_again():
    limits = Limits(messages_per_s=10, burst_messages=5, quarantine_after=20, quarantine_s=3.0)
    budget = _SenderBudget(limits, unit_bytes=1000, quarantine_s=3.0, now=0.0)
    assert [budget.admit(10, 0.0) for _ in range(5)] == [None] * 5  # the burst
    assert budget.admit(10, 0.0) == "rate-limited"
    assert budget.admit(10, 0.1) is None  # one token back after 0.1 s at 10/s
    # Keeping it up: 20 more over the rate within a moment, and it is quarantined.
    refused = [budget.admit(10, 0.11) for _ in range(30)]
    assert refused[:19] == ["rate-limited"] * 19 and set(refused[20:]) == {"quarantined"}
    assert budget.admit(10, 3.0) == "quarantined"
    assert budget.admit(10, 3.2) is None  # quarantine over, bucket refilled
    # Bytes count too: at most burst_models x the unit at once.
    big = _SenderBudget(limits, unit_bytes=1000, quarantine_s=3.0, now=0.0)
    assert big.admit(32_000, 0.0) is None and big.admit(1000, 0.0) == "rate-limited"


def test_drops_are_all_counted_but_logged_a_few_per_reason_then_summed_up(caplog):
    counter = collections.Counter()
    drops = DropLog("b", counter, window_s=10.0, first=5, now=0.0)
    with caplog.at_level(logging.WARNING):
        for i in range(12_000):
            drops.drop("malformed", f"junk {i}", now=1.0 + i * 1e-4)
        for i in range(345):
            drops.drop("rate-limited", "too fast", now=2.0)
        drops.tick(now=5.0)  # the window is not over: nothing yet
        drops.tick(now=12.0)
    lines = [r.getMessage() for r in caplog.records]
    assert counter == {"malformed": 12_000, "rate-limited": 345}
    assert len(lines) == 5 + 5 + 1
    assert lines[-1].startswith("b: dropped 12,345 messages or connections (malformed 12,000, rate-limited 345)")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        drops.drop("malformed", "a new window logs again", now=13.0)
        drops.tick(now=30.0)
    assert [r.getMessage() for r in caplog.records] == ["b: dropped message (malformed): a new window logs again"]


def test_the_soft_file_descriptor_limit_is_raised_to_the_hard_one():
    code = ("import resource; from p2p_fl.net.peer import raise_fd_limit\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
            "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)")
    raised, soft, hard = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                 timeout=60, check=True).stdout.split())
    assert raised == soft and (soft == hard or (hard == resource.RLIM_INFINITY and soft >= 1 << 16))


def test_a_new_progress_goes_out_at_once_not_at_the_next_heartbeat(addresses):
    """Others wait on a site's progress (a ring site holding the final model stays until
    every other site says it holds it too): a change is sent at once, whatever the interval."""
    a = make_peer("a", addresses, heartbeat_interval_s=30.0, peer_timeout_s=90.0)
    b = make_peer("b", addresses, heartbeat_interval_s=30.0, peer_timeout_s=90.0)
    try:
        a.pulse(3)  # the first heartbeat
        receive_until(b, 1)
        assert b.peer_progress == {"a": 3}
        a.pulse(3)  # nothing new, not due for 30 s: nothing sent
        a.pulse(7)
        receive_until(b, 1)
        assert b.peer_progress == {"a": 7} and a.messages_sent == 2
    finally:
        a.close()
        b.close()
