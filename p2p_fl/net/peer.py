"""A node's ZeroMQ endpoint: one ROUTER it binds for everything it receives, and one
DEALER per peer it sends to. All traffic into a node arrives on its ROUTER, so one poll
serves every protocol; replies (acks) travel back over the replier's own DEALER.

The peer knows bytes and frames, not models: it encodes and checks messages with `wire`
and counts what it sent, received and dropped.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from p2p_fl.net import wire
from p2p_fl.net.heartbeat import Heartbeats

log = logging.getLogger(__name__)

# Queue depth per connection; a model is one message, so a few suffice and memory stays bounded.
SEND_HWM = 64
LINGER_MS = 2000
ZAP_DOMAIN = "p2p_fl"


@dataclass(frozen=True)
class Curve:
    """CURVE identities: this node's key pair and the public key of every peer, by name."""

    public: str
    secret: str
    peer_keys: Mapping[str, str]


class _TopologyAuthenticator(ThreadAuthenticator):
    """ZAP handler admitting only the topology's keys; the User-Id it sets is the peer's name.

    A refused key is counted on every attempt and logged once (a refused client keeps
    reconnecting, and one line per attempt would flood the log).
    """

    def __init__(self, context: zmq.Context, names_by_key: Mapping[str, str], refused: collections.Counter, node: str):
        super().__init__(context, log=logging.getLogger(__name__ + ".zap"))
        self._names_by_key = dict(names_by_key)
        self._refused = refused
        self._node = node
        self._logged: set[str] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        z85_key = key.decode("ascii")
        if z85_key in self._names_by_key:
            return True
        self._refused["unknown-key"] += 1
        if z85_key not in self._logged:
            self._logged.add(z85_key)
            log.warning("%s: refused connection from unknown key %s", self._node, z85_key)
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names_by_key[z85.encode(client_public_key).decode("ascii")]


class Peer:
    """One institution's sockets.

    Args:
        name: this node's name in the topology.
        address: the address its ROUTER binds, e.g. "tcp://127.0.0.1:5701".
        peers: name -> address of every other node it may talk to.
        federation: the federation id every message must carry.
        tensor_spec: (name, dtype, shape) of the model's tensors, in order.
        curve: CURVE keys; None only with the topology's explicit `insecure = true`.
        max_message_bytes: refuse larger inbound frames at the socket (ZMQ_MAXMSGSIZE).
        heartbeat_interval_s: send every peer a heartbeat this often (`pulse`); None: none.
        peer_timeout_s: a peer silent this long is dead (`health`, `liveness_changes`).
    """

    def __init__(
        self,
        name: str,
        address: str,
        peers: Mapping[str, str],
        federation: str,
        tensor_spec: wire.TensorSpec,
        *,
        curve: Curve | None,
        max_message_bytes: int = 512 * 1024 * 1024,
        heartbeat_interval_s: float | None = None,
        peer_timeout_s: float = 10.0,
    ):
        self.name = name
        self.federation = federation
        self.tensor_spec = list(tensor_spec)
        self.peer_names = frozenset(peers)
        self.dropped: collections.Counter[str] = collections.Counter()
        # One context per peer: the ZAP handler belongs to a context.
        self._ctx = zmq.Context()
        self._auth = None
        if curve is not None:
            missing = sorted(set(peers) - set(curve.peer_keys))
            if missing:
                raise ValueError(f"no public key for peers {', '.join(missing)}")
            names_by_key = {curve.peer_keys[p]: p for p in peers}
            self._auth = _TopologyAuthenticator(self._ctx, names_by_key, self.dropped, name)
            self._auth.start()
            self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self._auth)
        else:
            log.warning("%s: INSECURE: CURVE is off (insecure = true); traffic is plaintext and "
                        "unauthenticated. Use this for debugging only.", name)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if curve is not None:
            self._router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
            self._router.curve_secretkey = curve.secret.encode("ascii")
            self._router.curve_publickey = curve.public.encode("ascii")
            self._router.curve_server = True
        self._router.bind(address)
        self._dealers: dict[str, zmq.Socket] = {}
        for peer, peer_address in peers.items():
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, LINGER_MS)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            if curve is not None:
                sock.curve_secretkey = curve.secret.encode("ascii")
                sock.curve_publickey = curve.public.encode("ascii")
                sock.curve_serverkey = curve.peer_keys[peer].encode("ascii")
            sock.connect(peer_address)
            self._dealers[peer] = sock
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        # Sequence numbers start from the clock so a restarted node keeps increasing them.
        self._seq = time.time_ns() // 1000
        self._last_seq: dict[str, int] = {}
        self.bytes_sent = 0
        self.messages_sent = 0
        self.bytes_received = 0
        self.health = None
        if heartbeat_interval_s is not None:
            self.health = Heartbeats(peers, heartbeat_interval_s, peer_timeout_s, time.monotonic())

    def pulse(self, progress: int) -> None:
        """Sends the heartbeats that are due; `progress` tells the peers where we are."""
        if self.health is None:
            return
        for to in self.health.due(time.monotonic()):
            self.send(to, wire.HEARTBEAT, progress, quiet=True)

    def liveness_changes(self) -> tuple[set[str], set[str]]:
        """(peers newly dead, peers alive again) since the last call; empty without heartbeats."""
        if self.health is None:
            return set(), set()
        return self.health.changes(time.monotonic())

    def send(
        self,
        to: str,
        type: str,
        round: int,
        tensors: Mapping[str, np.ndarray] | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        quiet: bool = False,
    ) -> int:
        """Queues one message for peer `to` without blocking; returns its sequence number."""
        self._seq += 1
        frames = wire.encode(
            type, federation=self.federation, sender=self.name, round=round, seq=self._seq,
            tensors=tensors, meta=meta,
        )
        try:
            self._dealers[to].send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            # The peer's queue is full (it is down or far behind); the protocol's
            # retry/deadline logic decides what happens next.
            if quiet:
                return self._seq
            log.warning("%s: send queue to %s full, message %s round %d not queued", self.name, to, type, round)
            return self._seq
        self.bytes_sent += wire.message_bytes(frames)
        self.messages_sent += 1
        return self._seq

    def receive(self, timeout_s: float) -> list[wire.Message]:
        """Waits up to `timeout_s` for messages; returns every valid one that arrived."""
        messages = []
        if not self._poller.poll(int(timeout_s * 1000)):
            return messages
        while True:
            try:
                frames = self._router.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return messages
            message = self._check(frames[1:])  # frames[0] is the ROUTER's routing id
            if message is None:
                continue
            if self.health is not None:
                progress = message.round if message.type == wire.HEARTBEAT else None
                self.health.heard(message.sender, time.monotonic(), progress)
            if message.type != wire.HEARTBEAT:
                messages.append(message)

    def _check(self, frames) -> wire.Message | None:
        self.bytes_received += wire.message_bytes(frames)
        # With CURVE the ZAP handler set User-Id to the authenticated peer's name; the
        # header's sender must be that peer, or a site could speak for another.
        authenticated = frames[0].get("User-Id") if self._auth is not None and frames else None
        if self._auth is not None and not authenticated:
            return self.drop("unauthenticated", "message without an authenticated User-Id")
        try:
            message = wire.decode(
                frames, federation=self.federation, senders=self.peer_names,
                tensor_spec=self.tensor_spec, authenticated_sender=authenticated,
            )
        except wire.WireError as err:
            return self.drop("malformed", str(err))
        if message.seq <= self._last_seq.get(message.sender, -1):
            return self.drop("replayed-seq", f"seq {message.seq} from {message.sender} not increasing")
        self._last_seq[message.sender] = message.seq
        return message

    def drop(self, reason: str, detail: str) -> None:
        """Counts and logs a dropped message: one line naming the rule it broke."""
        self.dropped[reason] += 1
        log.warning("%s: dropped message (%s): %s", self.name, reason, detail)

    def close(self) -> None:
        for sock in self._dealers.values():
            sock.close()
        self._router.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
