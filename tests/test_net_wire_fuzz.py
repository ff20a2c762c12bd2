"""Fuzzing the header decoder and validator (hypothesis, bounded for CI).

Whatever arrives, `wire.decode` either returns a message that satisfies every rule or
raises WireError: never another exception, never a tensor of the wrong shape or a NaN.
"""

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_fl.net import wire

FED = "fed"
SPEC = [("conv/kernel", "float32", (3, 3, 1, 4)), ("bn/mean", "float32", (4,))]
SENDERS = {"a", "b"}
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
tensor_entries = st.lists(st.one_of(
    st.just(["conv/kernel", "float32", [3, 3, 1, 4]]), st.just(["bn/mean", "float32", [4]]),
    st.tuples(st.text(max_size=12), st.sampled_from(["float32", "float64", "uint8", "object", "<f4"]),
              st.lists(st.integers(-2, 2**31), max_size=5)).map(list),
    values), max_size=4)
headers = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), values), "type": st.one_of(st.sampled_from(sorted(wire.MESSAGE_TYPES)), values),
        "fed": st.one_of(st.just(FED), values), "from": st.one_of(st.sampled_from(["a", "b", "c"]), values),
        "round": st.one_of(st.integers(-5, 2**40), values), "seq": st.one_of(st.integers(-5, 2**64 - 1), values),
        "tensors": st.one_of(tensor_entries, values), "meta": st.one_of(st.dictionaries(st.text(max_size=8), scalars, max_size=40), values),
    })
payload = st.lists(st.one_of(st.binary(max_size=200), st.sampled_from([
    np.zeros((3, 3, 1, 4), np.float32).tobytes(), np.zeros(4, np.float32).tobytes(),
    np.full(4, np.nan, np.float32).tobytes()])), max_size=4)


def check(frames):
    try:
        msg = wire.decode(frames, federation=FED, senders=SENDERS, tensor_spec=SPEC)
    except wire.WireError:
        return
    assert msg.type in wire.MESSAGE_TYPES and msg.federation == FED and msg.sender in SENDERS
    assert 0 <= msg.round <= wire.MAX_ROUND and msg.seq >= 0
    if msg.tensors:
        assert [(n, str(a.dtype), a.shape) for n, a in msg.tensors.items()] == SPEC
        assert all(np.isfinite(a).all() for a in msg.tensors.values())


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=5))
def test_random_bytes_never_crash_the_decoder(frames):
    check(frames)


@FUZZ
@given(headers, payload)
def test_structured_garbage_is_accepted_only_when_every_rule_holds(header, tensors):
    check([msgpack.packb(header, use_bin_type=True)] + tensors)


@FUZZ
@given(st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_truncated_and_corrupted_valid_messages_are_refused_or_intact(cut, noise):
    frames = wire.encode(wire.MODEL, federation=FED, sender="a", round=1, seq=1,
                         tensors={n: np.ones(s, np.float32) for n, _, s in SPEC})
    header = bytes(frames[0])
    check([header[:cut] + noise] + [bytes(f) for f in frames[1:]])
