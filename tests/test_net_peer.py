"""The peer over real ZeroMQ sockets on tcp loopback: delivery, counting, and drops."""

import time

import numpy as np
import pytest
import zmq

from p2p_fl.launch import free_ports
from p2p_fl.net import Peer, wire

FED = "fed-test"
WEIGHTS = {"dense/kernel": np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32),
           "dense/bias": np.zeros(32, np.float32)}
SPEC = wire.spec_of(WEIGHTS)


@pytest.fixture
def pair():
    pa, pb = free_ports(2)
    addresses = {"a": f"tcp://127.0.0.1:{pa}", "b": f"tcp://127.0.0.1:{pb}"}
    a = Peer("a", addresses["a"], {"b": addresses["b"]}, FED, SPEC)
    b = Peer("b", addresses["b"], {"a": addresses["a"]}, FED, SPEC)
    yield a, b, addresses
    a.close()
    b.close()


def receive_until(peer, count, timeout_s=5.0):
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += peer.receive(0.05)
    return got


def test_model_and_ack_travel_both_ways_exactly(pair):
    a, b, _ = pair
    a.send("b", wire.MODEL, 1, WEIGHTS, {"cycle": 0})
    [msg] = receive_until(b, 1)
    assert (msg.sender, msg.type, msg.round, msg.meta) == ("a", wire.MODEL, 1, {"cycle": 0})
    for name in WEIGHTS:
        np.testing.assert_array_equal(msg.tensors[name], WEIGHTS[name])
    b.send("a", wire.ACK, 1, meta={"of": wire.MODEL})
    [ack] = receive_until(a, 1)
    assert (ack.type, ack.sender, ack.round) == (wire.ACK, "b", 1)
    assert a.bytes_sent > sum(w.nbytes for w in WEIGHTS.values()) and a.messages_sent == 1


def test_messages_sent_before_the_receiver_binds_are_delivered():
    pa, pb = free_ports(2)
    a = Peer("a", f"tcp://127.0.0.1:{pa}", {"b": f"tcp://127.0.0.1:{pb}"}, FED, SPEC)
    try:
        a.send("b", wire.MODEL, 0, WEIGHTS)
        time.sleep(0.2)
        b = Peer("b", f"tcp://127.0.0.1:{pb}", {"a": f"tcp://127.0.0.1:{pa}"}, FED, SPEC)
        try:
            assert len(receive_until(b, 1)) == 1
        finally:
            b.close()
    finally:
        a.close()


def test_garbage_from_a_raw_socket_is_dropped_and_counted_and_the_peer_goes_on(pair):
    a, b, addresses = pair
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(addresses["b"])
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


def test_replayed_sequence_number_is_dropped(pair):
    a, b, addresses = pair
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(addresses["b"])
    frames = wire.encode(wire.ACK, federation=FED, sender="a", round=0, seq=10)
    raw.send_multipart(frames)
    raw.send_multipart(frames)
    got = receive_until(b, 2, timeout_s=1.0)
    raw.close()
    assert len(got) == 1 and b.dropped["replayed-seq"] == 1


def test_oversized_message_is_cut_at_the_socket():
    pa, pb = free_ports(2)
    a = Peer("a", f"tcp://127.0.0.1:{pa}", {"b": f"tcp://127.0.0.1:{pb}"}, FED, SPEC)
    b = Peer("b", f"tcp://127.0.0.1:{pb}", {"a": f"tcp://127.0.0.1:{pa}"}, FED, SPEC, max_message_bytes=1024)
    try:
        a.send("b", wire.MODEL, 0, WEIGHTS)  # 8 KiB frame > 1 KiB limit: zmq drops the connection
        assert receive_until(b, 1, timeout_s=1.0) == []
    finally:
        a.close()
        b.close()
