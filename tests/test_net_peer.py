"""The peer over real ZeroMQ sockets on tcp loopback, with CURVE: delivery, counting, drops,
and who may connect at all."""

import time

import numpy as np
import pytest
import zmq

from p2p_fl.launch import free_ports
from p2p_fl.net import Curve, Peer, wire

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
