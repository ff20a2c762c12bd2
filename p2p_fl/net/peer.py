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
from typing import Any, Mapping

import numpy as np
import zmq

from p2p_fl.net import wire

log = logging.getLogger(__name__)

# Queue depth per connection; a model is one message, so a few suffice and memory stays bounded.
SEND_HWM = 64
LINGER_MS = 2000


class Peer:
    """One institution's sockets.

    Args:
        name: this node's name in the topology.
        address: the address its ROUTER binds, e.g. "tcp://127.0.0.1:5701".
        peers: name -> address of every other node it may talk to.
        federation: the federation id every message must carry.
        tensor_spec: (name, dtype, shape) of the model's tensors, in order.
        max_message_bytes: refuse larger inbound frames at the socket (ZMQ_MAXMSGSIZE).
        context: a zmq.Context to share (tests use one per process); a new one otherwise.
    """

    def __init__(
        self,
        name: str,
        address: str,
        peers: Mapping[str, str],
        federation: str,
        tensor_spec: wire.TensorSpec,
        *,
        max_message_bytes: int = 512 * 1024 * 1024,
        context: zmq.Context | None = None,
    ):
        self.name = name
        self.federation = federation
        self.tensor_spec = list(tensor_spec)
        self.peer_names = frozenset(peers)
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._router.bind(address)
        self._dealers: dict[str, zmq.Socket] = {}
        for peer, peer_address in peers.items():
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, LINGER_MS)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
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
        self.dropped: collections.Counter[str] = collections.Counter()

    def send(
        self,
        to: str,
        type: str,
        round: int,
        tensors: Mapping[str, np.ndarray] | None = None,
        meta: Mapping[str, Any] | None = None,
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
            message = self._check(frames[1:])  # frames[0] is the ROUTER routing id
            if message is not None:
                messages.append(message)

    def _check(self, frames) -> wire.Message | None:
        self.bytes_received += wire.message_bytes(frames)
        try:
            message = wire.decode(
                frames, federation=self.federation, senders=self.peer_names,
                tensor_spec=self.tensor_spec,
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
        if self._own_context:
            self._ctx.term()
