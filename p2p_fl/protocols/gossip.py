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

Secure (DESIGN.md, Security; the steps are federate/secure_sum.py's): each site is the
aggregator of the sum over its own live neighbours and a member of each neighbour's sum in
the same round. As aggregator it sends the group to its members once its own training is
done; a member answers once its own round-r training is done (the request waits until then)
with its masked, weighted model; at the deadline (or when all replied) the aggregator
announces survivors and dropped, the survivors release self-mask shares and corrections, and
the aggregator mixes the unmasked sum with its own model. Fewer than 2 members, or a sum that
fails, keeps the site's own model for that round. A neighbour that missed a sum is left out
of the next groups until it is heard from again (a group of 3 tolerates no dropout); so is
a survivor that released nothing.

Rounds without a central clock: a site never mixes rounds. Messages for the next round (a
neighbour ahead) wait until this site gets there; stale or far-future ones are refused.

Sites that fail, are cut off, or come and go (DESIGN.md, Fault tolerance). Heartbeats
(`on_peers`) tell who is dead: a dead neighbour is not waited for and not asked into a sum;
it is back when it speaks. A site that is behind (resumed from its checkpoint, or two rounds
behind a neighbour) catches up: it asks its neighbours for the model their current round
started from (gossip-fetch) and trains that round from it. A neighbour only serves a model
that is already a mix (plain gossip, or a secure sum that succeeded), never one site's own.
Planned absences (`away`, from the topology's [[events]]) are known to every site: an absent
site is left out of the rounds it misses, then fetches the current model when it returns,
so its weights count again from the round it arrives. `on_leave = "keep-last"` (plain only)
keeps a neighbour's last model in the mean while it is away.

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
    fixed_point_for,
    flatten,
    join,
    metropolis_hastings_weights,
    mix_with_own,
    sample_count_weights,
    start_sum,
    unflatten,
    weighted_average,
)
from p2p_fl.federate.mixing import Adjacency
from p2p_fl.federate.robust import AGGREGATIONS, robust_aggregate
from p2p_fl.net import wire
from p2p_fl.protocols.actions import Action, Finish, Send, Train, Weights


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
    """What a site needs for secure sums: the pairwise X25519 secrets and the encoding."""

    federation: str
    # Every other peer -> X25519 secret (`secure_sum.shared_secrets_with`): the members of a
    # neighbour's sum need not be our own neighbours.
    shared: dict[str, bytes]
    fixed_point: FixedPoint


@dataclass
class _Aggregation:
    """This site's own secure sum of one round."""

    session: AggregatorSession
    deadline: float
    announced: bool = False
    releases: dict[str, Release] = field(default_factory=dict)


class GossipProtocol:
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
        fetch_timeout_s: how long a site catching up waits for its neighbours' answers.
    """

    def __init__(self, me: str, graph: Adjacency, weights: dict[str, dict[str, float]], rounds: int, *,
                 round_timeout_s: float, secure: SecureSetup | None = None, aggregation: str = "mean",
                 trim: float = 0.2, away: dict[str, frozenset[int]] | None = None, on_leave: str = "forget",
                 fetch_timeout_s: float = 10.0):
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
        self.fetch_timeout_s = fetch_timeout_s
        self.round = 0  # the round being trained or mixed
        self.finished = False
        self._own: Weights | None = None  # this round's trained model, once training is done
        self._deadline = 0.0
        # Plain: round -> sender -> model; only this round and the next are kept.
        self._inbox: dict[int, dict[str, Weights]] = {}
        # Secure, as member: trained flat models by round (this round and the one before,
        # for an aggregator that is a little behind), requests waiting for our training,
        # and the sums joined, by (round, aggregator).
        self._contributions: dict[int, np.ndarray] = {}
        self._waiting_requests: dict[int, dict[str, wire.Message]] = {}
        self._joined: dict[tuple[int, str], MemberSession] = {}
        self._joined_rounds = JoinedRounds()
        self._aggregation: _Aggregation | None = None
        self._suspects: set[str] = set()  # neighbours that missed our last sum
        # Secure: after its last mix a site stays until it served its neighbours' last sums.
        self._final: Finish | None = None
        self._serve_until = 0.0
        # Failures and catching up.
        self._dead: set[str] = set()
        self._peer_rounds: dict[str, int] = {}  # the rounds neighbours' heartbeats report
        self._start_model: Weights | None = None  # the mixed model this round started from
        self._start_shareable = False  # it is a mix, so serving it reveals no single site
        self._last_models: dict[str, Weights] = {}  # plain, keep-last: each neighbour's last model
        self._fetch: dict | None = None  # an open catch-up: asked, deadline, best answer
        self._resumed = False
        self._no_wait_round = -1  # plain: the round we caught up into; its models went by already
        self.caught_up = 0
        self.checkpoint_due = False

    @property
    def progress(self) -> int:
        return self.round

    def present(self, peer: str, round: int) -> bool:
        return round not in self.away.get(peer, ())

    def _live(self, round: int) -> list[str]:
        """The neighbours expected in `round`: present by the plan and not dead."""
        return [n for n in self.neighbours if self.present(n, round) and n not in self._dead]

    def start(self, now: float) -> list[Action]:
        if not self.present(self.me, self.round):
            return self._go_away(now)
        if self._resumed:  # back from a checkpoint: the others may have gone on without us
            return self._start_fetch(self.round + 1, now)
        return [self._train_round()]

    def on_trained(self, round: int, weights: Weights, now: float) -> list[Action]:
        """Round `round` trained: offer the model to the neighbours, then wait for theirs."""
        if round < self.round or self._fetch is not None:
            return []  # we caught up past this round while it trained: its result is stale
        if round != self.round:
            raise ValueError(f"trained round {round} while at round {self.round}")
        self._own = weights
        self._deadline = now + self.round_timeout_s
        if self.secure is None:
            return [Send(n, wire.GOSSIP_MODEL, round, weights) for n in self._live(round)] + self._mix_plain(now)
        flat, _ = flatten(weights)
        self._contributions = {r: v for r, v in self._contributions.items() if r >= round - 1}
        self._contributions[round] = flat
        actions = self._start_sum(flat, now)
        for request in self._waiting_requests.pop(round, {}).values():
            actions += self._join(request)
        return actions + self._step_sum(now)

    def on_message(self, msg: wire.Message, now: float) -> list[Action]:
        """Reacts to a checked message. Raises wire.WireError for one this state refuses."""
        if msg.sender not in self.graph[self.me]:
            raise wire.WireError(f"{msg.sender} is not a neighbour of {self.me}")
        self._dead.discard(msg.sender)
        if msg.type == wire.GOSSIP_FETCH:
            return [self._current_for(msg)]
        if msg.type == wire.GOSSIP_CURRENT:
            return self._on_current(msg, now)
        if self.secure is None:
            if msg.type != wire.GOSSIP_MODEL:
                raise wire.WireError(f"unexpected {msg.type} message in plain gossip")
            self._check_round(msg, self.round, self._highest_expected() + 1)
            if msg.sender in self._inbox.get(msg.round, {}):
                raise wire.WireError(f"second model from {msg.sender} for round {msg.round}")
            self._inbox.setdefault(msg.round, {})[msg.sender] = dict(msg.tensors)
            if self.on_leave == "keep-last":
                self._last_models[msg.sender] = dict(msg.tensors)
            return self._mix_plain(now)
        self._suspects.discard(msg.sender)  # it is alive: ask it again next round
        if msg.type == wire.GOSSIP_GROUP:
            return self._on_request(msg)
        if msg.type == wire.GOSSIP_ANNOUNCE:
            return self._on_announcement(msg) + self._finish_when_served(now)
        if msg.type in (wire.GOSSIP_MASKED, wire.GOSSIP_RELEASE):
            return self._on_reply(msg, now)
        raise wire.WireError(f"unexpected {msg.type} message in secure gossip")

    def on_tick(self, now: float) -> list[Action]:
        if self._fetch is not None:
            return self._step_fetch(now)
        if self.secure is None:
            return self._mix_plain(now)
        return self._step_sum(now) + self._finish_when_served(now)

    def on_peers(self, dead: set[str], revived: set[str], progress: dict[str, int], now: float) -> list[Action]:
        """Liveness news from the heartbeats: who died, who is back, the rounds they report."""
        self._dead = (self._dead | (dead & set(self.neighbours))) - revived
        self._suspects -= revived
        self._peer_rounds.update({n: r for n, r in progress.items() if n in self.graph[self.me]})
        if self.finished or self._final is not None:
            return self._finish_when_served(now)
        if self._fetch is None and not self._away_now():
            ahead = max((r for n, r in self._peer_rounds.items() if n not in self._dead), default=-1)
            if ahead >= self.round + 2:  # fallen behind (a cut link): one round apart is normal
                return self._start_fetch(self.round + 1, now)
        if self._away_now():
            back = self._return_round()
            if back is not None and any(r >= back for r in self._peer_rounds.values()):
                return self._start_fetch(back, now)
        return []  # the node's next on_tick stops waiting for whoever just died

    # Catching up.

    def _away_now(self) -> bool:
        return self._own is None and not self.present(self.me, self.round) and self._fetch is None

    def _highest_expected(self) -> int:
        """The latest round whose models we keep: away or catching up, the round we go to."""
        ahead = [self.round]
        if self._fetch is not None:
            ahead.append(self._fetch["wanted"])
        if self._away_now():
            ahead.append(self._return_round() or self.round)
        return max(ahead)

    def _return_round(self) -> int | None:
        return next((r for r in range(self.round, self.rounds) if self.present(self.me, r)), None)

    def _go_away(self, now: float) -> list[Action]:
        """Planned absence from this round: nothing to do until the round we come back."""
        back = self._return_round()
        if back is None:  # gone for good: our model is the one we had when we left
            self.finished = True
            return [Finish(self._start_model, meta={"rounds": self.rounds, "left_at": self.round})]
        return []

    def _start_fetch(self, wanted: int, now: float) -> list[Action]:
        asked = {n for n in self.neighbours if n not in self._dead}
        self._fetch = {"wanted": wanted, "asked": asked, "deadline": now + self.fetch_timeout_s, "best": None}
        return [Send(n, wire.GOSSIP_FETCH, wanted) for n in sorted(asked)] + self._step_fetch(now)

    def _current_for(self, msg: wire.Message) -> Send:
        """Our answer to a neighbour catching up to round `msg.round` or later."""
        if self._start_model is not None and self._start_shareable and self.round >= msg.round:
            return Send(msg.sender, wire.GOSSIP_CURRENT, self.round, self._start_model, {"model": True})
        return Send(msg.sender, wire.GOSSIP_CURRENT, self.round, None, {"model": False})

    def _on_current(self, msg: wire.Message, now: float) -> list[Action]:
        fetch = self._fetch
        if fetch is None or msg.sender not in fetch["asked"]:
            raise wire.WireError(f"{msg.type} from {msg.sender}, who was not asked")
        fetch["asked"].discard(msg.sender)
        self._peer_rounds[msg.sender] = msg.round
        best = fetch["best"]
        if msg.meta["model"] and msg.round >= fetch["wanted"] and msg.round < self.rounds and (
                best is None or msg.round > best[0]):
            fetch["best"] = (msg.round, dict(msg.tensors), msg.sender)
        return self._step_fetch(now)

    def _step_fetch(self, now: float) -> list[Action]:
        fetch = self._fetch
        if fetch["asked"] and now < fetch["deadline"]:
            return []
        self._fetch = None
        if fetch["best"] is not None:
            round, model, source = fetch["best"]
            self.round, self._own, self._aggregation = round, None, None
            self._start_model, self._start_shareable = model, True
            self._inbox = {r: m for r, m in self._inbox.items() if r >= round}
            self._no_wait_round = round
            self._resumed = False
            self.caught_up += 1
            self.checkpoint_due = True
            return [self._train_round({"caught_up_from": source})]
        if not self.present(self.me, self.round):
            return []  # still away: try again when a neighbour reports a later round
        if self._resumed:  # nobody is ahead of our checkpoint: go on from it
            self._resumed = False
            return [self._train_round()]
        return []

    def _train_round(self, meta: dict | None = None) -> Train:
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

    # Plain gossip.

    def _mix_plain(self, now: float) -> list[Action]:
        if self._own is None or self.finished:
            return []
        heard = dict(self._inbox.get(self.round, {}))
        expected = self._live(self.round)
        waiting = any(n not in heard for n in expected) and self.round != self._no_wait_round
        if waiting and now < self._deadline:
            return []
        if self.on_leave == "keep-last":  # the absent and the silent count with their last model
            heard.update({n: m for n, m in self._last_models.items() if n not in heard})
        names = sorted(heard)
        models = [self._own] + [heard[n] for n in names]
        if self.aggregation == "mean":
            mean = weighted_average(models, [self.row[n] for n in [self.me, *names]])
        else:  # every model counts once: a listed sample count must not buy a majority
            mean = robust_aggregate(models, self.aggregation, self.trim)
        self._inbox.pop(self.round, None)
        return self._next_round(mean, {"members": len(self.neighbours), "survivors": len(names),
                                       "dropped": ",".join(n for n in self.neighbours if n not in heard)}, now)

    # Secure gossip, aggregator side.

    def _start_sum(self, flat: np.ndarray, now: float) -> list[Action]:
        members = [n for n in self._live(self.round) if n not in self._suspects]
        if len(members) < 2:
            self._aggregation = None
            return []  # _step_sum keeps the own model
        session = start_sum(federation=self.secure.federation, round=self.round, me=self.me, members=members,
                            weights={m: self.row[m] for m in members}, fixed_point=self.secure.fixed_point,
                            length=flat.size)
        self._aggregation = _Aggregation(session, now + self.round_timeout_s)
        meta = {"members": wire.join_names(members), "threshold": session.request.threshold}
        return [Send(m, wire.GOSSIP_GROUP, self.round, None, meta) for m in members]

    def _on_reply(self, msg: wire.Message, now: float) -> list[Action]:
        agg = self._aggregation
        if agg is None or self._own is None or msg.round != self.round:
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
        if self._own is None or self.finished:
            return []
        agg = self._aggregation
        if agg is None:
            return self._mix_secure(None, "fewer than 2 live neighbours", now)
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
        session = self._aggregation.session if self._aggregation else None
        record = {"members": len(session.request.members) if session else 0,
                  "survivors": len(session.survivors or ()) if session else 0,
                  "dropped": ",".join(session.dropped or ()) if session else "",
                  "clipped": self._clipped(), "kept_own": result is None}
        if result is None:
            record["failure"] = failure
            mixed = self._own
        else:
            flat, spec = flatten(self._own)
            mixed = unflatten(mix_with_own(flat, self.row[self.me], result), spec)
        self._aggregation = None
        return self._next_round(mixed, record, now)

    def _clipped(self) -> int:
        """Values clipped by the fixed-point encoding in the sums we joined this round."""
        return sum(s.clipped for (r, _), s in self._joined.items() if r == self.round)

    # Secure gossip, member side.

    def _on_request(self, msg: wire.Message) -> list[Action]:
        if msg.round in self._contributions:
            return self._join(msg)
        self._check_round(msg, self.round, self.round + 1)
        self._waiting_requests.setdefault(msg.round, {})[msg.sender] = msg
        return []

    def _join(self, msg: wire.Message) -> list[Action]:
        aggregator = msg.sender
        request = GroupRequest(self.secure.federation, msg.round, aggregator,
                               wire.names_field(msg.meta, "members"), msg.meta["threshold"])
        outcome = join(request, federation=self.secure.federation, me=self.me, topology=self.graph,
                       shared=self.secure.shared, contribution=self._contributions[msg.round],
                       weight=self.weights[aggregator][self.me], fixed_point=self.secure.fixed_point,
                       joined=self._joined_rounds)
        if isinstance(outcome, Refusal):
            raise wire.WireError(f"group request refused: {outcome.reason}")
        session, reply = outcome
        self.checkpoint_due = True  # the join is on disk before the reply leaves (JoinedRounds)
        self._joined = {k: s for k, s in self._joined.items() if k[0] >= self.round - 1}
        self._joined[(msg.round, aggregator)] = session
        others = sorted(reply.encrypted_shares)
        tensors = {"masked": reply.masked, "commitment": np.frombuffer(reply.seed_commitment, np.uint8),
                   **{wire.SHARE_PREFIX + k: np.frombuffer(reply.encrypted_shares[k], np.uint8) for k in others}}
        return [Send(aggregator, wire.GOSSIP_MASKED, msg.round, tensors, {"share_for": wire.join_names(others)})]

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

    def _next_round(self, mixed: Weights, record: dict, now: float) -> list[Action]:
        mixed = {name: mixed[name] for name in self._own}  # the model's order, as the wire expects
        record = {"mixed_round": self.round, **record}
        self._own = None
        self._start_model = mixed
        # A mix of at least two models reveals no single site; a kept own model would.
        self._start_shareable = self.secure is None or not record.get("kept_own", False)
        self.checkpoint_due = True
        if self.round + 1 >= self.rounds:
            self._final = Finish(mixed, meta={"rounds": self.rounds, "caught_up": self.caught_up, **record})
            if self.secure is None:
                self.finished = True
                return [self._final]
            self._serve_until = now + 2 * self.round_timeout_s
            return self._finish_when_served(now)
        self.round += 1
        if not self.present(self.me, self.round):
            return self._go_away(now)
        return [self._train_round(record)]

    # Checkpoints: the round, the model it starts from, and the sums joined (never join twice).

    def snapshot(self) -> tuple[dict, Weights]:
        model = self._start_model or {}
        state = {"round": self.round, "start_model": self._start_model is not None,
                 "shareable": self._start_shareable, "joined": dict(self._joined_rounds.last),
                 "caught_up": self.caught_up}
        return state, {f"start/{n}": a for n, a in model.items()}

    def restore(self, state: dict, arrays: Weights, now: float) -> None:
        self.round = state["round"]
        if state["start_model"]:
            self._start_model = {n[len("start/"):]: a for n, a in arrays.items() if n.startswith("start/")}
        self._start_shareable = state["shareable"]
        self._joined_rounds.last = {k: int(v) for k, v in state["joined"].items()}
        self.caught_up = state["caught_up"]
        self._resumed = True


def _bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, np.uint8).tobytes()
