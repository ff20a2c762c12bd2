"""Failure detection by heartbeats (the ZeroMQ guide's "Paranoid Pirate" liveness).

Every peer is sent a heartbeat each `interval_s`; any valid message from a peer counts as
hearing from it. A peer silent for `SUSPECT_INTERVALS` intervals is suspect, silent for
`timeout_s` it is dead, and it is alive again the moment it speaks. A dead peer is still
sent a heartbeat now and then (every `timeout_s`): after a cut link both ends think the
other dead, and someone has to speak first.

Pure bookkeeping, no sockets and no clock of its own: the peer feeds it times.
"""

from __future__ import annotations

SUSPECT_INTERVALS = 3

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"


class Heartbeats:
    """Liveness of the peers of one node.

    Args:
        peers: the names of the peers to watch.
        interval_s: how often each peer is sent a heartbeat.
        timeout_s: silence after which a peer is dead (> interval_s).
        now: the start time; every peer gets a full timeout of grace from it.
    """

    def __init__(self, peers, interval_s: float, timeout_s: float, now: float):
        if not 0 < interval_s < timeout_s:
            raise ValueError(f"need 0 < heartbeat interval ({interval_s}) < peer timeout ({timeout_s})")
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.last_heard = {p: now for p in peers}
        self.progress: dict[str, int] = {}  # peer -> the round its last heartbeat carried
        self._last_sent = {p: float("-inf") for p in peers}
        self._reported_dead: set[str] = set()

    def heard(self, peer: str, now: float, progress: int | None = None) -> None:
        """Any valid message from `peer` arrived (a heartbeat carries its progress)."""
        self.last_heard[peer] = now
        if progress is not None:
            self.progress[peer] = progress

    def state(self, peer: str, now: float) -> str:
        silent = now - self.last_heard[peer]
        if silent > self.timeout_s:
            return DEAD
        if silent > SUSPECT_INTERVALS * self.interval_s:
            return SUSPECT
        return ALIVE

    def dead(self, now: float) -> set[str]:
        return {p for p in self.last_heard if self.state(p, now) == DEAD}

    def due(self, now: float) -> list[str]:
        """The peers to send a heartbeat to now (marks them sent)."""
        due = []
        for peer, sent in self._last_sent.items():
            every = self.timeout_s if self.state(peer, now) == DEAD else self.interval_s
            if now - sent >= every:
                self._last_sent[peer] = now
                due.append(peer)
        return due

    def mark_sent(self, peers, now: float) -> None:
        """Heartbeats went to `peers` now (outside `due`: news that could not wait)."""
        for peer in peers:
            self._last_sent[peer] = now

    def changes(self, now: float) -> tuple[set[str], set[str]]:
        """(newly dead, alive again) since the previous call. A death is held back while
        another peer is suspect, so that peers lost together are reported together: a node
        whose own link went down sees every peer fall silent at once, but their timeouts
        expire one by one, and at the first it would still believe most of them alive (a
        ring acted on that and carried the model on alone; found by p2p-fl chaos). The delay
        is at most one peer timeout, and only while some other peer is silent too."""
        dead = self.dead(now)
        suspects = any(self.state(p, now) == SUSPECT for p in self.last_heard)
        revived = self._reported_dead - dead
        died = set() if suspects else dead - self._reported_dead
        self._reported_dead = (self._reported_dead - revived) | died
        return died, revived
