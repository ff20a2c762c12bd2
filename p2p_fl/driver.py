"""The driver: one site's event handling, the same in a node process and in a simulation.

It feeds the site's protocol what happens (messages from the transport, liveness news, the
end of a training, the time) and carries out the actions the protocol returns: `Send` on the
transport, `Train` queued for the engine to run, `Refuse` counted as a drop, `Checkpoint`
written before anything else of the same callback leaves, `Finish` kept as the end. It
never trains and never sleeps itself: the engine decides when and how training runs (a
worker thread in `p2p_fl.node`, sites batched together in `p2p_fl.simulate`) and whose
clock `now` is.
"""

from __future__ import annotations

import logging
from typing import Callable

from p2p_fl.net import WireError, wire
from p2p_fl.net.transport import Transport, traffic
from p2p_fl.protocols import Finish, Refuse, Send, Train
from p2p_fl.protocols.actions import Action, Checkpoint, Weights
from p2p_fl.site import Site

log = logging.getLogger(__name__)


class SetupMismatch(Exception):
    """Before round 0, a peer's messages carried another federation fingerprint: the sites
    do not run the same federation (topology file, [data] settings or p2p-fl version)."""


class Driver:
    """Carries out `site.protocol`'s actions over `transport` (None: a local run, nothing
    to send). Engines call `start` once, then `poll`, `next_training` and `trained` as
    their loop goes, until `final` is set; then `result`."""

    def __init__(self, site: Site, transport: Transport | None):
        self.site = site
        self.protocol = site.protocol
        self.transport = transport
        self.final: Finish | None = None
        self.training: Train | None = None  # handed to the engine, not yet trained
        self._waiting: list[Train] = []
        # The start window: until `_start_by` the protocol waits for every peer to be heard;
        # what arrives meanwhile is held for it.
        self._start_by: float | None = None
        self._held: list[wire.Message] = []
        # Peers the heartbeats call dead, and since when every one of them is.
        self._dead: set[str] = set()
        self._alone_since: float | None = None

    def start(self, now: float) -> None:
        """Starts the protocol: at once for a local run or a resumed site (it rejoins), else
        once every peer was heard or `network.start_window_s` went by (`poll` opens it)."""
        window = self.site.topology.network.start_window_s
        if self.transport is None or self.site.resumes or window <= 0:
            self._carry_out(self._guarded(self.protocol.start, now))
            return
        self._start_by = now + window
        log.info("%s: waiting up to %g s for %s to start", self.site.name, window, ", ".join(self._unheard()))
        self.site.emit({"event": "state", "state": "waiting for peers"})

    def poll(self, now: Callable[[], float], timeout_s: float) -> None:
        """Messages that arrived (waiting up to `timeout_s` for the first), the heartbeats,
        liveness news and the time, each handed to the protocol. `now` is the engine's clock,
        read as each event is handled."""
        transport = self.transport
        if transport is None:
            return
        arrived = transport.receive(timeout_s)
        if self._start_by is not None:
            transport.pulse(self.protocol.progress)  # the others are waiting to hear us too
            self._held += arrived
            window_over = now() >= self._start_by
            self._refuse_a_mismatch(window_over)
            if self._unheard() and not window_over:
                return
            self._open_start(now())
            arrived, self._held = self._held, []
        # One checkpoint covers what every message of the batch changed, before any reply leaves.
        replies: list[Action] = []
        for msg in arrived:
            replies += self._guarded(self.protocol.on_message, msg, now())
        self._carry_out(replies)
        transport.pulse(self.protocol.progress)
        dead, revived = transport.liveness_changes()
        for site in sorted(dead):
            log.warning("%s: %s is silent past %.1f s: dead", self.site.name, site,
                        self.site.topology.network.peer_timeout_s)
        for site in sorted(revived):
            log.warning("%s: %s is back", self.site.name, site)
        self._dead = (self._dead | dead) - revived
        everyone = len(self.site.topology.names) - 1
        if len(self._dead) < everyone:
            self._alone_since = None
        elif self._alone_since is None:
            self._alone_since = now()
        self._carry_out(self._guarded(self.protocol.on_peers, dead, revived, transport.peer_progress, now()))
        self._carry_out(self._guarded(self.protocol.on_tick, now()))

    def abandoned(self, now: float) -> str | None:
        """Why this site should stop waiting: every peer has been dead for
        network.start_window_s while it has nothing to train (the federation is over, say a
        ring whose final model went out while this site was down, or unreachable); None while
        a peer is alive, or recently was."""
        window = self.site.topology.network.start_window_s
        if self._alone_since is None or self.training is not None or self._waiting or now - self._alone_since < window:
            return None
        return (f"{self.site.name}: no peer heard for {now - self._alone_since + self.site.topology.network.peer_timeout_s:.0f} s "
                f"(network.start_window_s={window:g}): the federation is over or out of reach; its checkpoint "
                "is kept: start it again to resume")

    def _refuse_a_mismatch(self, window_over: bool) -> None:
        """Before round 0, a peer under another fingerprint stops this site (it stops too:
        it sees ours differ), naming the fields once its heartbeat told them. Later, its
        messages are only refused: a site that started with the others, or resumed from its
        checkpoint, keeps going with those that agree."""
        for peer, fields in sorted(self.transport.mismatched.items()):
            if fields != ["(not yet known)"] or window_over:
                raise SetupMismatch(
                    f"{self.site.name}: {peer} runs another federation setup: {', '.join(fields)} differ(s) from "
                    "this site's; every site must run the same topology file, [data] image_size, channels and "
                    "classes, and p2p-fl version: fix it and start again")

    def _unheard(self) -> list[str]:
        """The peers whose heartbeats have not reached us yet."""
        heard = self.transport.peer_progress
        return sorted(p for p in self.site.topology.names if p != self.site.name and p not in heard)

    def _open_start(self, now: float) -> None:
        unheard = self._unheard()
        if unheard:
            log.warning("%s: starting without %s: not heard within network.start_window_s=%g s; "
                        "they rejoin when they come", self.site.name, ", ".join(unheard),
                        self.site.topology.network.start_window_s)
        else:
            log.info("%s: every peer heard; starting", self.site.name)
        self._start_by = None
        self._carry_out(self._guarded(self.protocol.start, now))

    def next_training(self) -> Train | None:
        """The next training to run, if none is running (it becomes `training`)."""
        if self.training is None and self._waiting:
            self.training = self._waiting.pop(0)
            self.site.emit({"event": "state", "state": "training", "round": self.training.round,
                            **self.training.meta})
            return self.training
        return None

    def trained(self, weights: Weights, record: dict, now: float) -> None:
        """The running training is done: log it, tell the protocol."""
        step, self.training = self.training, None
        record["bytes_sent"] = self.transport.bytes_sent if self.transport else 0
        self.site.trained(record)
        actions = self._guarded(self.protocol.on_trained, step.round, weights, now)
        self._carry_out(actions)
        if not self._waiting and self.final is None:
            self.site.emit({"event": "state", "state": "waiting"})  # handed on; the next model is elsewhere

    def result(self, process: dict | None = None) -> dict:
        """After `final`: evaluates and writes the site's result (result.json); `process`:
        what the engine reports of the process that ran the site (result.json's "process")."""
        return self.site.write_result(self.final, traffic(self.transport), process)

    def _carry_out(self, actions: list[Action]) -> None:
        if any(isinstance(a, Checkpoint) for a in actions):
            # Before anything of this callback leaves; a failed write stops the site (it
            # resumes from the last good checkpoint), it is never dropped and counted.
            self.site.save_checkpoint()
        for action in actions:
            if isinstance(action, Send):
                self.transport.send(action.to, action.type, action.round, action.weights, action.meta)
            elif isinstance(action, Train):
                self._waiting.append(action)
            elif isinstance(action, Refuse):
                self.transport.drop("refused", action.reason)
            elif isinstance(action, Finish):
                self.final = action
                self.site.finishing(action)

    def _guarded(self, callback: Callable[..., list[Action]], *args) -> list[Action]:
        """Runs a protocol callback under drop-and-count: a message it refuses, or an error
        it hits on something a peer sent, is counted and logged; the site never stops on it."""
        if self.transport is None:  # a local run: nothing from outside, so an error is a bug
            return callback(*args)
        try:
            return callback(*args)
        except WireError as err:
            what = f"{args[0].type} from {args[0].sender}: " if args and isinstance(args[0], wire.Message) else ""
            self.transport.drop("refused", f"{what}{err}")
        except Exception as err:  # noqa: BLE001 - a bug here must not let a peer end the site:
            # it is logged with its traceback and counted (result.json: protocol-error), so it shows
            log.exception("%s: %s failed; dropped and counted", self.site.name, callback.__name__)
            self.transport.drop("protocol-error", f"{callback.__name__}: {type(err).__name__}: {err}")
        return []
