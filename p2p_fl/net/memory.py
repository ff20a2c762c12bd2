"""In-memory transport for the sites of one simulation process.

A `MemoryHub` holds one inbox per site and a virtual clock. `MemoryTransport.send` encodes
a message with `wire.encode` exactly as a ZeroMQ peer does and copies its frames into the
addressee's inbox; `receive` checks them with `wire.decode` (federation, sender, the model's
exact tensor spec, sequence numbers), so whatever a node would refuse a simulated site
refuses too. The sender is authenticated by construction: the hub writes it, as CURVE's
User-Id does.

Liveness comes from the hub rather than from heartbeat messages (a site knows whether it
put a site down): a site that is down is reported dead `peer_timeout_s` after it went down,
and alive again the moment it is back; messages to a site that is down are lost, as a dead
process's queue is. Each site's progress is what it last `pulse`d.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping

import numpy as np

from p2p_fl.net import wire
from p2p_fl.net.drops import DropLog


class MemoryHub:
    """The simulated network of one process.

    Args:
        federation: the federation id every message carries.
        tensor_spec: (name, dtype, shape) of the model's shared tensors.
        peer_timeout_s: a site down this long (virtual seconds) is dead to the others.
        clock: the simulation's virtual time.
    """

    def __init__(self, federation: str, tensor_spec, *, peer_timeout_s: float, clock: Callable[[], float]):
        self.federation = federation
        self.tensor_spec = list(tensor_spec)
        self.peer_timeout_s = peer_timeout_s
        self.clock = clock
        self._inboxes: dict[str, collections.deque] = {}
        self._down_since: dict[str, float] = {}
        self.progress: dict[str, int] = {}
        self._seq: collections.Counter[str] = collections.Counter()  # per site, across its restarts
        self.in_flight = 0  # messages in inboxes, not yet received

    def transport(self, name: str, peers) -> MemoryTransport:
        """The transport of site `name`, which talks to `peers` (a new one after a restart)."""
        self._inboxes[name] = collections.deque()
        self._down_since.pop(name, None)
        return MemoryTransport(self, name, frozenset(peers))

    def down(self, name: str) -> None:
        """Site `name` stops (a crash): its inbox and whatever reaches it are lost."""
        inbox = self._inboxes.pop(name, None)
        self.in_flight -= len(inbox or ())
        self._down_since[name] = self.clock()

    def is_up(self, name: str) -> bool:
        return name in self._inboxes

    def dead(self, now: float) -> set[str]:
        return {n for n, since in self._down_since.items() if now - since >= self.peer_timeout_s}

    def next_death(self, now: float) -> float | None:
        """When the next site that is down becomes dead to the others (None: no such site)."""
        due = [since + self.peer_timeout_s for since in self._down_since.values()
               if since + self.peer_timeout_s > now]
        return min(due, default=None)

    def _deliver(self, to: str, sender: str, frames: list[bytes]) -> None:
        inbox = self._inboxes.get(to)
        if inbox is not None:
            inbox.append((sender, frames))
            self.in_flight += 1

    def _take(self, name: str) -> list:
        inbox = self._inboxes.get(name)
        if not inbox:
            return []
        items = list(inbox)
        inbox.clear()
        self.in_flight -= len(items)
        return items


class MemoryTransport:
    """One site's end of a `MemoryHub` (the `Transport` interface)."""

    mismatched: Mapping[str, list[str]] = {}  # one process, one topology: never any

    def __init__(self, hub: MemoryHub, name: str, peers: frozenset[str]):
        self.hub = hub
        self.name = name
        self.peer_names = peers
        self.bytes_sent = 0
        self.messages_sent = 0
        self.bytes_received = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self._drops = DropLog(name, self.dropped)
        self._last_seq: dict[str, int] = {}
        self._reported_dead: set[str] = set()
        # Called as (to, type, round) for each message sent: a simulation's fault schedule.
        self.on_send: Callable[[str, str, int], None] | None = None

    def send(self, to: str, type: str, round: int, tensors: Mapping[str, np.ndarray] | None = None,
             meta: Mapping[str, Any] | None = None) -> int:
        if to not in self.peer_names:
            raise ValueError(f"{self.name} has no peer {to!r}")
        self.hub._seq[self.name] += 1
        seq = self.hub._seq[self.name]
        frames = wire.encode(type, federation=self.hub.federation, sender=self.name, round=round, seq=seq,
                             tensors=tensors, meta=meta)
        # Copies: the receiver must not share buffers with the sender's arrays.
        frames = [bytes(frame) for frame in frames]
        self.bytes_sent += wire.message_bytes(frames)
        self.messages_sent += 1
        self.hub._deliver(to, self.name, frames)
        if self.on_send is not None:
            self.on_send(to, type, round)
        return seq

    def receive(self, timeout_s: float = 0.0) -> list[wire.Message]:
        messages = []
        for sender, frames in self.hub._take(self.name):
            self.bytes_received += wire.message_bytes(frames)
            try:
                message = wire.decode(frames, federation=self.hub.federation, senders=self.peer_names,
                                      tensor_spec=self.hub.tensor_spec, authenticated_sender=sender)
            except wire.WireError as err:
                self.drop("malformed", str(err))
                continue
            if message.seq <= self._last_seq.get(sender, -1):
                self.drop("replayed-seq", f"seq {message.seq} from {sender} not increasing")
                continue
            self._last_seq[sender] = message.seq
            messages.append(message)
        return messages

    def pulse(self, progress: int) -> None:
        self.hub.progress[self.name] = progress

    def liveness_changes(self) -> tuple[set[str], set[str]]:
        dead = self.hub.dead(self.hub.clock()) & self.peer_names
        died, revived = dead - self._reported_dead, self._reported_dead - dead
        self._reported_dead = dead
        return died, revived

    @property
    def peer_progress(self) -> Mapping[str, int]:
        return {p: r for p, r in self.hub.progress.items() if p in self.peer_names}

    def drop(self, reason: str, detail: str) -> None:
        self._drops.drop(reason, detail, now=self.hub.clock())

    def close(self) -> None:
        self._drops.tick(force=True)
