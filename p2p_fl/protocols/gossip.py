"""Gossip averaging: every round each site trains, then averages with its graph neighbours.

Round r at site i: train locally, then replace the model by the weighted mean over itself
and the neighbours heard in time (i's mixing row, renormalised over who was heard), and
train round r + 1 from it. After the last round the mixed model is the site's final model;
every site ends with its own.

Mixing weights come from the topology only (`mixing_weights`): on the complete graph with
sample counts listed, FedAvg's sample-count weights; otherwise Metropolis-Hastings weights.
No site can claim a bigger share in its messages.

Plain (`secure = False`): each site sends its trained model to every neighbour and mixes
what arrived by the round deadline.

Secure (docs/protocols.md; the steps are federate/secure_sum.py's): each site is the
aggregator of the sum over its own live neighbours and a member of each neighbour's sum in
the same round. As aggregator it sends the group to its members once its own training is
done; a member checks the request when it arrives and answers once its own round-r training
is done with its masked, weighted model; at the deadline (or when all replied) the
aggregator announces survivors and dropped, the survivors release self-mask shares and
corrections, and the aggregator mixes the unmasked sum with its own model. Fewer than 2
members, or a sum that fails, keeps the site's own model for that round. A neighbour that
missed a sum is left out of the next groups until it is heard from again (a group of 3
tolerates no dropout); so is a survivor that released nothing. Every pairwise secret is
bound to this run: each site draws a run key at start (`RunKey`, in its checkpoint) and
sends it to every peer (gossip-hello); a member only joins sums whose members' run keys it
holds, and a peer's run key never changes within a run.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from p2p_fl.federate import (
    AggregatorSession,
    Announcement,
    FixedPoint,
    GroupRequest,
    JoinedRounds,
    MaskedReply,
    MemberSession,
    Refusal,
    Release,
    RunKey,
    check_request,
    fixed_point_for,
    flatten,
    join,
    metropolis_hastings_weights,
    mix_with_own,
    run_pair_secret,
    sample_count_weights,
    start_sum,
    unflatten,
    weighted_average,
)
from p2p_fl.federate.mixing import Adjacency
from p2p_fl.federate.robust import AGGREGATIONS, robust_aggregate
from p2p_fl.net import wire
from p2p_fl.protocols.actions import CHECKPOINT, Action, Finish, Refuse, Send, Train, Weights
from p2p_fl.protocols.base import Protocol


def mixing_weights(graph: Adjacency, samples: dict[str, int]) -> dict[str, dict[str, float]]:
    """Every site's mixing row: sample-count (FedAvg) weights on the complete graph when
    counts are listed, Metropolis-Hastings weights otherwise."""
    complete = all(len(nbrs) == len(graph) - 1 for nbrs in graph.values())
    if complete and samples:
        return sample_count_weights(graph, samples)
    return metropolis_hastings_weights(graph)


def secure_fixed_point(graph: Adjacency, clip: float) -> FixedPoint:
    """The federation's encoding: the finest uint32 scale at which no neighbourhood sum wraps
    (mixing weights of one sum add up to at most 1)."""
    return fixed_point_for(clip=clip, num_contributions=max(len(n) for n in graph.values()), total_weight=1.0)


@dataclass(frozen=True)
class SecureSetup:
    """What a site needs for secure sums: the long-term pairwise X25519 secrets and the encoding."""

    federation: str
    # Every other peer -> X25519 secret of the long-term keys (`secure_sum.shared_secrets_with`):
    # the members of a neighbour's sum need not be our own neighbours. Mixed with the run
    # keys (`run_pair_secret`) before any seed is derived.
    shared: dict[str, bytes]
    fixed_point: FixedPoint


_NO_SUM = object()  # `_sum_to_open` when no sum of ours waits to be opened


@dataclass
class _Aggregation:
    """This site's own secure sum of one round (a regular one, or one to rejoin)."""

    session: AggregatorSession
    deadline: float
    announced: bool = False
    releases: dict[str, Release] = field(default_factory=dict)
    rejoin_from: int | None = None  # the round we were at when this sum was opened to rejoin


class GossipProtocol(Protocol):
    """One site's view of a gossip run.

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
    """

    def __init__(self, me: str, graph: Adjacency, weights: dict[str, dict[str, float]], rounds: int, *,
                 round_timeout_s: float, secure: SecureSetup | None = None, aggregation: str = "mean",
                 trim: float = 0.2, away: dict[str, frozenset[int]] | None = None, on_leave: str = "forget",
                 resume_wait_s: float = 3.0, hello_interval_s: float = 1.0, run_key: RunKey | None = None):
        if me not in graph:
            raise ValueError(f"{me!r} is not a node of the gossip graph")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.me = me
        self.graph = graph
        self.neighbours = sorted(graph[me])
        self.weights = weights
        self.row = weights[me]
        self.rounds = rounds
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
        self.round = 0  # the round being trained or mixed
        self.finished = False
        self._training = False  # a Train of self.round is out and not yet back
        self._mixing = False  # this round's mix is under way (own model trained, or a rejoin)
        self._own: Weights | None = None  # this round's trained model, once training is done
        self._deadline = 0.0
        # Plain: round -> sender -> model: this round, the next, and each sender's latest
        # model for a later round (what a site that is behind rejoins with).
        self._inbox: dict[int, dict[str, Weights]] = {}
        # Secure, as member: trained flat models by round (this round and the one before,
        # for an aggregator that is a little behind), requests waiting for our training,
        # and the sums joined, by (round, aggregator).
        self._contributions: dict[int, np.ndarray] = {}
        self._waiting_requests: dict[int, dict[str, wire.Message]] = {}
        self._joined: dict[tuple[int, str], MemberSession] = {}
        self._joined_rounds = JoinedRounds()
        self._aggregation: _Aggregation | None = None
        self._sum_to_open: object = _NO_SUM  # mixing, sum not opened yet: None, or the round we rejoin from
        self._suspects: set[str] = set()  # neighbours that missed our last sum
        # Secure: after its last mix a site stays until it served its neighbours' last sums.
        self._final: Finish | None = None
        self._serve_until = 0.0
        # Run keys: ours, the peers' (as first received: they never change within a run),
        # and the pairwise secrets for this run.
        self.run_key = run_key or RunKey()
        self._peer_run_keys: dict[str, bytes] = {}
        self._run_shared: dict[str, bytes] = {}
        self.hello_interval_s = hello_interval_s
        self._hello_due: dict[str, tuple[float, float]] = {}  # peer -> (next hello, wait after it)
        # Failures and rejoining.
        self._dead: set[str] = set()
        self._peer_rounds: dict[str, int] = {}  # the rounds neighbours' heartbeats report
        self._start_model: Weights | None = None  # the model this round started from
        self._last_models: dict[str, Weights] = {}  # plain, keep-last: each neighbour's last model
        self._resume_until: float | None = None  # resumed: listen to the heartbeats until then
        self._failed_rejoin = -1  # the round of our last rejoining sum that failed: not retried
        self.rejoined = 0

    @property
    def progress(self) -> int:
        return self.round

    def present(self, peer: str, round: int) -> bool:
        return round not in self.away.get(peer, ())

    def _live(self, round: int) -> list[str]:
        """The neighbours expected in `round`: present by the plan and not dead."""
        return [n for n in self.neighbours if self.present(n, round) and n not in self._dead]

    def start(self, now: float) -> list[Action]:
        hellos = self._hellos(now)
        if self._resume_until is not None:  # back from a checkpoint: first hear where the others are
            self._resume_until = now + self.resume_wait_s
            return hellos
        if self.secure is not None:
            hellos = [CHECKPOINT, *hellos]  # the run key is on disk before it leaves
        if not self.present(self.me, self.round):
            return hellos + self._go_away(now)
        return hellos + [self._train_round()]

    def on_trained(self, round: int, weights: Weights, now: float) -> list[Action]:
        """Round `round` trained: offer the model to the neighbours, then wait for theirs."""
        if round != self.round or not self._training:
            raise ValueError(f"trained round {round} while at round {self.round}")
        self._training = False
        self._own = weights
        self._mixing = True
        self._deadline = now + self.round_timeout_s
        # The learner's state after this training (its key, the DP steps taken) is on disk
        # before the model leaves: a restart never trains again with the same noise, and
        # the privacy this release spent stays counted.
        actions: list[Action] = [CHECKPOINT]
        if self.secure is None:
            return actions + [Send(n, wire.GOSSIP_MODEL, round, weights) for n in self._live(round)] + self._mix_plain(now)
        flat, _ = flatten(weights)
        self._contributions = {r: v for r, v in self._contributions.items() if r >= round - 1}
        self._contributions[round] = flat
        for request in self._waiting_requests.pop(round, {}).values():
            actions += self._join(request)
        target = self._rejoin_target()
        if target is not None and target >= round + 2:  # the others are past this round's sums
            return actions + self._rejoin(target - 1, now)
        self._sum_to_open = None
        return actions + self._step_sum(now)

    def on_message(self, msg: wire.Message, now: float) -> list[Action]:
        """Reacts to a checked message. Raises wire.WireError for one this state refuses."""
        if msg.type == wire.GOSSIP_HELLO:
            return self._on_hello(msg, now)
        if msg.sender not in self.graph[self.me]:
            raise wire.WireError(f"{msg.sender} is not a neighbour of {self.me}")
        self._dead.discard(msg.sender)
        if self.secure is None:
            if msg.type != wire.GOSSIP_MODEL:
                raise wire.WireError(f"unexpected {msg.type} message in plain gossip")
            return self._on_model(msg, now)
        self._suspects.discard(msg.sender)  # it is alive: ask it again next round
        if msg.type == wire.GOSSIP_GROUP:
            return self._on_request(msg)
        if msg.type == wire.GOSSIP_ANNOUNCE:
            return self._on_announcement(msg) + self._finish_when_served(now)
        if msg.type in (wire.GOSSIP_MASKED, wire.GOSSIP_RELEASE):
            return self._on_reply(msg, now)
        raise wire.WireError(f"unexpected {msg.type} message in secure gossip")

    def on_tick(self, now: float) -> list[Action]:
        actions = self._hellos(now)
        if self._resume_until is not None:
            if now < self._resume_until:
                return actions
            self._resume_until = None
            return actions + self._after_resume(now)
        if self.secure is None:
            return actions + self._mix_plain(now)
        return actions + self._step_sum(now) + self._finish_when_served(now)

    def on_peers(self, dead: set[str], revived: set[str], progress: dict[str, int], now: float) -> list[Action]:
        """Liveness news from the heartbeats: who died, who is back, the rounds they report."""
        self._dead = (self._dead | (dead & set(self.neighbours))) - revived
        self._suspects -= revived
        self._peer_rounds.update({n: r for n, r in progress.items() if n in self.graph[self.me]})
        if self.finished or self._final is not None:
            return self._finish_when_served(now)
        if self._resume_until is not None:
            return []
        return self._maybe_rejoin(now)  # the next on_tick stops waiting for whoever just died

    # Run keys.

    def _hellos(self, now: float) -> list[Action]:
        """Our run key, and a request for theirs, to every peer whose run key we lack; again
        after 1, 2, 4 ... 16 hello intervals while it stays silent (it may be down)."""
        if self.secure is None:
            return []
        tensors = {"run_key": np.frombuffer(self.run_key.public, np.uint8)}
        actions: list[Action] = []
        for peer in sorted(set(self.secure.shared) - set(self._peer_run_keys)):
            due, wait = self._hello_due.get(peer, (0.0, self.hello_interval_s))
            if now >= due:
                self._hello_due[peer] = (now + wait, min(2 * wait, 16 * self.hello_interval_s))
                actions.append(Send(peer, wire.GOSSIP_HELLO, 0, tensors, {"have": False}))
        return actions

    def _on_hello(self, msg: wire.Message, now: float) -> list[Action]:
        if self.secure is None or msg.sender not in self.secure.shared:
            raise wire.WireError(f"{msg.type} from {msg.sender}, who has no key of ours to share")
        key = _bytes(msg.tensors["run_key"])
        known = self._peer_run_keys.get(msg.sender)
        actions: list[Action] = []
        if known is None:
            try:
                secret = run_pair_secret(self.secure.shared[msg.sender], self.run_key, key)
            except ValueError as err:
                raise wire.WireError(f"run key of {msg.sender}: {err}") from None
            self._peer_run_keys[msg.sender] = key
            self._run_shared[msg.sender] = secret
            actions.append(CHECKPOINT)
        elif known != key:
            # A second key in one run would let masks of the two keys be combined; a peer
            # that lost its checkpoint takes no part in sums until the next run.
            raise wire.WireError(f"{msg.sender} sent a different run key; its first one stands for this run")
        if not msg.meta["have"]:
            tensors = {"run_key": np.frombuffer(self.run_key.public, np.uint8)}
            actions.append(Send(msg.sender, wire.GOSSIP_HELLO, 0, tensors, {"have": True}))
        return actions + self._step_sum(now)  # a sum may have waited for this key

    # Falling behind and rejoining.

    def _rejoin_target(self) -> int | None:
        """The round the federation is at, by the heartbeats of our live neighbours: the
        second-highest round they report (the only one, for a site with one neighbour), so
        that no single neighbour's claim can move us."""
        reported = sorted(r for n, r in self._peer_rounds.items() if n not in self._dead)
        needed = min(2, len(self.neighbours))
        if len(reported) < needed or needed == 0:
            return None
        return min(reported[-needed], self.rounds - 1)

    def _away_now(self) -> bool:
        return not self.present(self.me, self.round) and not self._training and not self._mixing

    def _return_round(self) -> int | None:
        return next((r for r in range(self.round, self.rounds) if self.present(self.me, r)), None)

    def _go_away(self, now: float) -> list[Action]:
        """Planned absence from this round: nothing to do until the round we come back."""
        back = self._return_round()
        if back is None:  # gone for good: our model is the one we had when we left
            self.finished = True
            return [Finish(self._start_model, meta={"rounds": self.rounds, "left_at": self.round})]
        return self._maybe_rejoin(now)

    def _after_resume(self, now: float) -> list[Action]:
        if not self.present(self.me, self.round):
            return self._go_away(now)
        actions = self._maybe_rejoin(now)
        if actions or self._mixing:
            return actions
        return [self._train_round()]  # nobody is far enough ahead: go on from the checkpoint

    def _maybe_rejoin(self, now: float) -> list[Action]:
        """Rejoins the federation if it is ahead of us: a site that is away and due back, or
        idle with its neighbours at least two rounds on (one round apart is normal)."""
        if self.finished or self._final is not None or self._training:
            return []
        target = self._rejoin_target()
        if target is None:
            return []
        agg = self._aggregation
        if self._mixing:
            # Our own sum of a round the others have left: its members no longer hold models
            # for it. Close it unannounced (nothing was released) and rejoin with our model.
            if (self.secure is None or agg is None or agg.announced or agg.rejoin_from is not None
                    or target < self.round + 2):
                return []
            self._aggregation = None
            return self._rejoin(target - 1, now)
        if self._away_now():
            back = self._return_round()
            if back is None or target < back - 1:
                return []
            if self.secure is None or self._start_model is None:
                # Plain: the neighbours send us their models from the round we are back.
                self.round = back
                return [self._train_round()]
            # Start from a sum of the round before we are back (neighbours hold it once
            # they trained it), so that our first model is trained from the federation's.
            round = max(back - 1, target - 1, self.round)
        elif self.secure is not None and target >= self.round + 2 and (
                self._own is not None or self._start_model is not None):
            round = target - 1
        else:
            return []  # plain: a site behind rejoins with the models it is sent (_mix_plain)
        if round == self._failed_rejoin:
            return []
        return self._rejoin(round, now)

    def _rejoin(self, round: int, now: float) -> list[Action]:
        """Secure: moves to `round` and mixes it through a sum of our own (a plain site rejoins
        with the models it is sent, `_mix_plain`)."""
        rejoin_from = self.round
        self.round = round
        self._waiting_requests = {r: q for r, q in self._waiting_requests.items() if r >= round}
        self._mixing = True
        self._deadline = now + self.round_timeout_s
        self.rejoined += 1
        self._sum_to_open = rejoin_from
        return [CHECKPOINT, *self._step_sum(now)]

    # Plain gossip.

    def _on_model(self, msg: wire.Message, now: float) -> list[Action]:
        self._check_round(msg, self.round, self.rounds - 1)
        if msg.sender in self._inbox.get(msg.round, {}):
            raise wire.WireError(f"second model from {msg.sender} for round {msg.round}")
        # Beyond the next round keep only each sender's latest model: memory stays bounded
        # whatever a neighbour sends, and a site that is behind rejoins with the latest.
        if msg.round > self.round + 1:
            for r in [r for r, models in self._inbox.items() if r > self.round + 1 and msg.sender in models]:
                if r > msg.round:
                    return []
                del self._inbox[r][msg.sender]
        self._inbox.setdefault(msg.round, {})[msg.sender] = dict(msg.tensors)
        if self.on_leave == "keep-last":
            self._last_models[msg.sender] = dict(msg.tensors)
        return self._mix_plain(now)

    def _plain_rejoin_round(self) -> int | None:
        """The latest round, two or more ahead of ours, for which two neighbours (one, for a
        site with a single neighbour) sent models: the federation is there."""
        needed = min(2, len(self.neighbours))
        ahead = [r for r, models in self._inbox.items() if r >= self.round + 2 and len(models) >= needed]
        return max(ahead, default=None)

    def _mix_plain(self, now: float) -> list[Action]:
        if self.finished or self._training:
            return []
        far = self._plain_rejoin_round()
        if far is not None:
            # The federation is at `far`: train it from our latest model (the one we trained,
            # if any: never thrown away), send it, and mix it with the models already here.
            if self._own is not None:
                self._start_model = {n: self._own[n] for n in self._own}
            rejoin_from, self.round, self._own, self._mixing = self.round, far, None, False
            self._inbox = {r: m for r, m in self._inbox.items() if r >= far}
            self.rejoined += 1
            return [CHECKPOINT, self._train_round({"rejoined_from": rejoin_from})]
        if not self._mixing:
            return []
        heard = dict(self._inbox.get(self.round, {}))
        expected = self._live(self.round)
        waiting = any(n not in heard for n in expected)
        if waiting and now < self._deadline:
            return []
        if self.on_leave == "keep-last":  # the absent and the silent count with their last model
            heard.update({n: m for n, m in self._last_models.items() if n not in heard})
        names = sorted(heard)
        own = self._own if self._own is not None else self._start_model
        if own is None and not names:
            return []
        models = ([own] if own is not None else []) + [heard[n] for n in names]
        rows = ([self.me] if own is not None else []) + names
        if self.aggregation == "mean":
            mean = weighted_average(models, [self.row[n] for n in rows])
        else:  # every model counts once: a listed sample count must not buy a majority
            mean = robust_aggregate(models, self.aggregation, self.trim)
        self._inbox = {r: m for r, m in self._inbox.items() if r > self.round}
        return self._next_round(mean, {"members": len(self.neighbours), "survivors": len(names),
                                       "dropped": ",".join(n for n in self.neighbours if n not in heard)}, now)

    # Secure gossip, aggregator side.

    def _start_sum(self, now: float, rejoin_from: int | None) -> list[Action] | None:
        """Opens our sum of this round over the live neighbours, once we hold all their run
        keys (or half the round's time went by: then over those whose keys we hold).
        Returns None while it waits for keys; [] when too few members: keep the own model."""
        candidates = [n for n in self._live(self.round) if n not in self._suspects]
        members = [n for n in candidates if n in self._run_shared]
        if len(members) < len(candidates) and now < self._deadline - self.round_timeout_s / 2:
            return None
        self._sum_to_open = _NO_SUM
        if len(members) < 2:
            self._aggregation = None
            return []  # _step_sum keeps the own model
        length = flatten(self._own if self._own is not None else self._start_model)[0].size
        session = start_sum(federation=self.secure.federation, round=self.round, me=self.me, members=members,
                            weights={m: self.row[m] for m in members}, fixed_point=self.secure.fixed_point,
                            length=length)
        self._aggregation = _Aggregation(session, now + self.round_timeout_s, rejoin_from=rejoin_from)
        meta = {"members": wire.join_names(members), "threshold": session.request.threshold}
        return [Send(m, wire.GOSSIP_GROUP, self.round, None, meta) for m in members]

    def _on_reply(self, msg: wire.Message, now: float) -> list[Action]:
        agg = self._aggregation
        if agg is None or not self._mixing or msg.round != self.round:
            raise wire.WireError(f"{msg.type} for round {msg.round}, no sum of ours is open for it")
        if msg.type == wire.GOSSIP_MASKED:
            group = set(agg.session.request.members)
            if set(wire.names_field(msg.meta, "share_for")) != group - {msg.sender}:
                raise wire.WireError(f"masked reply from {msg.sender} was made for another group")
            shares = {k: _bytes(msg.tensors[wire.SHARE_PREFIX + k]) for k in group - {msg.sender}}
            reason = agg.session.receive(msg.sender, MaskedReply(
                msg.tensors["masked"], shares, _bytes(msg.tensors["commitment"])))
        else:
            reason = self._take_release(agg, msg)
        if reason:
            raise wire.WireError(reason)
        return self._step_sum(now)

    def _take_release(self, agg: _Aggregation, msg: wire.Message) -> str | None:
        if not agg.announced or agg.session.survivors is None or msg.sender not in agg.session.survivors:
            return f"release from {msg.sender}, who is not an announced survivor"
        if msg.sender in agg.releases:
            return f"second release from {msg.sender}"
        shares = {k: _bytes(msg.tensors[wire.SHARE_PREFIX + k]) for k in wire.names_field(msg.meta, "shares_of")}
        correction = np.array(msg.tensors["correction"]) if msg.meta["correction"] else None
        agg.releases[msg.sender] = Release(shares, correction)
        return None

    def _step_sum(self, now: float) -> list[Action]:
        """Moves our own sum on: announce when all replied or at the deadline, finish when
        all survivors released or at the next deadline; then mix and go to the next round."""
        if not self._mixing or self.finished:
            return []
        if self._sum_to_open is not _NO_SUM:
            opened = self._start_sum(now, self._sum_to_open)
            if opened is None:
                return []
            if self._aggregation is not None:
                return opened
        agg = self._aggregation
        if agg is None:
            return self._mix_secure(None, "fewer than 2 live neighbours with run keys", now)
        session = agg.session
        if not agg.announced:
            outstanding = set(session.request.members) - set(session.replies) - self._dead
            if outstanding and now < agg.deadline:
                return []
            agg.announced = True
            agg.deadline = now + self.round_timeout_s
            self._suspects |= set(session.request.members) - set(session.replies)
            announcements = session.announce()
            if announcements is None:
                return self._mix_secure(None, session.failure, now)
            return [self._announcement(k, a) for k, a in announcements.items()]
        if len(agg.releases) < len(session.survivors) and now < agg.deadline:
            return []
        result = session.finish(agg.releases)
        self._suspects |= set(session.survivors) - set(agg.releases)
        return self._mix_secure(result, session.failure, now)

    def _announcement(self, to: str, a: Announcement) -> Send:
        owners = sorted(a.encrypted_shares)
        meta = {"survivors": wire.join_names(a.survivors), "dropped": wire.join_names(a.dropped),
                "shares_from": wire.join_names(owners)}
        tensors = {wire.SHARE_PREFIX + k: np.frombuffer(a.encrypted_shares[k], np.uint8) for k in owners}
        return Send(to, wire.GOSSIP_ANNOUNCE, a.round, tensors, meta)

    def _mix_secure(self, result, failure: str | None, now: float) -> list[Action]:
        agg = self._aggregation
        session = agg.session if agg else None
        record = {"members": len(session.request.members) if session else 0,
                  "survivors": len(session.survivors or ()) if session else 0,
                  "dropped": ",".join(session.dropped or ()) if session else "",
                  "clipped": self._clipped(), "kept_own": result is None}
        if agg is not None and agg.rejoin_from is not None:
            record["rejoined_from"] = agg.rejoin_from
        own = self._own if self._own is not None else self._start_model
        if result is None:
            record["failure"] = failure
            mixed = own
            if self._own is None:
                self._failed_rejoin = self.round
        elif self._own is None:  # rejoining with nothing trained: the neighbours' mean alone
            flat, spec = flatten(own)
            mixed = unflatten(mix_with_own(flat, 0.0, result), spec)
        else:
            flat, spec = flatten(self._own)
            mixed = unflatten(mix_with_own(flat, self.row[self.me], result), spec)
        self._aggregation = None
        return self._next_round(mixed, record, now)

    def _clipped(self) -> int:
        """Values clipped by the fixed-point encoding in the sums we joined this round."""
        return sum(s.clipped for (r, _), s in self._joined.items() if r == self.round)

    # Secure gossip, member side.

    def _request(self, msg: wire.Message) -> GroupRequest:
        return GroupRequest(self.secure.federation, msg.round, msg.sender,
                            wire.names_field(msg.meta, "members"), msg.meta["threshold"])

    def _on_request(self, msg: wire.Message) -> list[Action]:
        """Checks a group request as it arrives; answers it now if our model for its round
        is trained, keeps it until then if that round is ours or the next."""
        if msg.round in self._contributions:
            return self._join(msg, raise_refusal=True)
        self._check_round(msg, self.round, self.round + 1)
        reason = check_request(self._request(msg), federation=self.secure.federation, me=self.me,
                               topology=self.graph, shared=self._run_shared)
        if reason:
            raise wire.WireError(f"group request refused: {reason}")
        self._waiting_requests.setdefault(msg.round, {})[msg.sender] = msg
        return []

    def _join(self, msg: wire.Message, raise_refusal: bool = False) -> list[Action]:
        aggregator = msg.sender
        outcome = join(self._request(msg), federation=self.secure.federation, me=self.me, topology=self.graph,
                       shared=self._run_shared, contribution=self._contributions[msg.round],
                       weight=self.weights[aggregator][self.me], fixed_point=self.secure.fixed_point,
                       joined=self._joined_rounds)
        if isinstance(outcome, Refusal):
            reason = f"group request of {aggregator} for round {msg.round} refused: {outcome.reason}"
            if raise_refusal:
                raise wire.WireError(reason)
            return [Refuse(reason)]
        session, reply = outcome
        self._joined = {k: s for k, s in self._joined.items() if k[0] >= self.round - 1}
        self._joined[(msg.round, aggregator)] = session
        others = sorted(reply.encrypted_shares)
        tensors = {"masked": reply.masked, "commitment": np.frombuffer(reply.seed_commitment, np.uint8),
                   **{wire.SHARE_PREFIX + k: np.frombuffer(reply.encrypted_shares[k], np.uint8) for k in others}}
        # The join is on disk before the reply leaves (JoinedRounds: never join twice).
        return [CHECKPOINT, Send(aggregator, wire.GOSSIP_MASKED, msg.round, tensors, {"share_for": wire.join_names(others)})]

    def _on_announcement(self, msg: wire.Message) -> list[Action]:
        session = self._joined.get((msg.round, msg.sender))
        if session is None:
            raise wire.WireError(f"announcement for round {msg.round} of a sum we did not join")
        owners = wire.names_field(msg.meta, "shares_from")
        announcement = Announcement(
            self.secure.federation, msg.round, msg.sender, wire.names_field(msg.meta, "survivors"),
            wire.names_field(msg.meta, "dropped"),
            {k: _bytes(msg.tensors[wire.SHARE_PREFIX + k]) for k in owners})
        outcome = session.release(announcement)
        if isinstance(outcome, Refusal):
            raise wire.WireError(f"announcement refused: {outcome.reason}")
        owners = sorted(outcome.shares)
        tensors = {wire.SHARE_PREFIX + k: np.frombuffer(outcome.shares[k], np.uint8) for k in owners}
        if outcome.correction is not None:
            tensors["correction"] = outcome.correction
        meta = {"shares_of": wire.join_names(owners), "correction": outcome.correction is not None}
        return [Send(msg.sender, wire.GOSSIP_RELEASE, msg.round, tensors, meta)]

    # Both.

    def _check_round(self, msg: wire.Message, lowest: int, highest: int) -> None:
        if self.finished or not lowest <= msg.round <= highest:
            raise wire.WireError(f"{msg.type} for round {msg.round} while at round {self.round}")

    def _train_round(self, meta: dict | None = None) -> Train:
        self._training = True
        return Train(self.round, self._start_model, progress=self.round / self.rounds, meta=meta or {})

    def _finish_when_served(self, now: float) -> list[Action]:
        """The final model, once every live neighbour's last sum got our release (or the
        time to serve them ran out): leaving earlier would make their sums fail."""
        if self._final is None or self.finished:
            return []

        def served(neighbour: str) -> bool:
            session = self._joined.get((self.rounds - 1, neighbour))
            return session is not None and session.first_announcement is not None

        waiting = [n for n in self._live(self.rounds - 1) if n not in self._suspects and not served(n)]
        if waiting and now < self._serve_until:
            return []
        self.finished = True
        return [self._final]

    def _next_round(self, mixed: Weights, record: dict, now: float) -> list[Action]:
        order = self._own if self._own is not None else (self._start_model or mixed)
        mixed = {name: mixed[name] for name in order}  # the model's order, as the wire expects
        record = {"mixed_round": self.round, **record}
        self._own = None
        self._mixing = False
        self._start_model = mixed
        if self.round + 1 >= self.rounds:
            self._final = Finish(mixed, meta={"rounds": self.rounds, "rejoined": self.rejoined, **record})
            if self.secure is None:
                self.finished = True
                return [CHECKPOINT, self._final]
            self._serve_until = now + 2 * self.round_timeout_s
            return [CHECKPOINT, *self._finish_when_served(now)]
        self.round += 1
        self._waiting_requests = {r: q for r, q in self._waiting_requests.items() if r >= self.round}
        if not self.present(self.me, self.round):
            return [CHECKPOINT, *self._go_away(now)]
        return [CHECKPOINT, self._train_round(record)]

    # Checkpoints: the round, the model it starts from, the sums joined (never join twice)
    # and the run keys (a restarted node stays in its run).

    def snapshot(self) -> tuple[dict, Weights]:
        model = self._start_model or {}
        state = {"round": self.round, "start_model": self._start_model is not None,
                 "joined": dict(self._joined_rounds.last), "rejoined": self.rejoined,
                 "peer_run_keys": sorted(self._peer_run_keys)}
        arrays = {f"start/{n}": a for n, a in model.items()}
        arrays["run_key"] = np.frombuffer(self.run_key.private_bytes(), np.uint8)
        arrays.update({f"peer_run_key/{p}": np.frombuffer(k, np.uint8) for p, k in self._peer_run_keys.items()})
        return state, arrays

    def restore(self, state: dict, arrays: Weights, now: float) -> None:
        self.round = state["round"]
        if state["start_model"]:
            self._start_model = {n[len("start/"):]: a for n, a in arrays.items() if n.startswith("start/")}
        self._joined_rounds.last = {k: int(v) for k, v in state["joined"].items()}
        self.rejoined = state["rejoined"]
        self.run_key = RunKey(_bytes(arrays["run_key"]))
        for peer in state["peer_run_keys"]:
            key = _bytes(arrays[f"peer_run_key/{peer}"])
            self._peer_run_keys[peer] = key
            if self.secure is not None and peer in self.secure.shared:
                self._run_shared[peer] = run_pair_secret(self.secure.shared[peer], self.run_key, key)
        self._resume_until = now + self.resume_wait_s


def _bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, np.uint8).tobytes()
