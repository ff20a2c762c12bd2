"""Weight transfer on a ring: Single (SWT, one pass) and Cyclic (CWT, several cycles).

One model travels. Hop h of the run is trained by `schedule[h]`; when it is done the holder
hands the model to `schedule[h + 1]` and keeps its copy until that successor acknowledges.
A successor silent past the hand-off deadline, or dead by the heartbeats, is skipped (its hop
is lost, never the model). After the last hop the holder sends the final model to every site.

Majority: a site skips or repairs past a dead site only while it sees most of the sites of
that hop's cycle alive, itself included. A site cut off from the others sees them all dead;
without this it carried the ring on alone while the others carried it on without it, and the
run ended with two final models (found by `p2p-fl chaos` with network cuts). A site in a
minority keeps its hand-off and resends it until the others are back (or it is given up at
`run_timeout_s`); so a ring of two waits for a dead site to come back, and any ring stops
while half its sites are down.

Repair: once acknowledged, a site still keeps the copy it handed on until the site it handed
it to reports (in its heartbeats) that it handed the model on in turn and was acknowledged.
If that holder dies before, mid-training, the predecessor hands its copy to the next live
site: at most one site's local work is lost and the ring never stalls. A holder that comes
back from its checkpoint trains its hop anyway (unless a later hop reaches it while it
listens) and hands on a hop the next site may already have: it is acknowledged and ignored.

Trust: a hop is taken only from the site the schedule says hands it over (walking back over
the sites this receiver itself sees dead, or was skipped at), and only if it is the
receiver's next hop or another site's heartbeats put the ring within a cycle of it; a final
model only from the last holder (one refused for want of another site's word is held, and
taken if the heartbeats that follow give it). Only the holder's own word moves a
predecessor's repair copy. So one site, whatever it sends, cannot inject a model, end a run
early (but see the last cycle in docs/protocols.md, "What does not hold"), or make a
predecessor drop the copy that would repair the ring; it can still spoil the model while it
legitimately holds it, which no ring can prevent.

Intermittent sites (`[[events]]`): a site away in a cycle has no hop in it.

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
from typing import Mapping

import numpy as np

from p2p_fl.federate import weighted_average
from p2p_fl.net import wire
from p2p_fl.protocols.actions import CHECKPOINT, Action, Finish, Send, Train, Weights
from p2p_fl.protocols.base import Protocol

FINAL_MODELS = ("last", "average-last-cycle")


def ring_cycles(peers: list[str], cycles: int, order: str, seed: int,
                away: Mapping[str, frozenset[int]] | None = None) -> list[list[str]]:
    """The sites of each cycle, in the order they train: `cycles` passes over `peers`.

    With order "shuffle" every cycle is a fresh seeded permutation, and a cycle never starts
    with the site that ended the previous one (it would train twice in a row). A site away in
    cycle c (`away[site]` holds c) is left out of it; the others keep the order they would
    have had, so a run with absences is comparable with one without.
    """
    rng = np.random.default_rng(seed)
    away = away or {}
    result: list[list[str]] = []
    for c in range(cycles):
        cycle = list(peers) if order == "listed" else [peers[i] for i in rng.permutation(len(peers))]
        cycle = [p for p in cycle if c not in away.get(p, ())]
        if result and len(cycle) > 1 and cycle[0] == result[-1][-1]:
            cycle[0], cycle[1] = cycle[1], cycle[0]
        result.append(cycle)
    return result


def ring_schedule(peers: list[str], cycles: int, order: str, seed: int,
                  away: Mapping[str, frozenset[int]] | None = None) -> list[str]:
    """The site that trains each hop (`ring_cycles`, one after the other)."""
    return [site for cycle in ring_cycles(peers, cycles, order, seed, away) for site in cycle]


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
    repair: bool = False  # carries a copy kept for repair past a holder that died


class RingProtocol(Protocol):
    """One site's view of an SWT/CWT run.

    Args:
        me: this site's name.
        schedule: site per hop (see `ring_schedule`).
        ack_timeout_s: resend an unacknowledged message after this.
        handoff_timeout_s: give up on a successor (skip it) or on delivering the final model.
        final: "last" (the last hop's model) or "average-last-cycle".
        cycle_lengths: hops per cycle (`ring_cycles`); None: equal cycles of every site.
        resume_wait_s: after a restart, how long to listen to the heartbeats before training
            a hop the checkpoint holds (the ring may have been repaired round it meanwhile).
    """

    def __init__(self, me: str, schedule: list[str], *, ack_timeout_s: float, handoff_timeout_s: float,
                 final: str = "last", cycle_lengths: list[int] | None = None, resume_wait_s: float = 3.0):
        if me not in schedule:
            raise ValueError(f"{me!r} has no hop in the ring schedule")
        if final not in FINAL_MODELS:
            raise ValueError(f"final must be one of {FINAL_MODELS}, got {final!r}")
        if cycle_lengths is None:
            per_cycle = len(set(schedule))
            whole, rest = divmod(len(schedule), per_cycle)
            cycle_lengths = [per_cycle] * whole + ([rest] if rest else [])
        if sum(cycle_lengths) != len(schedule):
            raise ValueError(f"cycle lengths {cycle_lengths} do not add up to {len(schedule)} hops")
        self.me = me
        self.schedule = schedule
        self.num_hops = len(schedule)
        self.cycle_of = [c for c, n in enumerate(cycle_lengths) for _ in range(n)]
        self.cycle_length = max(cycle_lengths)  # the window a hand-off may come from
        self.ack_timeout_s = ack_timeout_s
        self.handoff_timeout_s = handoff_timeout_s
        self.last_round_accepted = -1
        self.skipped: list[str] = []
        self.repaired = 0  # hand-offs re-sent because their holder died
        self.duplicates = 0
        self.hops_trained = 0
        self.received = False  # a hop or the final model came from another site
        # First hop whose output joins the final average (num_hops: no averaging).
        self.average_from = self.num_hops - cycle_lengths[-1] if final == "average-last-cycle" else self.num_hops
        self._average: Weights | None = None  # running mean of the outputs of hops >= average_from
        self._averaged = 0  # how many outputs that mean holds (skipped hops add none)
        self.finished = False
        self._pending: list[_Pending] = []
        self._final: Weights | None = None  # the run's final model, once this site holds it
        self._final_meta: dict = {}
        self._final_at = 0.0  # when it came: we stay for the others until handoff_timeout_s after
        self._unvouched_finals: dict[str, tuple[Weights, dict]] = {}  # sender -> a final _may_hand refused
        self._training: tuple[int, Weights | None] | None = None  # a hop accepted, not yet trained
        self._kept: _Pending | None = None  # our last hand-off, acknowledged, until a later hop is seen
        self._dead: set[str] = set()
        self._peer_progress: dict[str, int] = {}  # site -> the hop its heartbeats report
        self._handed = -1  # the hop our last acknowledged hand-off went to
        self._handed_by: str | None = None  # the site that handed us our last hop
        self.resume_wait_s = resume_wait_s
        self._resume_until: float | None = None  # resumed: hold the checkpoint's hop until then

    @property
    def progress(self) -> int:
        """The hop this site holds or held last, or the hop it handed the model to once that
        hand-off is acknowledged (heartbeats tell the others: its predecessor then lets go of
        its repair copy); num_hops once it holds the final model."""
        if self._final is not None:
            return self.num_hops
        return max(self.last_round_accepted, self._handed, 0)

    def start(self, now: float) -> list[Action]:
        if self._training is not None:  # resumed with a hop accepted and not trained
            self._resume_until = now + self.resume_wait_s
            return []
        if self.last_round_accepted < 0 and self.schedule[0] == self.me:
            self.last_round_accepted = 0
            self._training = (0, None)
            return [self._train(0, None)]
        return []

    def on_message(self, msg: wire.Message, now: float) -> list[Action]:
        """Reacts to a checked message. Raises wire.WireError for one this state refuses."""
        if msg.type == wire.ACK:
            kept = False
            for p in [p for p in self._pending
                      if p.to == msg.sender and p.round == msg.round and p.type == msg.meta.get("of")]:
                self._pending.remove(p)
                if p.type in (wire.MODEL, wire.MODEL_AVERAGE):
                    self._kept = p  # until its holder hands on: it may still die
                    self._handed = max(self._handed, p.round)
                    kept = True
            return ([CHECKPOINT] if kept else []) + self._finish_when_everyone_has_it(now)
        ack = Send(msg.sender, wire.ACK, msg.round, meta={"of": msg.type})
        if msg.type == wire.FINAL:
            if msg.round != self.num_hops:
                raise wire.WireError(f"final model for round {msg.round}, expected {self.num_hops}")
            if not self._may_hand(self.num_hops, msg.sender):
                held = self._final is None and msg.sender in self.schedule
                if held:
                    # Held, not taken: a third site's heartbeats may vouch for it a moment
                    # later (`on_peers`). A final coming back with a restored link arrived
                    # just before the heartbeat that vouched for it; refused for good, it
                    # left this site waiting for a resend its holder had given up.
                    self._unvouched_finals[msg.sender] = (dict(msg.tensors), dict(msg.meta))
                raise wire.WireError(f"final model from {msg.sender}, who is not the ring's last holder"
                                     + (" (held in case later heartbeats vouch for it)" if held else ""))
            if self._final is not None:
                return [ack]  # a resend: our ack was lost
            return self._take_final(msg.sender, dict(msg.tensors), dict(msg.meta), now)
        if msg.type in (wire.MODEL, wire.MODEL_AVERAGE):
            averaged = msg.meta.get("averaged", 0)
            if msg.type == wire.MODEL_AVERAGE and not (
                    msg.round > self.average_from and isinstance(averaged, int)
                    and 1 <= averaged <= msg.round - self.average_from):
                raise wire.WireError(f"running mean of {averaged!r} models does not fit hop {msg.round}")
            if msg.round <= self.last_round_accepted:
                self.duplicates += 1
                return [ack]  # a resend of a hop we already took, or a repaired hop's twin
            if self._final is not None:  # the run is over; we only stay for the others
                raise wire.WireError(f"hop {msg.round} from {msg.sender} after the final model")
            if msg.round >= self.num_hops or self.schedule[msg.round] != self.me:
                raise wire.WireError(f"hop {msg.round} is not {self.me}'s to train")
            if not self._may_hand(msg.round, msg.sender):
                raise wire.WireError(f"{msg.sender} does not hand on hop {msg.round} by the schedule")
            if not self._due(msg.round, msg.sender):
                raise wire.WireError(f"hop {msg.round} from {msg.sender} is ahead of where the ring is")
            self.last_round_accepted = msg.round
            self._handed_by = msg.sender
            # A final held from before this hop came was not the end of the run: a stale
            # message or a lie. Judged later with the new hop's hander as `_handed_by`, the
            # insider suite's final forged in the first cycle was taken in the last.
            self._unvouched_finals = {}
            self.received = True
            self._kept = None  # the model came round again: our copy is history
            model, self._average = _split_average(msg.tensors)
            self._averaged = averaged if self._average is not None else 0
            self._training = (msg.round, model)
            self._resume_until = None  # a newer hop came while we listened: the old one is history
            # The hop is ours once it is on disk: then acknowledge.
            return [CHECKPOINT, ack, self._train(msg.round, model)]
        raise wire.WireError(f"unexpected {msg.type} message in a ring")

    def _take_final(self, sender: str, weights: Weights, meta: dict, now: float) -> list[Action]:
        """The run's final model, from a site `_may_hand` allowed to hand it to us."""
        self.received = True
        self._final, self._final_meta, self._final_at = weights, meta, now
        self._unvouched_finals = {}
        # The run is over: a hand-off of ours still waiting (a site back from a cut, with
        # the ring finished without it) or a repair copy has nowhere left to go. Kept, it
        # held this site here (no majority to skip its dead addressee) until it gave up.
        self._pending = [p for p in self._pending if p.type == wire.FINAL]
        self._kept = None
        # Ours once on disk; then we stay until every site holds it (our heartbeats vouch
        # for the end of the run to a site that comes back: see `_finish_when_everyone_has_it`).
        ack = Send(sender, wire.ACK, self.num_hops, meta={"of": wire.FINAL})
        return [CHECKPOINT, ack, *self._finish_when_everyone_has_it(now)]

    def on_trained(self, round: int, weights: Weights, now: float) -> list[Action]:
        """The local training of hop `round` finished with `weights`."""
        self._training = None
        self.hops_trained += 1
        if round >= self.average_from:
            mean = weights if not self._averaged else weighted_average([self._average, weights], [self._averaged, 1])
            self._average = {name: mean[name] for name in weights}  # keep the model's order
            self._averaged += 1
        if self._final is not None:  # the final came while we trained: the ring is over
            return [CHECKPOINT, *self._finish_when_everyone_has_it(now)]
        return [CHECKPOINT, *self._hand_on(round + 1, weights, now)]

    def on_peers(self, dead: set[str], revived: set[str], progress: Mapping[str, int], now: float) -> list[Action]:
        """Liveness news from the heartbeats: who died, who is back, the hops they report."""
        self._dead = (self._dead | dead) - revived
        self._peer_progress.update(progress)
        kept = self._kept
        if kept is not None and self._peer_progress.get(kept.to, -1) > kept.round:
            self._kept = None  # its holder handed it on: the model moved on safely
        for sender, (weights, meta) in sorted(self._unvouched_finals.items()):
            if self._final is None and self._may_hand(self.num_hops, sender):
                return self._take_final(sender, weights, meta, now)
        return self._past_the_dead(now) + self._finish_when_everyone_has_it(now)

    def on_tick(self, now: float) -> list[Action]:
        """Resends what is unacknowledged; skips successors past their deadline."""
        actions: list[Action] = self._past_the_dead(now)
        if self._resume_until is not None and now >= self._resume_until:
            # No later hop reached us: train the checkpoint's hop. If the ring was repaired
            # round us meanwhile, the next site acknowledges our hand-off as a duplicate; we
            # never drop a hop on another site's word, which a liar could use to lose the model.
            self._resume_until = None
            round, model = self._training
            actions.append(self._train(round, model))
        for p in list(self._pending):
            if now - p.first_sent > self.handoff_timeout_s and (p.type == wire.FINAL or self._majority(p.round)):
                self._pending.remove(p)
                if p.type == wire.FINAL:
                    self.skipped.append(p.to)
                elif p.repair and p.to not in self._dead:
                    # Alive and not taking our repair copy: the holder we thought dead came
                    # back and handed the model on itself. Passing the copy further would
                    # fork the ring with a model missing that work.
                    actions.append(CHECKPOINT)
                else:
                    actions += self._skip(p, now)
            elif now - p.last_sent > self.ack_timeout_s:
                p.last_sent = now
                actions.append(Send(p.to, p.type, p.round, p.weights, p.meta))
        return actions + self._finish_when_everyone_has_it(now)

    def shortfall(self) -> str | None:
        if self.hops_trained == 0:
            return f"none of its {self.schedule.count(self.me)} hops was trained here (the ring skipped it)"
        if not self.received:
            return "no other site's model reached it: it trained alone"
        return None

    def _past_the_dead(self, now: float) -> list[Action]:
        """Skips a hand-off whose successor is dead (now, not at the hand-off deadline), and
        hands our kept copy past a holder that died mid-training; both only with a majority,
        and never once we hold the final (the run is over)."""
        actions: list[Action] = []
        if self._final is not None:
            return actions
        for p in [p for p in self._pending if p.to in self._dead and p.type != wire.FINAL]:
            if self._majority(p.round):
                self._pending.remove(p)
                actions += self._skip(p, now)
        kept = self._kept
        if kept is not None and kept.to in self._dead and self._majority(kept.round):
            self._kept = None  # the holder died mid-training: hand our copy past it
            self.repaired += 1
            actions += self._skip(kept, now, repair=True)
        return actions

    def _majority(self, hop: int) -> bool:
        """Whether we see most of the sites of hop's cycle alive, ourselves included: only
        then may we decide that a site is gone and carry the ring on without it."""
        cycle = self.cycle_of[min(hop, self.num_hops - 1)]
        present = {site for h, site in enumerate(self.schedule) if self.cycle_of[h] == cycle} | {self.me}
        return 2 * len(present - self._dead) > len(present)

    def _skip(self, handoff: _Pending, now: float, repair: bool = False) -> list[Action]:
        """Hands the model of `handoff` past its addressee, whose hop is lost."""
        self.skipped.append(handoff.to)
        model, self._average = _split_average(handoff.weights)
        self._averaged = handoff.meta.get("averaged", 0)
        return [CHECKPOINT, *self._hand_on(handoff.round + 1, model, now, repair=repair or handoff.repair)]

    def _hand_on(self, round: int, weights: Weights, now: float, repair: bool = False) -> list[Action]:
        while round < self.num_hops and self.schedule[round] in self._dead and self._majority(round):
            self.skipped.append(self.schedule[round])  # dead now: do not wait for it
            round += 1
        if round >= self.num_hops:
            return self._send_final(self._average if self._average is not None else weights, now)
        to = self.schedule[round]
        if to == self.me:
            self.last_round_accepted = round
            self._training = (round, weights)
            return [self._train(round, weights)]
        meta = {"cycle": self.cycle_of[round], "skipped": len(self.skipped)}
        msg_type, tensors = wire.MODEL, weights
        if self._average is not None:
            msg_type = wire.MODEL_AVERAGE
            meta["averaged"] = self._averaged
            tensors = {**weights, **{wire.AVERAGE_PREFIX + n: a for n, a in self._average.items()}}
        self._pending.append(_Pending(to, msg_type, round, tensors, meta, now, now, repair))
        return [Send(to, msg_type, round, tensors, meta)]

    def _send_final(self, weights: Weights, now: float) -> list[Action]:
        self._final, self._final_at = weights, now
        meta = {"hops": self.num_hops, "skipped": len(self.skipped)}
        self._final_meta = {**meta, "repaired": self.repaired}
        actions: list[Action] = []
        for site in sorted(set(self.schedule) - {self.me}):
            self._pending.append(_Pending(site, wire.FINAL, self.num_hops, weights, meta, now, now))
            actions.append(Send(site, wire.FINAL, self.num_hops, weights, meta))
        return actions + self._finish_when_everyone_has_it(now)

    def _finish_when_everyone_has_it(self, now: float) -> list[Action]:
        """Finishes once this site holds the final model, its own hand-offs of it are done
        (the last holder: acknowledged or given up), and every other site's heartbeats say
        it holds it too, or handoff_timeout_s after it came. Staying lets a site that was
        down at the end and skipped at its last hops take the final: our heartbeats vouch
        that the ring is over (`_may_hand`); leaving at once left it waiting for nothing."""
        if self._final is None or self._pending or self.finished:
            return []
        others = set(self.schedule) - {self.me}
        if any(self._peer_progress.get(site, -1) < self.num_hops for site in others) \
                and now < self._final_at + self.handoff_timeout_s:
            return []
        self.finished = True
        return [Finish(self._final, meta=self._final_meta)]

    def _may_hand(self, hop: int, sender: str) -> bool:
        """Whether `sender` may hand us `hop` (num_hops: the final model): it is the site the
        schedule puts before it or, walking back within one cycle, before a site we see dead
        or a hop of ours we never took. We count ourselves skipped only if a third site's
        heartbeats put the ring at that hop (else any predecessor could claim we were), or
        for the final at the end of the run (see below)."""
        for k in range(hop - 1, max(-1, hop - 1 - self.cycle_length), -1):
            site = self.schedule[k]
            if site == self.me:
                if k == self.last_round_accepted:
                    # The site that gave us this hop may say the ring went on without us
                    # (it gave up waiting for our acknowledgement): what it handed us was in
                    # its hands anyway.
                    return sender == self._handed_by
                if k < self.last_round_accepted:
                    return False
                # Skipped at our hop k: believable if a third site puts the ring past it,
                # or, for the final model, if the site that handed us our last hop says so
                # of a hop of the last cycle (we were cut off at the end of the run; that
                # site could have handed us any model for it anyway).
                untaken = [h for h in range(self.last_round_accepted + 1, hop) if self.schedule[h] == self.me]
                end = (hop == self.num_hops and sender == self._handed_by
                       and all(self.cycle_of[h] == self.cycle_of[-1] for h in untaken))
                if not (end or self._vouched(k - 1, sender)):
                    return False
                continue
            if site == sender:
                return True
            if site not in self._dead and not (hop == self.num_hops and self._holds_final(site)):
                return False
        return False

    def _holds_final(self, site: str) -> bool:
        """`site`'s own heartbeats say it holds the final model: it took the end of the ring
        without its later hops, so a final that skipped them is believed on its word (a
        receiver that never saw it dead refused the final and waited for nothing; found by
        p2p-fl chaos). Only the skipped site's own word counts, as for a repair copy."""
        return self._peer_progress.get(site, -1) >= self.num_hops

    def _vouched(self, hop: int, sender: str) -> bool:
        """A site other than `sender` (and us) reports the ring at `hop` or later."""
        others = [r for site, r in self._peer_progress.items() if site not in (sender, self.me)]
        return max(others, default=-1) >= hop

    def _due(self, hop: int, sender: str) -> bool:
        """Whether the ring can be at `hop`: it is our next hop, or a site other than the
        sender reports a hop within one cycle of it (one site cannot vouch for itself)."""
        mine = [h for h in range(self.last_round_accepted + 1, self.num_hops) if self.schedule[h] == self.me]
        return (mine and mine[0] == hop) or self._vouched(hop - self.cycle_length, sender)

    def _train(self, round: int, weights: Weights | None) -> Train:
        return Train(round, weights, progress=round / self.num_hops, meta={"cycle": self.cycle_of[round]})

    # Checkpoints: everything needed to go on after a crash, as JSON plus named arrays.

    def snapshot(self) -> tuple[dict, Weights]:
        arrays: Weights = {}

        def put(prefix: str, weights: Weights | None) -> bool:
            if weights is None:
                return False
            arrays.update({f"{prefix}/{n}": a for n, a in weights.items()})
            return True

        def handoff(prefix: str, p: _Pending) -> dict:
            put(prefix, p.weights)
            return {"to": p.to, "type": p.type, "round": p.round, "meta": p.meta, "repair": p.repair}

        state = {
            "last_round_accepted": self.last_round_accepted, "skipped": self.skipped, "repaired": self.repaired,
            "duplicates": self.duplicates, "averaged": self._averaged, "average": put("average", self._average),
            "training": None if self._training is None else self._training[0],
            "training_weights": self._training is not None and put("training", self._training[1]),
            "pending": [handoff(f"pending{i}", p) for i, p in enumerate(self._pending)],
            "kept": None if self._kept is None else handoff("kept", self._kept),
            "final": put("final", self._final), "final_meta": self._final_meta,
            "handed": self._handed, "handed_by": self._handed_by,
            "hops_trained": self.hops_trained, "received": self.received,
        }
        return state, arrays

    def restore(self, state: dict, arrays: Weights, now: float) -> None:
        """Takes back a `snapshot`; unacknowledged messages go out again at once."""

        def take(prefix: str) -> Weights:
            return {n[len(prefix) + 1:]: a for n, a in arrays.items() if n.startswith(prefix + "/")}

        def handoff(prefix: str, d: dict) -> _Pending:
            return _Pending(d["to"], d["type"], d["round"], take(prefix), d["meta"], now, float("-inf"), d["repair"])

        self.last_round_accepted = state["last_round_accepted"]
        self.skipped, self.repaired, self.duplicates = list(state["skipped"]), state["repaired"], state["duplicates"]
        self.hops_trained, self.received = state.get("hops_trained", 0), state.get("received", False)
        self._averaged, self._handed, self._handed_by = state["averaged"], state["handed"], state["handed_by"]
        self._average = take("average") if state["average"] else None
        if state["training"] is not None:
            self._training = (state["training"], take("training") if state["training_weights"] else None)
        self._pending = [handoff(f"pending{i}", d) for i, d in enumerate(state["pending"])]
        self._kept = handoff("kept", state["kept"]) if state["kept"] else None
        self._final = take("final") if state["final"] else None
        self._final_meta, self._final_at = state.get("final_meta", {}), now


def _split_average(tensors: Weights) -> tuple[Weights, Weights | None]:
    """(model, running mean or None) from the tensors of a MODEL or MODEL_AVERAGE message."""
    model = {n: a for n, a in tensors.items() if not n.startswith(wire.AVERAGE_PREFIX)}
    average = {n[len(wire.AVERAGE_PREFIX):]: a for n, a in tensors.items() if n.startswith(wire.AVERAGE_PREFIX)}
    return model, (average or None)
