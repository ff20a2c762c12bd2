"""Wire format: one msgpack header frame plus one raw frame per tensor.

Everything about message types, frame layout and limits lives here (as Majordomo keeps
them in MDP.py). `encode` builds the frames; `decode` returns a checked `Message` or raises
`WireError` with the reason, and never touches anything it has not checked.

Frame 0 (msgpack map):
    v        protocol version (int)
    type     one of MESSAGE_TYPES
    fed      federation id (str)
    from     sender name (str)
    round    round / hop index (int >= 0)
    seq      per-sender sequence number (int >= 0), increasing
    fp       the federation fingerprint (str, p2p_fl/fingerprint.py): the hash of everything
             the sites must agree on; a message whose fp differs from the receiver's is refused
    tensors  list of [name, dtype, shape] in the model's order (may be empty)
    meta     small map of scalars (str -> int/float/str/bool/None)
Frames 1..n: the raw little-endian bytes of each tensor, C order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np

# 2: secure sums mix per-run keys into every pair secret (gossip-hello) and no model is served
# on demand (gossip-fetch/-current gone); a version-1 node could not take part in a sum.
# 3: every header carries the federation fingerprint (fp), heartbeats its fields (meta.config).
PROTOCOL_VERSION = 3

# Message types. Each protocol uses a subset; the header decoder refuses anything else.
MODEL = "model"  # a model handed to the next site of a ring (round = hop to train)
# A hop of a ring's last cycle: the model, then the running mean of the models that cycle
# produced so far, under AVERAGE_PREFIX + name.
MODEL_AVERAGE = "model+average"
ACK = "ack"  # receipt of a model/final message (round and meta.of echo it)
FINAL = "final"  # the finished model, sent to every site at the end of a ring run
# A site's model after its local training of gossip round `round`. No meta: mixing weights
# come from the topology, never from a sender's claim.
GOSSIP_MODEL = "gossip-model"
# Secure neighbourhood sum of gossip round `round` (federate/secure_sum.py). Name lists
# travel in meta as comma-separated peer names; they fix which tensors must follow
# (`expected_spec`). protocols/gossip_messages.py builds and reads these messages from the
# federate values, taking its tensors from `expected_spec`.
#   gossip-group     aggregator -> member. meta: members, threshold. No tensors.
#   gossip-masked    member -> aggregator. meta: share_for (the other members). Tensors:
#                    masked (uint32, the flat model's length), commitment (uint8, 32), then
#                    share/<k> (uint8, 44: an AES-GCM encrypted Shamir share) for k in share_for.
#   gossip-announce  aggregator -> survivor. meta: survivors, dropped, shares_from.
#                    Tensors: share/<k> (uint8, 44) for k in shares_from.
#   gossip-release   survivor -> aggregator. meta: shares_of, correction (bool). Tensors:
#                    share/<k> (uint8, 16: a decrypted share) for k in shares_of, then
#                    correction (uint32, the flat length) when meta.correction is true.
# With chunked sums ([gossip] chunked; federate.secure_sum.chunk_spans) gossip-group,
# gossip-masked and gossip-release also carry meta.span_lo and meta.span_hi (ints, 0 <= lo <
# hi <= the flat length): the sum is over that slice, and masked and correction hold hi - lo
# values; without them, over the whole model.
#   gossip-chunk     aggregator -> every neighbour, after its sum: its mix of its slice.
#                    meta: span_lo, span_hi. Tensor: mix (float32, hi - lo).
GOSSIP_GROUP = "gossip-group"
GOSSIP_MASKED = "gossip-masked"
GOSSIP_ANNOUNCE = "gossip-announce"
GOSSIP_RELEASE = "gossip-release"
GOSSIP_CHUNK = "gossip-chunk"
# A site's key for this run (federate/masks.py RunKey), sent to every peer at start and
# again until the peer has it; pairwise mask seeds and share keys mix it in, so no mask
# repeats across runs. round: 0. meta.have (bool): the sender already holds the receiver's
# run key (false asks for it). Tensor: run_key (uint8, 32).
GOSSIP_HELLO = "gossip-hello"
RUN_KEY_BYTES = 32
# Liveness, every `heartbeat_interval_s` to every peer (the ZeroMQ guide's pattern);
# round: the sender's progress (the hop it holds or held last, its gossip round). No tensors.
# meta.config: the sender's per-field fingerprint digests, so that a receiver whose
# fingerprint differs can name the fields (`Fingerprint.differing`).
HEARTBEAT = "heartbeat"
# A site's final model after its local training, sent once to every other site of an
# ensemble run (round = the run's rounds); each site predicts with the mean output of all.
ENSEMBLE_MODEL = "ensemble-model"
MESSAGE_TYPES = frozenset({MODEL, MODEL_AVERAGE, ACK, FINAL, GOSSIP_MODEL, ENSEMBLE_MODEL,
                           GOSSIP_GROUP, GOSSIP_MASKED, GOSSIP_ANNOUNCE, GOSSIP_RELEASE,
                           GOSSIP_CHUNK, GOSSIP_HELLO, HEARTBEAT})
TENSOR_TYPES = frozenset({MODEL, MODEL_AVERAGE, FINAL, GOSSIP_MODEL, ENSEMBLE_MODEL})
AVERAGE_PREFIX = "average/"

MAX_HEADER_BYTES = 256 * 1024
MAX_ROUND = 1_000_000
MAX_META_ITEMS = 32
MAX_NAMES = 256  # peer names in one meta list
ALLOWED_DTYPES = frozenset({"float32", "float16", "int32", "uint32", "uint64", "uint8"})
COMMITMENT_BYTES = 32
SHARE_BYTES = 16
ENCRYPTED_SHARE_BYTES = 12 + SHARE_BYTES + 16  # AES-GCM nonce, share, tag
SHARE_PREFIX = "share/"
# A sender's seq starts from its clock (microseconds since the epoch) and increases; one
# further ahead of the receiver's clock than this is refused, so that no key holder can
# push a receiver's last seq to 2**64 - 1 and lock itself (or, restarted, the site) out.
MAX_SEQ_AHEAD_US = 10 * 86_400 * 1_000_000  # 10 days

TensorSpec = Sequence[tuple[str, str, tuple[int, ...]]]


class WireError(ValueError):
    """A message that must be dropped; the message says which field broke which rule."""


class ConfigMismatch(WireError):
    """A peer's message under another federation fingerprint: its topology, data settings or
    p2p-fl version differ. `fields`: its heartbeat's per-field digests (meta.config), None
    for other message types."""

    def __init__(self, sender: str, fields: str | None):
        super().__init__(f"{sender} runs another federation setup (fingerprint differs)")
        self.sender = sender
        self.fields = fields


@dataclass(frozen=True)
class Message:
    type: str
    federation: str
    sender: str
    round: int
    seq: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def encode(
    type: str,
    *,
    federation: str,
    sender: str,
    round: int,
    seq: int,
    tensors: Mapping[str, np.ndarray] | None = None,
    meta: Mapping[str, Any] | None = None,
    fingerprint: str = "",
) -> list:
    """Builds the frames of one message; tensor frames are views, not copies.

    Returns:
        A list: the packed header (bytes) followed by one buffer per tensor, ready for
        `socket.send_multipart(frames, copy=False)`.
    """
    if type not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {type!r}")
    tensors = tensors or {}
    arrays = [np.ascontiguousarray(a) for a in tensors.values()]
    header = {
        "v": PROTOCOL_VERSION,
        "type": type,
        "fed": federation,
        "from": sender,
        "round": int(round),
        "seq": int(seq),
        "fp": fingerprint,
        "tensors": [[n, str(a.dtype), list(a.shape)] for n, a in zip(tensors, arrays)],
        "meta": dict(meta or {}),
    }
    return [msgpack.packb(header, use_bin_type=True)] + [memoryview(a).cast("B") for a in arrays]


def decode(
    frames: Sequence,
    *,
    federation: str,
    senders: frozenset[str] | set[str],
    tensor_spec: TensorSpec,
    authenticated_sender: str | None = None,
    max_seq: int | None = None,
    fingerprint: str | None = None,
) -> Message:
    """Checks every field of a received message, then returns it.

    Args:
        frames: the message parts (bytes, memoryviews or zmq.Frame), without routing id.
        federation: the only federation id accepted.
        senders: the names of the peers of the topology.
        tensor_spec: (name, dtype, shape) of the model, in order; tensor-carrying messages
            must match it exactly.
        authenticated_sender: the peer name the transport authenticated (CURVE User-Id);
            when given, the header's sender must equal it.
        max_seq: the largest seq accepted (`seq_ceiling()`); None: no upper bound.
        fingerprint: the receiver's federation fingerprint; a message from a peer under
            another raises ConfigMismatch (after its sender is checked). None: not checked.

    Raises:
        WireError: with a one-line reason; the caller drops the message and counts it.
    """
    if not frames:
        raise WireError("empty message")
    header_bytes = _buffer(frames[0])
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    header = _unpack_header(header_bytes)
    msg_type = _field(header, "type", str)
    if msg_type not in MESSAGE_TYPES:
        raise WireError(f"unknown type {msg_type[:40]!r}")
    version = _field(header, "v", int)
    if version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    fed = _field(header, "fed", str)
    if fed != federation:
        raise WireError(f"federation {fed[:60]!r} is not {federation!r}")
    sender = _field(header, "from", str)
    if sender not in senders:
        raise WireError(f"sender {sender[:60]!r} is not a peer of the topology")
    if authenticated_sender is not None and sender != authenticated_sender:
        raise WireError(f"sender {sender!r} is not the authenticated peer {authenticated_sender!r}")
    round_ = _field(header, "round", int)
    if not 0 <= round_ <= MAX_ROUND:
        raise WireError(f"round {round_} out of range")
    seq = _field(header, "seq", int)
    if seq < 0:
        raise WireError(f"negative seq {seq}")
    if max_seq is not None and seq > max_seq:
        raise WireError(f"seq {seq} is more than {MAX_SEQ_AHEAD_US // 86_400_000_000} days ahead of this clock")
    meta = _field(header, "meta", dict)
    _check_meta(meta)
    fp = _field(header, "fp", str)
    if fingerprint is not None and fp != fingerprint:
        # A heartbeat without per-field digests comes from code that does not send them:
        # "" makes the receiver name the version.
        config = (meta.get("config") if isinstance(meta.get("config"), str) else "") if msg_type == HEARTBEAT else None
        raise ConfigMismatch(sender, config)
    listed = _field(header, "tensors", list)
    tensors = _decode_tensors(listed, frames[1:], expected_spec(msg_type, tensor_spec, meta))
    return Message(msg_type, fed, sender, round_, seq, tensors, meta)


def expected_spec(msg_type: str, tensor_spec: TensorSpec, meta: Mapping[str, Any] | None = None) -> list:
    """The tensors a message of this type must carry, given the model's spec and its meta.

    Raises:
        WireError: when the meta fields that fix the tensors of a secure-sum message are
            missing or malformed.
    """
    meta = meta or {}
    length = sum(math.prod(s) for _, _, s in tensor_spec)
    if msg_type in (GOSSIP_GROUP, GOSSIP_MASKED, GOSSIP_RELEASE, GOSSIP_CHUNK):
        span = span_field(meta, length if tensor_spec else None)
        if span is not None:
            length = span[1] - span[0]
        elif msg_type == GOSSIP_CHUNK:
            raise WireError("gossip-chunk without meta.span_lo and meta.span_hi")
    flat = ("uint32", (length,))
    encrypted = ("uint8", (ENCRYPTED_SHARE_BYTES,))
    if msg_type == GOSSIP_CHUNK:
        return [("mix", "float32", (length,))]
    if msg_type == GOSSIP_GROUP:
        names_field(meta, "members")
        if not isinstance(meta.get("threshold"), int) or isinstance(meta.get("threshold"), bool):
            raise WireError("meta.threshold is not an integer")
        return []
    if msg_type == GOSSIP_MASKED:
        return [("masked", *flat), ("commitment", "uint8", (COMMITMENT_BYTES,))] + \
            [(SHARE_PREFIX + k, *encrypted) for k in names_field(meta, "share_for")]
    if msg_type == GOSSIP_ANNOUNCE:
        names_field(meta, "survivors")
        names_field(meta, "dropped")
        return [(SHARE_PREFIX + k, *encrypted) for k in names_field(meta, "shares_from")]
    if msg_type == GOSSIP_RELEASE:
        if not isinstance(meta.get("correction"), bool):
            raise WireError("meta.correction is not a bool")
        spec = [(SHARE_PREFIX + k, "uint8", (SHARE_BYTES,)) for k in names_field(meta, "shares_of")]
        return spec + ([("correction", *flat)] if meta["correction"] else [])
    if msg_type == MODEL_AVERAGE:
        return list(tensor_spec) + [(AVERAGE_PREFIX + n, d, s) for n, d, s in tensor_spec]
    if msg_type == GOSSIP_HELLO:
        if not isinstance(meta.get("have"), bool):
            raise WireError("meta.have is not a bool")
        return [("run_key", "uint8", (RUN_KEY_BYTES,))]
    return list(tensor_spec) if msg_type in TENSOR_TYPES else []


def seq_ceiling(now_ns: int) -> int:
    """The largest seq a receiver whose clock reads `now_ns` (time.time_ns()) accepts."""
    return now_ns // 1000 + MAX_SEQ_AHEAD_US


# The limits below bound what the peer accepts before decoding (peer.py); a new message type
# whose frames or size exceed them must raise them here.
def max_frame_bytes(tensor_spec: TensorSpec) -> int:
    """The largest frame a legitimate message can carry for this model: the header (at most
    MAX_HEADER_BYTES), one model tensor, or the secure-sum vector (uint32, the flat model's length)."""
    tensors = [np.dtype(d).itemsize * math.prod(s) for _, d, s in tensor_spec]
    return max([MAX_HEADER_BYTES, 4 * _flat_length(tensor_spec), ENCRYPTED_SHARE_BYTES, *tensors])


def max_frames(tensor_spec: TensorSpec) -> int:
    """The most frames a legitimate message can have: the header, then the model twice (a
    ring's last cycle: model + average) or a secure-sum vector, its commitment or correction,
    and one share per peer name (at most MAX_NAMES)."""
    return 1 + max(2 * len(tensor_spec), 2 + MAX_NAMES)


def max_message_bytes(tensor_spec: TensorSpec) -> int:
    """The largest legitimate message for this model: a header and the model twice (model +
    average), or a secure-sum vector with its commitment and MAX_NAMES encrypted shares."""
    model = sum(np.dtype(d).itemsize * math.prod(s) for _, d, s in tensor_spec)
    secure = 4 * _flat_length(tensor_spec) + COMMITMENT_BYTES + MAX_NAMES * ENCRYPTED_SHARE_BYTES
    return MAX_HEADER_BYTES + max(2 * model, secure)


def _flat_length(tensor_spec: TensorSpec) -> int:
    return sum(math.prod(s) for _, _, s in tensor_spec)


def names_field(meta: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """A comma-separated list of distinct peer names from meta (may be empty), sorted.

    Raises:
        WireError: if it is missing, not a string, unsorted, or holds a repeated name.
    """
    value = meta.get(key)
    if not isinstance(value, str):
        raise WireError(f"meta.{key} is not a comma-separated name list")
    names = tuple(value.split(",")) if value else ()
    if len(names) > MAX_NAMES or any(not n for n in names):
        raise WireError(f"meta.{key} holds an empty name or more than {MAX_NAMES} names")
    if list(names) != sorted(set(names)):
        raise WireError(f"meta.{key} is not sorted or repeats a name")
    return names


def span_field(meta: Mapping[str, Any], length: int | None) -> tuple[int, int] | None:
    """The slice (lo, hi) a secure-sum message is over, from meta.span_lo and meta.span_hi;
    None when neither is there (the whole model). `length`: the flat model's length (None:
    not checked against it).

    Raises:
        WireError: only one of them, not integers, or not 0 <= lo < hi <= length.
    """
    lo, hi = meta.get("span_lo"), meta.get("span_hi")
    if lo is None and hi is None:
        return None
    if any(not isinstance(v, int) or isinstance(v, bool) for v in (lo, hi)):
        raise WireError("meta.span_lo and meta.span_hi are not both integers")
    if not 0 <= lo < hi or (length is not None and hi > length):
        raise WireError(f"slice [{lo}, {hi}) is outside the model of {length} values")
    return lo, hi


def span_meta(span: tuple[int, int] | None) -> dict[str, int]:
    """The meta form of a slice (see `span_field`): nothing for the whole model."""
    return {} if span is None else {"span_lo": int(span[0]), "span_hi": int(span[1])}


def join_names(names) -> str:
    """The meta form of a name list (see `names_field`)."""
    return ",".join(sorted(names))


def spec_of(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The (name, dtype, shape) spec of a flat weight dict, in its order."""
    return [(n, str(a.dtype), tuple(a.shape)) for n, a in tensors.items()]


def message_bytes(frames: Sequence) -> int:
    """Bytes a message occupies on the wire (payload only, framing excluded)."""
    return sum(len(_buffer(f)) for f in frames)


def _buffer(frame) -> memoryview:
    if hasattr(frame, "buffer"):  # zmq.Frame received with copy=False
        return frame.buffer
    return memoryview(frame)


def _unpack_header(raw: memoryview) -> dict:
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0,
            max_str_len=MAX_HEADER_BYTES, max_array_len=4096, max_map_len=64,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise WireError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    return header


def _field(header: dict, key: str, kind: type):
    if key not in header:
        raise WireError(f"header field {key!r} missing")
    value = header[key]
    # bool is an int subclass; a round of True is still malformed.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"header field {key!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _check_meta(meta: dict) -> None:
    if len(meta) > MAX_META_ITEMS:
        raise WireError(f"meta has {len(meta)} items, at most {MAX_META_ITEMS}")
    for key, value in meta.items():
        if not isinstance(key, str):
            raise WireError("meta key is not a string")
        if value is not None and not isinstance(value, (int, float, str, bool)):
            raise WireError(f"meta[{key[:40]!r}] is {type(value).__name__}, expected a scalar")


def _decode_tensors(listed: list, payload: Sequence, expected: TensorSpec) -> dict[str, np.ndarray]:
    if len(listed) != len(expected):
        raise WireError(f"{len(listed)} tensors listed, expected {len(expected)}")
    if len(payload) != len(expected):
        raise WireError(f"{len(payload)} tensor frames, expected {len(expected)}")
    tensors = {}
    for entry, (name, dtype, shape), frame in zip(listed, expected, payload):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise WireError("tensor entry is not [name, dtype, shape]")
        got_name, got_dtype, got_shape = entry
        if got_name != name:
            raise WireError(f"tensor {str(got_name)[:60]!r} where {name!r} was expected")
        if got_dtype != dtype or dtype not in ALLOWED_DTYPES:
            raise WireError(f"tensor {name!r} has dtype {str(got_dtype)[:20]!r}, expected {dtype!r}")
        if not isinstance(got_shape, list) or tuple(got_shape) != tuple(shape):
            raise WireError(f"tensor {name!r} has shape {got_shape!r}, expected {list(shape)}")
        buf = _buffer(frame)
        np_dtype = np.dtype(dtype)
        if len(buf) != np_dtype.itemsize * math.prod(shape):
            raise WireError(f"tensor {name!r} frame has {len(buf)} bytes, not its shape's size")
        array = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
        if np_dtype.kind == "f" and not np.isfinite(array).all():
            raise WireError(f"tensor {name!r} holds NaN or Inf")
        tensors[name] = array
    return tensors
