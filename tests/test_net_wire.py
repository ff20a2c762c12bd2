"""Wire format: round trip, and every malformed header or tensor refused with a reason."""

import msgpack
import numpy as np
import pytest

from p2p_fl.net import wire

FED = "fed-test"
PEERS = {"a", "b"}
WEIGHTS = {"conv/kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bn/mean": np.ones(4, np.float32)}
SPEC = wire.spec_of(WEIGHTS)


def frames_of(type_=wire.MODEL, weights=WEIGHTS, **header_changes):
    frames = wire.encode(type_, federation=FED, sender="a", round=3, seq=7, tensors=weights, meta={"cycle": 1})
    if header_changes:
        header = msgpack.unpackb(frames[0])
        header.update(header_changes)
        frames[0] = msgpack.packb({k: v for k, v in header.items() if v is not DELETE})
    return [bytes(f) for f in frames]


DELETE = object()


def decode(frames, **kwargs):
    return wire.decode(frames, federation=FED, senders=PEERS, tensor_spec=SPEC, **kwargs)


def test_round_trip_keeps_every_field_and_tensor_exactly():
    msg = decode(frames_of())
    assert (msg.type, msg.federation, msg.sender, msg.round, msg.seq, msg.meta) == (
        wire.MODEL, FED, "a", 3, 7, {"cycle": 1})
    assert list(msg.tensors) == list(WEIGHTS)
    for name, array in WEIGHTS.items():
        np.testing.assert_array_equal(msg.tensors[name], array)
        assert msg.tensors[name].dtype == array.dtype


def test_tensor_frames_are_views_of_the_arrays_not_copies():
    frames = wire.encode(wire.MODEL, federation=FED, sender="a", round=0, seq=0, tensors=WEIGHTS)
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), WEIGHTS["conv/kernel"])


def test_ack_carries_no_tensors():
    msg = decode(frames_of(wire.ACK, weights=None))
    assert msg.tensors == {}


@pytest.mark.parametrize("frames, reason", [
    ([], "empty"),
    ([b"\xc1garbage"], "not valid msgpack"),
    ([msgpack.packb([1, 2, 3])], "not a map"),
    ([msgpack.packb({"type": "model"})], "missing"),
])
def test_broken_headers_are_refused(frames, reason):
    with pytest.raises(wire.WireError, match=reason):
        decode(frames)


@pytest.mark.parametrize("change, reason", [
    ({"type": "shutdown"}, "unknown type"),
    ({"v": 99}, "protocol version"),
    ({"fed": "other-fed"}, "federation"),
    ({"from": "mallory"}, "not a peer"),
    ({"round": -1}, "out of range"),
    ({"round": True}, "expected int"),
    ({"seq": "7"}, "expected int"),
    ({"meta": {"x": [1, 2]}}, "scalar"),
    ({"tensors": [["conv/kernel", "float32", [2, 3, 4]]]}, "tensors listed"),
    ({"tensors": [["conv/kernel", "float64", [2, 3, 4]], ["bn/mean", "float32", [4]]]}, "dtype"),
    ({"tensors": [["conv/kernel", "float32", [4, 3, 2]], ["bn/mean", "float32", [4]]]}, "shape"),
    ({"tensors": [["bn/mean", "float32", [4]], ["conv/kernel", "float32", [2, 3, 4]]]}, "expected"),
    ({"seq": DELETE}, "missing"),
])
def test_headers_that_break_a_rule_are_refused_naming_it(change, reason):
    with pytest.raises(wire.WireError, match=reason):
        decode(frames_of(**change))


def test_encode_refuses_an_unknown_type():
    with pytest.raises(ValueError, match="unknown message type"):
        wire.encode("shutdown", federation=FED, sender="a", round=0, seq=0)


def test_frame_size_must_match_the_declared_shape():
    frames = frames_of()
    frames[1] = frames[1][:-4]
    with pytest.raises(wire.WireError, match="bytes"):
        decode(frames)


def test_missing_tensor_frame_is_refused():
    with pytest.raises(wire.WireError, match="frames"):
        decode(frames_of()[:-1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad):
    poisoned = dict(WEIGHTS, **{"bn/mean": np.array([0, 1, bad, 3], np.float32)})
    with pytest.raises(wire.WireError, match="NaN or Inf"):
        decode(frames_of(weights=poisoned))


def test_sender_must_be_the_authenticated_peer():
    with pytest.raises(wire.WireError, match="authenticated"):
        decode(frames_of(), authenticated_sender="b")
    assert decode(frames_of(), authenticated_sender="a").sender == "a"


def test_oversized_header_is_refused_before_parsing():
    with pytest.raises(wire.WireError, match="exceeds"):
        decode([b"\x80" * (wire.MAX_HEADER_BYTES + 1)])


def test_a_seq_above_max_seq_is_refused_and_the_ceiling_follows_the_clock():
    now_ns = 1_700_000_000 * 10**9
    ceiling = wire.seq_ceiling(now_ns)
    assert ceiling == now_ns // 1000 + wire.MAX_SEQ_AHEAD_US and wire.MAX_SEQ_AHEAD_US == 10 * 86_400 * 10**6
    assert decode(frames_of(seq=ceiling), max_seq=ceiling).seq == ceiling
    for seq in (ceiling + 1, 2**64 - 1):
        with pytest.raises(wire.WireError, match="days ahead"):
            decode(frames_of(seq=seq), max_seq=ceiling)
    assert decode(frames_of(seq=2**64 - 1)).seq == 2**64 - 1  # no ceiling given: none applied


def test_limits_from_the_model_cover_every_legitimate_message_and_no_more():
    big = {"w": np.zeros((512, 1024), np.float32), "b": np.zeros(1024, np.float32)}  # 2 MiB + 4 KiB
    spec = wire.spec_of(big)
    assert wire.max_frame_bytes(SPEC) == wire.MAX_HEADER_BYTES  # a tiny model: the header cap
    assert wire.max_frame_bytes(spec) == 4 * (512 * 1024 + 1024)  # the flat uint32 vector
    assert wire.max_frames(spec) == 1 + 2 + wire.MAX_NAMES
    many = [(f"t{i}", "float32", (2,)) for i in range(200)]
    assert wire.max_frames(many) == 1 + 400  # model + average
    average = wire.encode(wire.MODEL_AVERAGE, federation=FED, sender="a", round=0, seq=1,
                          tensors={**big, **{wire.AVERAGE_PREFIX + k: v for k, v in big.items()}})
    assert len(average) <= wire.max_frames(spec)
    assert max(len(bytes(f)) for f in average) <= wire.max_frame_bytes(spec)
    assert wire.message_bytes(average) <= wire.max_message_bytes(spec) < 3 * 4 * (512 * 1024 + 1024)


def test_a_node_of_the_previous_protocol_version_is_refused_by_name():
    """Version 1 derived masks without run keys and served models on demand: a mixed
    federation must fail loudly, not compute garbage sums."""
    import msgpack

    header = msgpack.unpackb(frames_of()[0])
    frames = [msgpack.packb({**header, "v": 2}), *frames_of()[1:]]
    with pytest.raises(wire.WireError, match="protocol version 2, expected 3"):
        decode(frames)


def test_a_message_under_another_fingerprint_is_refused_and_a_heartbeat_tells_its_fields():
    model = wire.encode(wire.MODEL, federation=FED, sender="a", round=0, seq=1, tensors=WEIGHTS, fingerprint="f1")
    assert decode(model, fingerprint="f1").type == wire.MODEL
    with pytest.raises(wire.ConfigMismatch) as refused:
        decode(model, fingerprint="f2")
    assert refused.value.sender == "a" and refused.value.fields is None
    beat = wire.encode(wire.HEARTBEAT, federation=FED, sender="a", round=0, seq=2, meta={"config": "abc123"},
                       fingerprint="f1")
    with pytest.raises(wire.ConfigMismatch) as refused:
        decode(beat, fingerprint="f2")
    assert refused.value.fields == "abc123"
