"""Every gossip message's layout: how the secure-sum steps of federate/secure_sum.py, run keys
and plain models become wire messages, and back.

Each builder turns a federate value (`GroupRequest`, `MaskedReply`, `Announcement`,
`Release`) or a run key into the `Send` of one message: its type, round, tensors and meta.
Each parser turns a message `wire.decode` checked back into that value, and raises
`wire.WireError` when the message's layout does not fit (a type or tensor set other than
its meta announces, a masked reply made for another group).

Which tensors a message of each type carries is `wire.expected_spec`'s alone (the layouts
are described next to it, in net/wire.py): the builders take their tensor names and order
from it, given the meta they write, and the parsers accept only a message whose tensors are
the ones it lists. What this module adds is which federate field travels where:

    gossip-model     the model's tensors, in its order.
    gossip-hello     Hello: run_key (tensor), have (meta). Round 0.
    gossip-group     GroupRequest: members, threshold (meta); round; aggregator = the sender.
    gossip-masked    MaskedReply: masked, seed_commitment (tensor commitment) and
                     encrypted_shares (share/<k>, named in meta.share_for).
    gossip-announce  Announcement: survivors, dropped (meta), encrypted_shares (share/<k>,
                     named in meta.shares_from); round; aggregator = the sender.
    gossip-release   Release: shares (share/<k>, named in meta.shares_of), correction (tensor,
                     present when meta.correction).
    gossip-chunk     Chunked sums: the aggregator's mix of its slice (tensor mix), the slice
                     in meta (as on the three above: `wire.span_meta`).

The gossip protocol builds and reads its messages only here: net knows frames, federate
knows the values, neither knows the other.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

import numpy as np

from p2p_fl.federate import Announcement, GroupRequest, MaskedReply, Release
from p2p_fl.net import wire
from p2p_fl.protocols.actions import Send, Weights


class Hello(NamedTuple):
    """A peer's run key (federate/masks.py RunKey.public) and whether it holds ours."""

    run_key: bytes
    have: bool


# Plain gossip.

def model(to: str, round: int, weights: Weights) -> Send:
    """A site's model trained in `round`, offered to neighbour `to`."""
    return Send(to, wire.GOSSIP_MODEL, round, weights)


def parse_model(msg: wire.Message) -> Weights:
    _check_type(msg, wire.GOSSIP_MODEL)
    return dict(msg.tensors)


# Run keys.

def hello(to: str, run_key: bytes, have: bool) -> Send:
    """Our public run key to `to`; `have`: we already hold its key (false asks for it)."""
    return _send(to, wire.GOSSIP_HELLO, 0, {"have": have}, {"run_key": np.frombuffer(run_key, np.uint8)})


def parse_hello(msg: wire.Message) -> Hello:
    _check_layout(msg, wire.GOSSIP_HELLO)
    return Hello(as_bytes(msg.tensors["run_key"]), msg.meta["have"])


# Secure sums (federate/secure_sum.py), in the order their messages travel.

def group(to: str, request: GroupRequest) -> Send:
    """The aggregator's request to member `to` to join its sum."""
    meta = {"members": wire.join_names(request.members), "threshold": request.threshold,
            **wire.span_meta(request.span)}
    return Send(to, wire.GOSSIP_GROUP, request.round, None, meta)


def parse_group(msg: wire.Message, federation: str) -> GroupRequest:
    """The request as the aggregator (the sender) made it; `check_request` judges it."""
    _check_layout(msg, wire.GOSSIP_GROUP)
    return GroupRequest(federation, msg.round, msg.sender, wire.names_field(msg.meta, "members"),
                        msg.meta["threshold"], wire.span_field(msg.meta, None))


def masked(to: str, round: int, reply: MaskedReply, span: tuple[int, int] | None = None) -> Send:
    """A member's masked model (or slice `span` of it), commitment and encrypted shares for
    aggregator `to`."""
    others = sorted(reply.encrypted_shares)
    values = {"masked": reply.masked, "commitment": np.frombuffer(reply.seed_commitment, np.uint8),
              **_shares(reply.encrypted_shares)}
    return _send(to, wire.GOSSIP_MASKED, round, {"share_for": wire.join_names(others), **wire.span_meta(span)},
                 values)


def parse_masked(msg: wire.Message, members: Iterable[str], span: tuple[int, int] | None = None) -> MaskedReply:
    """A member's reply to our sum over `members` (and slice `span`): its shares must be for
    the others."""
    _check_layout(msg, wire.GOSSIP_MASKED)
    if set(wire.names_field(msg.meta, "share_for")) != set(members) - {msg.sender}:
        raise wire.WireError(f"masked reply from {msg.sender} was made for another group")
    _check_span(msg, span)
    return MaskedReply(msg.tensors["masked"], _shares_of(msg), as_bytes(msg.tensors["commitment"]))


def announce(to: str, a: Announcement) -> Send:
    """The aggregator's survivors and dropped, with the shares survivor `to` must open."""
    meta = {"survivors": wire.join_names(a.survivors), "dropped": wire.join_names(a.dropped),
            "shares_from": wire.join_names(a.encrypted_shares)}
    return _send(to, wire.GOSSIP_ANNOUNCE, a.round, meta, _shares(a.encrypted_shares))


def parse_announce(msg: wire.Message, federation: str) -> Announcement:
    _check_layout(msg, wire.GOSSIP_ANNOUNCE)
    return Announcement(federation, msg.round, msg.sender, wire.names_field(msg.meta, "survivors"),
                        wire.names_field(msg.meta, "dropped"), _shares_of(msg))


def release(to: str, round: int, r: Release, span: tuple[int, int] | None = None) -> Send:
    """A survivor's opened shares, and its pairwise correction (of slice `span`) if members
    dropped."""
    values = _shares(r.shares)
    if r.correction is not None:
        values["correction"] = r.correction
    meta = {"shares_of": wire.join_names(r.shares), "correction": r.correction is not None,
            **wire.span_meta(span)}
    return _send(to, wire.GOSSIP_RELEASE, round, meta, values)


def parse_release(msg: wire.Message, span: tuple[int, int] | None = None) -> Release:
    _check_layout(msg, wire.GOSSIP_RELEASE)
    _check_span(msg, span)
    correction = np.array(msg.tensors["correction"]) if msg.meta["correction"] else None
    return Release(_shares_of(msg), correction)


def chunk(to: str, round: int, span: tuple[int, int], mix: np.ndarray) -> Send:
    """Chunked sums: the sender's mix of its slice `span` of round `round`, to neighbour `to`."""
    return _send(to, wire.GOSSIP_CHUNK, round, wire.span_meta(span), {"mix": mix})


def parse_chunk(msg: wire.Message, allowed: Collection[tuple[int, int]]) -> tuple[tuple[int, int], np.ndarray]:
    """The sender's mix and the slice it is of, which must be one of `allowed` (the slices
    the topology lets the sender sum, not its claim)."""
    _check_layout(msg, wire.GOSSIP_CHUNK)
    span = wire.span_field(msg.meta, None)
    if span not in allowed:
        raise wire.WireError(f"{msg.type} from {msg.sender} is over the slice {span}, it may sum {sorted(allowed)}")
    return span, np.array(msg.tensors["mix"])


def as_bytes(array: np.ndarray) -> bytes:
    """A uint8 tensor (a share, a key, a commitment) as the bytes federate works on."""
    return np.ascontiguousarray(array, np.uint8).tobytes()


def _send(to: str, type: str, round: int, meta: dict, values: Mapping[str, np.ndarray]) -> Send:
    """The Send of a message whose tensors `wire.expected_spec` fixes from its meta: `values`
    in its order, and every one of them."""
    names = _names(type, meta)
    if set(values) != set(names):
        raise ValueError(f"{type}: tensors {sorted(values)} are not the {names} its meta announces")
    return Send(to, type, round, {n: values[n] for n in names}, meta)


def _names(type: str, meta: Mapping) -> list[str]:
    # The model's spec only sizes the flat vectors; the names do not depend on it.
    return [name for name, _, _ in wire.expected_spec(type, (), meta)]


def _check_type(msg: wire.Message, type: str) -> None:
    if msg.type != type:
        raise wire.WireError(f"{msg.type} message where {type} was expected")


def _check_layout(msg: wire.Message, type: str) -> None:
    """A message of `type` whose tensors are those its meta announces (as `wire.decode` checks)."""
    _check_type(msg, type)
    names = _names(type, msg.meta)
    if list(msg.tensors) != names:
        raise wire.WireError(f"{type} carries tensors {list(msg.tensors)}, its meta announces {names}")


def _check_span(msg: wire.Message, span: tuple[int, int] | None) -> None:
    got = wire.span_field(msg.meta, None)
    if got != span:
        raise wire.WireError(f"{msg.type} from {msg.sender} is over the slice {got}, this sum is over {span}")


def _shares(shares: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    return {wire.SHARE_PREFIX + k: np.frombuffer(shares[k], np.uint8) for k in sorted(shares)}


def _shares_of(msg: wire.Message) -> dict[str, bytes]:
    """The share/<k> tensors of a checked message, by k, in the order they came."""
    p = wire.SHARE_PREFIX
    return {name[len(p):]: as_bytes(a) for name, a in msg.tensors.items() if name.startswith(p)}
