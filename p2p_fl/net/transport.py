"""What a driver needs from a transport: the ZeroMQ `Peer` between processes, or a
`MemoryTransport` between the sites of one simulation process. Both carry the same encoded
messages and check them with `wire.decode`, so a simulation validates what a node would."""

from __future__ import annotations

import collections
from typing import Any, Mapping, Protocol

import numpy as np

from p2p_fl.net import wire


class Transport(Protocol):
    name: str
    bytes_sent: int
    messages_sent: int
    bytes_received: int
    dropped: collections.Counter
    # Peer -> the fields in which its federation setup differs (its messages are refused).
    mismatched: Mapping[str, list[str]]

    def send(self, to: str, type: str, round: int, tensors: Mapping[str, np.ndarray] | None = None,
             meta: Mapping[str, Any] | None = None) -> Any:
        """Queues one message for peer `to` without blocking."""

    def receive(self, timeout_s: float) -> list[wire.Message]:
        """The valid messages that arrived (waiting up to `timeout_s` where it can wait)."""

    def pulse(self, progress: int) -> None:
        """Heartbeats: tells the peers this site is alive and at `progress`."""

    def liveness_changes(self) -> tuple[set[str], set[str]]:
        """(peers newly dead, peers alive again) since the last call."""

    @property
    def peer_progress(self) -> Mapping[str, int]:
        """Peer -> the progress its heartbeats last reported."""

    def drop(self, reason: str, detail: str) -> None:
        """Counts (and logs, rate-limited) a message refused under `reason`."""

    def close(self) -> None:
        """Releases the transport's resources; nothing is sent afterwards."""


def traffic(transport: Transport | None) -> dict:
    """The counters result.json reports for a site's transport (zeros without one)."""
    if transport is None:
        return {"bytes_sent": 0, "messages_sent": 0, "bytes_received": 0, "dropped": {}}
    return {"bytes_sent": transport.bytes_sent, "messages_sent": transport.messages_sent,
            "bytes_received": transport.bytes_received, "dropped": dict(transport.dropped)}
