"""Weight transfer on a ring: Single (SWT, one pass) and Cyclic (CWT, several cycles).

One model travels. Hop h of the run is trained by `schedule[h]`; when it is done the holder
hands the model to `schedule[h + 1]` and keeps its copy until that successor acknowledges.
A successor silent past the hand-off deadline is skipped (its hop is lost, never the model).
After the last hop the holder sends the final model to every site.

With `final = "average-last-cycle"` the final model is the mean of the models the last
cycle produced, one per site (a running mean travels with the model in that cycle). A ring
otherwise ends with the model of its last site, weights and BatchNorm statistics fitted
last to that one site's mix of labels: on a label-skewed split that site decides the
calibration of everyone's model.

`RingProtocol` is a state machine with no sockets and no clock of its own: the node feeds
it messages, finished training and the time, and carries out the actions it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2p_fl.federate import weighted_average
from p2p_fl.net import wire
from p2p_fl.protocols.actions import Action, Finish, Send, Train, Weights

FINAL_MODELS = ("last", "average-last-cycle")


def ring_schedule(peers: list[str], cycles: int, order: str, seed: int) -> list[str]:
    """The site that trains each hop: `cycles` passes over `peers`.

    With order "shuffle" every cycle is a fresh seeded permutation, and a cycle never starts
    with the site that ended the previous one (it would train twice in a row).
    """
    rng = np.random.default_rng(seed)
    schedule: list[str] = []
    for _ in range(cycles):
        cycle = list(peers) if order == "listed" else [peers[i] for i in rng.permutation(len(peers))]
        if schedule and len(cycle) > 1 and cycle[0] == schedule[-1]:
            cycle[0], cycle[1] = cycle[1], cycle[0]
        schedule.extend(cycle)
    return schedule


@dataclass
class _Pending:
    """A message sent and not yet acknowledged; the sender keeps its weights until then."""

    to: str
    type: str
    round: int
    weights: Weights
    meta: dict
    first_sent: float
    last_sent: float


class RingProtocol:
    """One site's view of an SWT/CWT run.

    Args:
        me: this site's name.
        schedule: site per hop (see `ring_schedule`).
        ack_timeout_s: resend an unacknowledged message after this.
        handoff_timeout_s: give up on a successor (skip it) or on delivering the final model.
        final: "last" (the last hop's model) or "average-last-cycle".
    """

    def __init__(self, me: str, schedule: list[str], *, ack_timeout_s: float, handoff_timeout_s: float,
                 final: str = "last"):
        if me not in schedule:
            raise ValueError(f"{me!r} has no hop in the ring schedule")
        if final not in FINAL_MODELS:
            raise ValueError(f"final must be one of {FINAL_MODELS}, got {final!r}")
        self.me = me
        self.schedule = schedule
        self.num_hops = len(schedule)
        self.cycle_length = len(set(schedule))
        self.ack_timeout_s = ack_timeout_s
        self.handoff_timeout_s = handoff_timeout_s
        self.last_round_accepted = -1
        self.skipped: list[str] = []
        self.duplicates = 0
        # First hop whose output joins the final average (num_hops: no averaging).
        self.average_from = self.num_hops - self.cycle_length if final == "average-last-cycle" else self.num_hops
        self._average: Weights | None = None  # running mean of the outputs of hops >= average_from
        self._averaged = 0  # how many outputs that mean holds (skipped hops add none)
        self.finished = False
        self._pending: list[_Pending] = []
        self._final: Weights | None = None

    def start(self, now: float) -> list[Action]:
        if self.schedule[0] == self.me:
            self.last_round_accepted = 0
            return [self._train(0, None)]
        return []

    def on_message(self, msg: wire.Message, now: float) -> list[Action]:
        """Reacts to a checked message. Raises wire.WireError for one this state refuses."""
        if msg.type == wire.ACK:
            self._pending = [
                p for p in self._pending
                if not (p.to == msg.sender and p.round == msg.round and p.type == msg.meta.get("of"))
            ]
            return self._finish_if_delivered()
        ack = Send(msg.sender, wire.ACK, msg.round, meta={"of": msg.type})
        if msg.type == wire.FINAL:
            if msg.round != self.num_hops:
                raise wire.WireError(f"final model for round {msg.round}, expected {self.num_hops}")
            if self.finished:
                return [ack]  # a resend: our ack was lost
            self.finished = True
            return [ack, Finish(dict(msg.tensors), meta=dict(msg.meta))]
        if msg.type in (wire.MODEL, wire.MODEL_AVERAGE):
            averaged = msg.meta.get("averaged", 0)
            if msg.type == wire.MODEL_AVERAGE and not (
                    msg.round > self.average_from and isinstance(averaged, int)
                    and 1 <= averaged <= msg.round - self.average_from):
                raise wire.WireError(f"running mean of {averaged!r} models does not fit hop {msg.round}")
            if msg.round <= self.last_round_accepted:
                self.duplicates += 1
                return [ack]  # a resend of a hop we already took: its ack was lost
            if msg.round >= self.num_hops or self.schedule[msg.round] != self.me:
                raise wire.WireError(f"hop {msg.round} is not {self.me}'s to train")
            # Only a site that held one of the hops just before may hand this one on (skips
            # of dead successors included); anyone else is injecting a model.
            previous = self.schedule[max(0, msg.round - self.cycle_length):msg.round]
            if msg.sender not in previous:
                raise wire.WireError(f"{msg.sender} held none of the hops before {msg.round}")
            self.last_round_accepted = msg.round
            model, self._average = _split_average(msg.tensors)
            self._averaged = averaged if self._average is not None else 0
            return [ack, self._train(msg.round, model)]
        raise wire.WireError(f"unexpected {msg.type} message in a ring")

    def on_trained(self, round: int, weights: Weights, now: float) -> list[Action]:
        """The local training of hop `round` finished with `weights`."""
        if round >= self.average_from:
            mean = weights if not self._averaged else weighted_average([self._average, weights], [self._averaged, 1])
            self._average = {name: mean[name] for name in weights}  # keep the model's order
            self._averaged += 1
        return self._hand_on(round + 1, weights, now)

    def on_tick(self, now: float) -> list[Action]:
        """Resends what is unacknowledged; skips successors past their deadline."""
        actions: list[Action] = []
        for p in list(self._pending):
            if now - p.first_sent > self.handoff_timeout_s:
                self._pending.remove(p)
                self.skipped.append(p.to)
                if p.type in (wire.MODEL, wire.MODEL_AVERAGE):
                    model, self._average = _split_average(p.weights)
                    self._averaged = p.meta.get("averaged", 0)
                    actions += self._hand_on(p.round + 1, model, now)
            elif now - p.last_sent > self.ack_timeout_s:
                p.last_sent = now
                actions.append(Send(p.to, p.type, p.round, p.weights, p.meta))
        return actions + self._finish_if_delivered()

    def _hand_on(self, round: int, weights: Weights, now: float) -> list[Action]:
        if round >= self.num_hops:
            return self._send_final(self._average if self._average is not None else weights, now)
        to = self.schedule[round]
        if to == self.me:
            self.last_round_accepted = round
            return [self._train(round, weights)]
        meta = {"cycle": round // self.cycle_length, "skipped": len(self.skipped)}
        msg_type, tensors = wire.MODEL, weights
        if self._average is not None:
            msg_type = wire.MODEL_AVERAGE
            meta["averaged"] = self._averaged
            tensors = {**weights, **{wire.AVERAGE_PREFIX + n: a for n, a in self._average.items()}}
        self._pending.append(_Pending(to, msg_type, round, tensors, meta, now, now))
        return [Send(to, msg_type, round, tensors, meta)]

    def _send_final(self, weights: Weights, now: float) -> list[Action]:
        self._final = weights
        meta = {"hops": self.num_hops, "skipped": len(self.skipped)}
        actions: list[Action] = []
        for site in sorted(set(self.schedule) - {self.me}):
            self._pending.append(_Pending(site, wire.FINAL, self.num_hops, weights, meta, now, now))
            actions.append(Send(site, wire.FINAL, self.num_hops, weights, meta))
        return actions + self._finish_if_delivered()

    def _finish_if_delivered(self) -> list[Action]:
        # The last holder stays until every site has the final model (or was given up on).
        if self._final is None or self._pending or self.finished:
            return []
        self.finished = True
        return [Finish(self._final, meta={"hops": self.num_hops, "skipped": len(self.skipped)})]

    def _train(self, round: int, weights: Weights | None) -> Train:
        return Train(round, weights, progress=round / self.num_hops,
                     meta={"cycle": round // self.cycle_length})


def _split_average(tensors: Weights) -> tuple[Weights, Weights | None]:
    """(model, running mean or None) from the tensors of a MODEL or MODEL_AVERAGE message."""
    model = {n: a for n, a in tensors.items() if not n.startswith(wire.AVERAGE_PREFIX)}
    average = {n[len(wire.AVERAGE_PREFIX):]: a for n, a in tensors.items() if n.startswith(wire.AVERAGE_PREFIX)}
    return model, (average or None)
