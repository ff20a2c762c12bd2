"""The interface every protocol implements, and all the driver calls.

A protocol is a state machine with no sockets and no clock of its own: the driver hands it
the messages that arrived (already checked by the transport), the end of a training it
asked for, liveness news from the heartbeats and the time, and carries out the actions it
returns (`actions.Send`, `Train`, `Finish`, `Refuse`, `Checkpoint`). The same protocol runs
unchanged over ZeroMQ between processes and in memory inside one simulation process.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

from p2p_fl.net import wire
from p2p_fl.protocols.actions import Action, Weights


class Protocol(abc.ABC):
    """One site's view of a federated run.

    Attributes the driver reads: `finished` (set with the `Finish` action), `progress` (the
    hop or round the heartbeats report), and the counters `repaired` and `rejoined` that go
    into result.json.
    """

    finished: bool = False
    repaired: int = 0  # ring: hand-offs passed on past a holder that died
    rejoined: int = 0  # gossip: times this site caught up with a federation ahead of it

    @property
    def progress(self) -> int:
        """The hop or round this site is at, as its heartbeats tell its peers."""
        return 0

    def shortfall(self) -> str | None:
        """Once finished: why this site's run did not include the federation (it trained
        nothing, or no other site's work reached its model), or None when it took part. A
        run that ends alone must say so (result.json, a nonzero exit), never pass as done."""
        return None

    @abc.abstractmethod
    def start(self, now: float) -> list[Action]:
        """The first actions of a fresh or resumed site (after `restore`)."""

    @abc.abstractmethod
    def on_message(self, msg: wire.Message, now: float) -> list[Action]:
        """Reacts to a checked message. Raises wire.WireError for one this state refuses."""

    @abc.abstractmethod
    def on_trained(self, round: int, weights: Weights, now: float) -> list[Action]:
        """The `Train` of `round` it asked for finished with `weights` (the shared tensors)."""

    @abc.abstractmethod
    def on_tick(self, now: float) -> list[Action]:
        """The time passed: deadlines, resends."""

    def on_peers(self, dead: set[str], revived: set[str], progress: Mapping[str, int],
                 now: float) -> list[Action]:
        """Liveness news: peers newly dead, peers back, the progress their heartbeats report."""
        return []

    @abc.abstractmethod
    def snapshot(self) -> tuple[dict, Weights]:
        """What a restarted site needs to go on (JSON-able state, named arrays)."""

    @abc.abstractmethod
    def restore(self, state: dict, arrays: Weights, now: float) -> None:
        """Takes back a `snapshot` before `start`."""
