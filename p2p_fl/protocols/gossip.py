"""Gossip averaging: every round each site trains, then averages with its graph neighbours.

Round r at site i: train locally, then replace the model by the weighted mean over itself
and the neighbours heard in time (i's mixing row, renormalised over who was heard), and
train round r + 1 from it. After the last round the mixed model is the site's final model;
every site ends with its own.

Mixing weights come from the topology only (`mixing_weights`): on the complete graph with
sample counts listed, FedAvg's sample-count weights; otherwise Metropolis-Hastings weights.
No site can claim a bigger share in its messages.

Plain (`secure = False`, gossip_plain.py): each site sends its trained model to every
neighbour and mixes what arrived by the round deadline.

Secure (gossip_secure.py; docs/protocols.md; the steps are federate/secure_sum.py's): each
site is the aggregator of a secure sum over its own live neighbours and a member of each
neighbour's sum in the same round, under pairwise secrets bound to this run by run keys
(gossip-hello). Fewer than 2 members, or a sum that fails, keeps the site's own model for
that round.

Rounds without a central clock: a site never mixes rounds. Messages for the next round (a
neighbour ahead) wait until this site gets there; stale or far-future ones are refused.

Sites that fail, are cut off, or come and go. Heartbeats (`on_peers`) tell who is dead: a
dead neighbour is not waited for and not asked into a sum; it is back when it speaks. A site
that is behind (resumed from its checkpoint, cut off, or back from a planned absence)
rejoins without ever being handed a neighbour's model on demand:

* secure: it runs a sum of its own, as aggregator, for the latest round its neighbours can
  still answer (`_rejoin`), and starts the next round from that sum (mixed with its own
  model if it has trained one): it learns exactly what aggregating that round teaches any
  site, the weighted sum of at least two neighbours, nothing more;
* plain: it mixes the models its neighbours send it anyway, once two of them (one, for a
  site with a single neighbour) sent models for the same later round.

Where the federation is comes from the neighbours' heartbeats, and one neighbour's word
never moves a site: the round it rejoins is the second-highest round its live neighbours
report, and the sum still needs two members that really hold models for it. A site's own
trained model is never thrown away: the rejoining sum mixes it in. Planned absences (`away`,
from the topology's [[events]]) are known to every site: an absent site is left out of the
rounds it misses and rejoins the same way for the round it returns to; `on_leave =
"keep-last"` (plain only) keeps a neighbour's last model in the mean while it is away.

Each round's mix is recorded in the meta of the next Train (the last in Finish's): the
round mixed, members asked, survivors, dropped (names), and for secure sums the values
clipped by the encoding, whether the site kept its own model and why.

`GossipProtocol` is a state machine with no sockets and no clock of its own, like the ring.
It is the round skeleton (rounds, the Train/mix cycle, absences, when to rejoin, the end,
checkpoints); how a round's models meet is its mixer's (gossip_mixer.py: `PlainMixer` in
gossip_plain.py, `SecureMixer` in gossip_secure.py), and every message's layout is
gossip_messages.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2p_fl.federate import (
    FixedPoint,
    RunKey,
    Slices,
    fixed_point_for,
    metropolis_hastings_weights,
    sample_count_weights,
)
from p2p_fl.federate.mixing import Adjacency
from p2p_fl.federate.robust import AGGREGATIONS
from p2p_fl.net import wire
from p2p_fl.protocols.actions import CHECKPOINT, Action, Finish, Train, Weights
from p2p_fl.protocols.base import Protocol
from p2p_fl.protocols.gossip_messages import as_bytes
from p2p_fl.protocols.gossip_mixer import Mixer
from p2p_fl.protocols.gossip_plain import PlainMixer
from p2p_fl.protocols.gossip_secure import SecureMixer


def mixing_weights(graph: Adjacency, samples: dict[str, int]) -> dict[str, dict[str, float]]:
    """Every site's mixing row: sample-count (FedAvg) weights on the complete graph when
    counts are listed, Metropolis-Hastings weights otherwise."""
    complete = all(len(nbrs) == len(graph) - 1 for nbrs in graph.values())
    if complete and samples:
        return sample_count_weights(graph, samples)
    return metropolis_hastings_weights(graph)


def secure_fixed_point(graph: Adjacency, clip: float) -> FixedPoint:
    """The federation's encoding: the finest uint32 scale at which no neighbourhood sum wraps,
    the aggregator's own model included (mixing weights of one row add up to 1)."""
    return fixed_point_for(clip=clip, num_contributions=max(len(n) for n in graph.values()) + 1,
                           total_weight=1.0)


@dataclass(frozen=True)
class SecureSetup:
    """What a site needs for secure sums: the long-term pairwise X25519 secrets and the encoding."""

    federation: str
    # Every other peer -> X25519 secret of the long-term keys (`secure_sum.shared_secrets_with`):
    # the members of a neighbour's sum need not be our own neighbours. Mixed with the run
    # keys (`run_pair_secret`) before any seed is derived.
    shared: dict[str, bytes]
    fixed_point: FixedPoint
    # Chunked sums ([gossip] chunked, the complete graph): the slice of the flat model each
    # site sums and publishes, and who stands in for a site that is down; None: full sums.
    slices: Slices | None = None


class GossipProtocol(Protocol):
    """One site's view of a gossip run: the round skeleton, mixing through `self.mixer`.

    Args:
        me: this site's name.
        graph: the federation's undirected graph (the same on every site).
        weights: every site's mixing row (`mixing_weights`).
        rounds: rounds of train-then-mix.
        round_timeout_s: how long a site waits for its neighbours in each step of a round.
        secure: None for plain averaging, else the secure-sum setup.
        aggregation: plain gossip's rule: "mean" (the mixing row), "median" or "trimmed-mean"
            (federate/robust.py, cutting `trim` of the models at each end).
        away: peer -> rounds it is planned to be absent (topology [[events]]).
        on_leave: "forget" an absent neighbour, or "keep-last" its last model (plain only).
        resume_wait_s: after a restart, how long to listen to the heartbeats before deciding
            between training the checkpoint's round and rejoining a later one.
        hello_interval_s: how often run keys are sent again to peers that lack ours or ours theirs.
        run_key: this site's key for the run (None: a fresh one; a resumed node restores its own).
        outer: the outer optimizer (learn/outer.py: `step(start, average)`, `snapshot`,
            `restore`), or None to adopt each round's mix as it is (FedAvg).
        initial: the model every site starts round 0 from (the outer step's first start).
        refit: the head refit (learn/head_refit.py: `rounds`, `step(start, mix, usable, last)`,
            `snapshot`, `restore`), or None. Its rounds come after the `rounds` of training: their Trains carry
            meta `head_refit_step` (the site sends the head's statistics, not a trained
            model) and their mixes go through `refit.step` instead of the outer optimizer.

    For the mixers (gossip_mixer.py): the settings above, the round state they read (`round`,
    `own`, `start_model`, `mixing`, `training`, `deadline`, `dead`, `final`, `finished`,
    `live`) and the calls that move the round: `next_round` (the round is mixed), `catch_up`
    (plain: train a later round the federation is at), `end` (the final model goes out). A
    mixer writes one field itself: `failed_rejoin`, when a rejoining sum failed.
    """

    # The mixer each mode gets (a subclass may swap in its own).
    plain_mixer: type[Mixer] = PlainMixer
    secure_mixer: type[Mixer] = SecureMixer

    def __init__(self, me: str, graph: Adjacency, weights: dict[str, dict[str, float]], rounds: int, *,
                 round_timeout_s: float, secure: SecureSetup | None = None, aggregation: str = "mean",
                 trim: float = 0.2, away: dict[str, frozenset[int]] | None = None, on_leave: str = "forget",
                 resume_wait_s: float = 3.0, hello_interval_s: float = 1.0, run_key: RunKey | None = None,
                 outer=None, initial: Weights | None = None, refit=None):
        if me not in graph:
            raise ValueError(f"{me!r} is not a node of the gossip graph")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.me = me
        self.graph = graph
        self.neighbours = sorted(graph[me])
        self.weights = weights
        self.row = weights[me]
        self.train_rounds = rounds
        self.refit = refit
        self.rounds = rounds + (refit.rounds if refit is not None else 0)  # the rounds mixed, refit ones included
        self.round_timeout_s = round_timeout_s
        self.secure = secure
        if aggregation not in AGGREGATIONS or (secure is not None and aggregation != "mean"):
            raise ValueError(f"aggregation {aggregation!r} is not one of {AGGREGATIONS} (only mean with secure sums)")
        self.aggregation = aggregation
        self.trim = trim
        if on_leave == "keep-last" and secure is not None:
            raise ValueError("keep-last needs plain gossip: with masked sums nobody holds a site's last model")
        self.away = away or {}
        self.on_leave = on_leave
        self.resume_wait_s = resume_wait_s
        self.hello_interval_s = hello_interval_s
        self.run_key = run_key or RunKey()  # in the checkpoint: a restarted node stays in its run
        if outer is not None and initial is None:
            raise ValueError("an outer optimizer needs the initial model (its first step starts there)")
        self.outer = outer
        self.initial = initial
        self.round = 0  # the round being trained or mixed
        self.finished = False
        self.training = False  # a Train of self.round is out and not yet back
        self.mixing = False  # this round's mix is under way (own model trained, or a rejoin)
        self.own: Weights | None = None  # this round's trained model, once training is done
        self.start_model: Weights | None = None  # the model this round started from
        self.deadline = 0.0  # for the neighbours' part of this round's mix
        self.final: Finish | None = None  # after the last mix (secure: sent once the neighbours are served)
        # Failures and rejoining.
        self.dead: set[str] = set()
        self._peer_rounds: dict[str, int] = {}  # the rounds neighbours' heartbeats report
        self._resume_until: float | None = None  # resumed: listen to the heartbeats until then
        self.failed_rejoin = -1  # the round of our last rejoining sum that failed: not retried
        self.rejoined = 0
        self.rounds_trained = 0
        self.rounds_mixed = 0  # rounds whose mix took in at least one neighbour's model
        self.last_alone = 0  # the last rounds in a row whose mix no neighbour's model reached
        self.mixer: Mixer = self.plain_mixer(self) if secure is None else self.secure_mixer(self)

    @property
    def progress(self) -> int:
        return self.round

    def present(self, peer: str, round: int) -> bool:
        return round not in self.away.get(peer, ())

    def live(self, round: int) -> list[str]:
        """The neighbours expected in `round`: present by the plan and not dead."""
        return [n for n in self.neighbours if self.present(n, round) and n not in self.dead]

    def far_behind(self, peer: str) -> bool:
        """Whether `peer`'s heartbeats put it two or more rounds behind ours: resumed or cut
        off, it refuses requests that far ahead and rejoins through a sum of its own, so a
        sum of ours that waited for it would wait out its deadline (and, in a group of 3, fail)."""
        return self._peer_rounds.get(peer, self.round) < self.round - 1

    def catching_up(self, members) -> bool:
        """Whether a live one of `members` reports (in its heartbeats) a round behind ours."""
        return any(m not in self.dead and self._peer_rounds.get(m, self.round) < self.round for m in members)

    def may_wait_for_the_dead(self, now: float) -> bool:
        """Whether a mix that would hold no neighbour's model should wait: a neighbour the
        plan expects this round is dead, and the round's deadline has not passed. A site
        frozen or cut off for a few seconds comes back within it; without the wait, the
        others (and the site itself, seeing them all dead) raced through every round alone
        (found by p2p-fl chaos: two of four sites frozen at once)."""
        expected = [n for n in self.neighbours if self.present(n, self.round)]
        return now < self.deadline and any(n in self.dead for n in expected)

    def start(self, now: float) -> list[Action]:
        resumed = self._resume_until is not None
        actions = self.mixer.start(now, resumed)
        if resumed:  # back from a checkpoint: first hear where the others are
            self._resume_until = now + self.resume_wait_s
            return actions
        if not self.present(self.me, self.round):
            return actions + self._go_away(now)
        return actions + [self._train_round()]

    def on_trained(self, round: int, weights: Weights, now: float) -> list[Action]:
        """Round `round` trained: offer the model to the neighbours, then wait for theirs."""
        if round != self.round or not self.training:
            raise ValueError(f"trained round {round} while at round {self.round}")
        self.training = False
        self.rounds_trained += 1
        self.own = weights
        self.mixing = True
        self.deadline = now + self.round_timeout_s
        # The learner's state after this training (its key, the DP steps taken) is on disk
        # before the model leaves: a restart never trains again with the same noise, and
        # the privacy this release spent stays counted.
        actions: list[Action] = [CHECKPOINT, *self.mixer.trained(weights)]
        if self.mixer.rejoins_with_a_sum:
            target = self._rejoin_target()
            if target is not None and target >= round + 2:  # the others are past this round's sums
                return actions + self._rejoin(target - 1, now)
        return actions + self.mixer.step(now)

    def on_message(self, msg: wire.Message, now: float) -> list[Action]:
        """Reacts to a checked message. Raises wire.WireError for one this state refuses."""
        if msg.type != wire.GOSSIP_HELLO:  # run keys go to every peer, the rest to neighbours
            if msg.sender not in self.graph[self.me]:
                raise wire.WireError(f"{msg.sender} is not a neighbour of {self.me}")
            self.dead.discard(msg.sender)
        return self.mixer.on_message(msg, now)

    def on_tick(self, now: float) -> list[Action]:
        actions = self.mixer.tick(now)
        if self._resume_until is not None:
            if now < self._resume_until:
                return actions
            self._resume_until = None
            return actions + self._after_resume(now)
        return actions + self.mixer.step(now)

    def on_peers(self, dead: set[str], revived: set[str], progress: dict[str, int], now: float) -> list[Action]:
        """Liveness news from the heartbeats: who died, who is back, the rounds they report."""
        self.dead = (self.dead | (dead & set(self.neighbours))) - revived
        self.mixer.revived(revived)
        self._peer_rounds.update({n: r for n, r in progress.items() if n in self.graph[self.me]})
        if self.finished or self.final is not None:
            return self.mixer.step(now)  # after the last mix only the end is left to step to
        if self._resume_until is not None:
            return []
        return self._maybe_rejoin(now)  # the next on_tick stops waiting for whoever just died

    # For the mixers.

    def next_round(self, mixed: Weights, record: dict, now: float) -> list[Action]:
        """This round is mixed: train the next from `mixed`, or end the run after the last.
        `record` goes into the next Train's meta (the last, Finish's)."""
        order = self.own if self.own is not None else (self.start_model or mixed)
        mixed = {name: mixed[name] for name in order}  # the model's order, as the wire expects
        start = self.start_model if self.start_model is not None else self.initial
        if self.round >= self.train_rounds:
            # A refit round: the same Newton step at every site from the pooled statistics; a
            # sum that failed (our own statistics alone), an average missing a slice (chunked
            # sums: that slice holds the start's zeros) or a rejoining mix moves no head.
            usable = (self.own is not None and "rejoined_from" not in record and not record.get("kept_own", False)
                      and not record.get("chunks_missing")
                      and (record.get("survivors", 0) > 0 or record.get("chunks_heard", 0) > 0))
            mixed, done = self.refit.step(start, mixed, usable, last=self.round + 1 >= self.rounds)
            record = {**record, **done}
        elif self.outer is not None and self.own is not None and "rejoined_from" not in record:
            # A regular round: step from where it started along start - mix. A rejoining
            # mix starts from a model the federation has left: it is adopted as it is.
            mixed = self.outer.step(start, mixed)
        record = {"mixed_round": self.round, **record}
        # Chunked sums: the neighbours' mixes of their slices reach us even when our own sum did not run.
        heard = record.get("chunks_heard", 0) > 0
        self.rounds_mixed += heard or record.get("survivors", 0) > 0 and not record.get("kept_own", False)
        self.last_alone = self.last_alone + 1 if record.get("survivors", 0) == 0 and not heard else 0
        self.own = None
        self.mixing = False
        self.start_model = mixed
        if self.round + 1 >= self.rounds:
            self.final = Finish(mixed, meta={"rounds": self.rounds, "rejoined": self.rejoined, **record})
            return [CHECKPOINT, *self.mixer.finish(now)]
        self.round += 1
        if not self.present(self.me, self.round):
            return [CHECKPOINT, *self._go_away(now)]
        return [CHECKPOINT, self._train_round(record)]

    def catch_up(self, round: int) -> list[Action]:
        """Plain: the federation is at `round`; train it from our latest model (the one we
        trained, if any: never thrown away)."""
        if self.own is not None:
            self.start_model = {n: self.own[n] for n in self.own}
        rejoin_from, self.round, self.own, self.mixing = self.round, round, None, False
        self.rejoined += 1
        return [CHECKPOINT, self._train_round({"rejoined_from": rejoin_from})]

    def shortfall(self) -> str | None:
        if self.rounds_trained == 0:
            return f"it trained none of the {self.rounds} rounds"
        if self.rounds_mixed == 0:
            return f"it mixed with no neighbour in any of the {self.rounds} rounds: its model is its own alone"
        if self.last_alone:
            # Back after the others had finished (or every neighbour gone): it trained on
            # alone, and its final model is not the federation's.
            return (f"no neighbour's model reached its last {self.last_alone} of {self.rounds} rounds' mixes "
                    "(the others had gone): its final model is not the federation's")
        return None

    def end(self) -> list[Action]:
        """The run is over for this site: its final model goes out."""
        self.finished = True
        return [self.final]

    # Falling behind and rejoining.

    def _rejoin_target(self) -> int | None:
        """The round the federation is at, by the heartbeats of our live neighbours: the
        second-highest round they report (the only one, for a site with one neighbour), so
        that no single neighbour's claim can move us."""
        reported = sorted(r for n, r in self._peer_rounds.items() if n not in self.dead)
        needed = min(2, len(self.neighbours))
        if len(reported) < needed or needed == 0:
            return None
        return min(reported[-needed], self.rounds - 1)

    def _away_now(self) -> bool:
        return not self.present(self.me, self.round) and not self.training and not self.mixing

    def _return_round(self) -> int | None:
        return next((r for r in range(self.round, self.rounds) if self.present(self.me, r)), None)

    def _go_away(self, now: float) -> list[Action]:
        """Planned absence from this round: nothing to do until the round we come back."""
        back = self._return_round()
        if back is None:  # gone for good: our model is the one we had when we left
            self.finished = True
            return [Finish(self.start_model, meta={"rounds": self.rounds, "left_at": self.round})]
        return self._maybe_rejoin(now)

    def _after_resume(self, now: float) -> list[Action]:
        if not self.present(self.me, self.round):
            return self._go_away(now)
        actions = self._maybe_rejoin(now)
        if actions or self.mixing or self.training:  # training: caught up while listening (plain)
            return actions
        return [self._train_round()]  # nobody is far enough ahead: go on from the checkpoint

    def _maybe_rejoin(self, now: float) -> list[Action]:
        """Rejoins the federation if it is ahead of us: a site that is away and due back, or
        idle with its neighbours at least two rounds on (one round apart is normal)."""
        if self.finished or self.final is not None or self.training:
            return []
        target = self._rejoin_target()
        if target is None:
            return []
        if self.mixing:
            # Our own sum of a round the others have left: its members no longer hold models
            # for it. The mixer closes it if nothing was released, and we rejoin with our model.
            if target < self.round + 2 or not self.mixer.abandon_sum():
                return []
            return self._rejoin(target - 1, now)
        by_sum = self.mixer.rejoins_with_a_sum
        if self._away_now():
            back = self._return_round()
            if back is None or target < back - 1:
                return []
            if not by_sum or self.start_model is None:
                # Plain: the neighbours send us their models from the round we are back.
                self.round = back
                return [self._train_round()]
            # Start from a sum of the round before we are back (neighbours hold it once
            # they trained it), so that our first model is trained from the federation's.
            round = max(back - 1, target - 1, self.round)
        elif by_sum and target >= self.round + 2 and (self.own is not None or self.start_model is not None):
            round = target - 1
        else:
            return []  # plain: a site behind rejoins with the models it is sent (PlainMixer.step)
        if round == self.failed_rejoin:
            return []
        return self._rejoin(round, now)

    def _rejoin(self, round: int, now: float) -> list[Action]:
        """Moves to `round` and mixes it through a sum of our own (`Mixer.rejoin`)."""
        rejoin_from = self.round
        self.round = round
        self.mixing = True
        self.deadline = now + self.round_timeout_s
        self.rejoined += 1
        return [CHECKPOINT, *self.mixer.rejoin(rejoin_from, now)]

    def _train_round(self, meta: dict | None = None) -> Train:
        self.training = True
        meta = dict(meta or {})
        if self.round >= self.train_rounds:
            meta["head_refit_step"] = self.round - self.train_rounds + 1
        # Progress is that of the training (the learning-rate schedule): 1 in the refit rounds.
        return Train(self.round, self.start_model, progress=min(1.0, self.round / self.train_rounds), meta=meta)

    # Checkpoints: the round, the model it starts from, our run key, and the mixer's part
    # (secure: the sums joined, never joined twice, and the peers' run keys).

    def snapshot(self) -> tuple[dict, Weights]:
        model = self.start_model or {}
        mixer_state, mixer_arrays = self.mixer.snapshot()
        state = {"round": self.round, "start_model": self.start_model is not None, "rejoined": self.rejoined,
                 "rounds_trained": self.rounds_trained, "rounds_mixed": self.rounds_mixed,
                 "last_alone": self.last_alone, **mixer_state}
        arrays = {f"start/{n}": a for n, a in model.items()}
        arrays["run_key"] = np.frombuffer(self.run_key.private_bytes(), np.uint8)
        arrays.update(mixer_arrays)
        if self.outer is not None:
            arrays.update(self.outer.snapshot())
        if self.refit is not None:
            arrays.update(self.refit.snapshot())
        return state, arrays

    def restore(self, state: dict, arrays: Weights, now: float) -> None:
        self.round = state["round"]
        if state["start_model"]:
            self.start_model = {n[len("start/"):]: a for n, a in arrays.items() if n.startswith("start/")}
        self.rejoined = state["rejoined"]
        self.rounds_trained, self.rounds_mixed = state.get("rounds_trained", 0), state.get("rounds_mixed", 0)
        self.last_alone = state.get("last_alone", 0)
        self.run_key = RunKey(as_bytes(arrays["run_key"]))
        self.mixer.restore(state, arrays)
        if self.outer is not None:
            self.outer.restore(arrays, self.start_model if self.start_model is not None else self.initial)
        if self.refit is not None:
            self.refit.restore(arrays)
        self._resume_until = now + self.resume_wait_s

    @property
    def _run_shared(self) -> dict[str, bytes]:
        """This run's pairwise secrets (secure; tests/test_run_binding.py reads them here)."""
        return self.mixer._run_shared if isinstance(self.mixer, SecureMixer) else {}
