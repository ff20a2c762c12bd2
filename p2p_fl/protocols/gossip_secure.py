"""Secure gossip's mixer (docs/protocols.md; the steps are federate/secure_sum.py's).

Each site is the aggregator of the sum over its own live neighbours and a member of each
neighbour's sum in the same round. As aggregator it sends the group to its members once its
own training is done; a member checks the request when it arrives and answers once its own
round-r training is done with its masked, weighted model; at the deadline (or when all
replied) the aggregator announces survivors and dropped, the survivors release self-mask
shares and corrections, and the aggregator mixes the unmasked sum with its own model. Fewer
than 2 members, or a sum that fails, keeps the site's own model for that round. With chunked
sums (`SecureSetup.slices`, the complete graph) each sum is over the aggregator's slice of
the model only, and the slices of the sites it stands in for that are down: it sends its mix
of that span to every live neighbour (gossip-chunk) and takes theirs, until all came or the
round's time ran out; a slice that came from nobody keeps the round's start values, and a
neighbour whose mix did not come is not waited for again until one comes. A neighbour
that missed a sum is left out of the next groups until it is heard from again; so is a
survivor that released nothing (a group of 3 tolerates no dropout).

Every pairwise secret is bound to this run: each site draws a run key at start (the
skeleton's `run_key`, in its checkpoint) and sends it to every peer (gossip-hello); a member
only joins sums whose members' run keys it holds, and a peer's run key never changes within
a run. A site behind rejoins through a sum of its own (`rejoin`). After its last mix a site
stays until it served its neighbours' last sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from p2p_fl.federate import (
    AggregatorSession,
    Announcement,
    GroupRequest,
    JoinedRounds,
    MemberSession,
    Refusal,
    Release,
    check_request,
    flatten,
    join,
    mix_with_own,
    run_pair_secret,
    start_sum,
    unflatten,
)
from p2p_fl.net import wire
from p2p_fl.protocols import gossip_messages as messages
from p2p_fl.protocols.actions import CHECKPOINT, Action, Refuse, Send, Weights
from p2p_fl.protocols.gossip_mixer import Mixer

_NO_SUM = object()  # `_sum_to_open` when no sum of ours waits to be opened


@dataclass
class _Aggregation:
    """This site's own secure sum of one round (a regular one, or one to rejoin)."""

    session: AggregatorSession
    deadline: float
    announced: bool = False
    releases: dict[str, Release] = field(default_factory=dict)
    rejoin_from: int | None = None  # the round we were at when this sum was opened to rejoin
    extended: bool = False  # the reply deadline was moved on once for members still catching up
    member_behind: bool = False  # an outstanding member's heartbeats said it was a round behind


@dataclass
class _Collection:
    """Chunked sums: our model for the round with our own slice mixed, while the
    neighbours' mixes of theirs come in (`SecureMixer._chunks`)."""

    deadline: float
    flat: np.ndarray
    spec: list
    record: dict
    mixed: tuple[int, int] | None  # the span our own sum mixed in `flat` (None: it failed)


class SecureMixer(Mixer):
    rejoins_with_a_sum = True

    def __init__(self, site):
        super().__init__(site)
        self.setup = site.secure
        # As member: trained flat models by round (this round and the one before, for an
        # aggregator that is a little behind), requests waiting for our training, and the
        # sums joined, by (round, aggregator).
        self._contributions: dict[int, np.ndarray] = {}
        self._waiting_requests: dict[int, dict[str, GroupRequest]] = {}
        self._joined: dict[tuple[int, str], MemberSession] = {}
        self._joined_rounds = JoinedRounds()
        # As aggregator.
        self._aggregation: _Aggregation | None = None
        self._sum_to_open: object = _NO_SUM  # mixing, sum not opened yet: None, or the round we rejoin from
        self._suspects: set[str] = set()  # neighbours that missed our last sum
        self._serve_until = 0.0  # after the last mix: how long we wait to serve the neighbours' sums
        # Chunked sums: the neighbours' mixes of their slices by round, ours while they come
        # in, and the neighbours whose slice missed the last deadline (not waited for again
        # until one comes).
        self._chunks: dict[int, dict[str, tuple[tuple[int, int], np.ndarray]]] = {}
        self._collection: _Collection | None = None
        self._chunk_silent: set[str] = set()
        # Our last two published mixes: round -> (span, values, the neighbours it went to). A
        # neighbour that asks us to join a sum of such a round rejoins it: it gets the mix.
        self._published: dict[int, tuple[tuple[int, int], np.ndarray, set[str]]] = {}
        self._asked: dict[int, set[str]] = {}  # round -> the neighbours that asked us to join a sum of it
        # Run keys: the peers' (as first received: they never change within a run), the
        # pairwise secrets for this run, and peer -> (next hello, wait after it).
        self._peer_run_keys: dict[str, bytes] = {}
        self._run_shared: dict[str, bytes] = {}
        self._hello_due: dict[str, tuple[float, float]] = {}

    # The skeleton's calls.

    def start(self, now: float, resumed: bool) -> list[Action]:
        hellos = self._hellos(now)
        return hellos if resumed else [CHECKPOINT, *hellos]  # the run key is on disk before it leaves

    def tick(self, now: float) -> list[Action]:
        return self._hellos(now)

    def on_message(self, msg: wire.Message, now: float) -> list[Action]:
        if msg.type == wire.GOSSIP_HELLO:
            return self._on_hello(msg, now)
        self._suspects.discard(msg.sender)  # it is alive: ask it again next round
        if msg.type == wire.GOSSIP_GROUP:
            if abs(msg.round - self.site.round) <= 1:  # the rounds a mix of ours can be for
                self._asked = {r: a for r, a in self._asked.items() if r >= self.site.round - 1}
                self._asked.setdefault(msg.round, set()).add(msg.sender)
            resend = self._resend_mix(msg)
            if not resend:
                return self._on_request(msg)
            try:  # the mix, and our answer to the sum (a refusal, if we gave that slice already)
                return resend + self._on_request(msg)
            except wire.WireError as err:
                return resend + [Refuse(str(err))]
        if msg.type == wire.GOSSIP_ANNOUNCE:
            return self._on_announcement(msg) + self._finish_when_served(now)
        if msg.type in (wire.GOSSIP_MASKED, wire.GOSSIP_RELEASE):
            return self._on_reply(msg, now)
        if msg.type == wire.GOSSIP_CHUNK:
            return self._on_chunk(msg, now)
        raise wire.WireError(f"unexpected {msg.type} message in secure gossip")

    def trained(self, weights: Weights) -> list[Action]:
        """Answers the requests that waited for this training; our own sum opens in `step`."""
        round = self.site.round
        flat, _ = flatten(weights)
        self._contributions = {r: v for r, v in self._contributions.items() if r >= round - 1}
        self._contributions[round] = flat
        self._waiting_requests = {r: q for r, q in self._waiting_requests.items() if r >= round}
        actions: list[Action] = []
        for request in self._waiting_requests.pop(round, {}).values():
            actions += self._join(request)
        self._sum_to_open = None
        return actions

    def step(self, now: float) -> list[Action]:
        return self._step_sum(now) + self._finish_when_served(now)

    def revived(self, peers: set[str]) -> None:
        self._suspects -= peers

    def rejoin(self, rejoin_from: int, now: float) -> list[Action]:
        self._waiting_requests = {r: q for r, q in self._waiting_requests.items() if r >= self.site.round}
        self._collection = None  # a round the federation left
        self._sum_to_open = rejoin_from
        return self._step_sum(now)

    def abandon_sum(self) -> bool:
        # Its members no longer hold models for a round the others have left. Closed
        # unannounced, nothing was released; a rejoining sum is never abandoned. Waiting for
        # the neighbours' mixes (chunked sums: ours went out already) is abandoned too.
        if self._collection is not None:
            self._collection = None
            return True
        agg = self._aggregation
        if agg is None or agg.announced or agg.rejoin_from is not None:
            return False
        self._aggregation = None
        return True

    def finish(self, now: float) -> list[Action]:
        self._serve_until = now + 2 * self.site.round_timeout_s
        return self._finish_when_served(now)

    def snapshot(self) -> tuple[dict, Weights]:
        """The sums joined and the slices given to them (never join twice, never give a
        value twice) and the peers' run keys (a restarted node stays in its run)."""
        state = {"joined": dict(self._joined_rounds.last), "peer_run_keys": sorted(self._peer_run_keys),
                 "given": {str(r): [list(g) for g in spans] for r, spans in self._joined_rounds.given.items()}}
        arrays = {f"peer_run_key/{p}": np.frombuffer(k, np.uint8) for p, k in self._peer_run_keys.items()}
        return state, arrays

    def restore(self, state: dict, arrays: Weights) -> None:
        self._joined_rounds.last = {k: int(v) for k, v in state["joined"].items()}
        self._joined_rounds.given = {int(r): [(int(lo), int(hi)) for lo, hi in spans]
                                     for r, spans in state.get("given", {}).items()}
        for peer in state["peer_run_keys"]:
            key = messages.as_bytes(arrays[f"peer_run_key/{peer}"])
            self._peer_run_keys[peer] = key
            if peer in self.setup.shared:
                self._run_shared[peer] = run_pair_secret(self.setup.shared[peer], self.site.run_key, key)

    # Run keys.

    def _hellos(self, now: float) -> list[Action]:
        """Our run key, and a request for theirs, to every peer whose run key we lack; again
        after 1, 2, 4 ... 16 hello intervals while it stays silent (it may be down)."""
        interval = self.site.hello_interval_s
        actions: list[Action] = []
        for peer in sorted(set(self.setup.shared) - set(self._peer_run_keys)):
            due, wait = self._hello_due.get(peer, (0.0, interval))
            if now >= due:
                self._hello_due[peer] = (now + wait, min(2 * wait, 16 * interval))
                actions.append(messages.hello(peer, self.site.run_key.public, have=False))
        return actions

    def _on_hello(self, msg: wire.Message, now: float) -> list[Action]:
        if msg.sender not in self.setup.shared:
            raise wire.WireError(f"{msg.type} from {msg.sender}, who has no key of ours to share")
        hello = messages.parse_hello(msg)
        known = self._peer_run_keys.get(msg.sender)
        actions: list[Action] = []
        if known is None:
            try:
                secret = run_pair_secret(self.setup.shared[msg.sender], self.site.run_key, hello.run_key)
            except ValueError as err:
                raise wire.WireError(f"run key of {msg.sender}: {err}") from None
            self._peer_run_keys[msg.sender] = hello.run_key
            self._run_shared[msg.sender] = secret
            actions.append(CHECKPOINT)
        elif known != hello.run_key:
            # A second key in one run would let masks of the two keys be combined; a peer
            # that lost its checkpoint takes no part in sums until the next run.
            raise wire.WireError(f"{msg.sender} sent a different run key; its first one stands for this run")
        if not hello.have:
            actions.append(messages.hello(msg.sender, self.site.run_key.public, have=True))
        return actions + self._step_sum(now)  # a sum may have waited for this key

    # Our own sum, as aggregator.

    def _start_sum(self, now: float, rejoin_from: int | None) -> list[Action] | None:
        """Opens our sum of this round over the live neighbours, once we hold all their run
        keys (or half the round's time went by: then over those whose keys we hold).
        Returns None while it waits for keys, or for dead neighbours while too few are live
        (until the round's deadline); [] when too few members: keep the own model."""
        site = self.site
        candidates = [n for n in site.live(site.round) if n not in self._suspects and not site.far_behind(n)]
        members = [n for n in candidates if n in self._run_shared]
        if len(members) < len(candidates) and now < site.deadline - site.round_timeout_s / 2:
            return None
        if len(members) < 2 and site.may_wait_for_the_dead(now):
            return None  # a neighbour down for a moment may be back before the deadline
        self._sum_to_open = _NO_SUM
        if len(members) < 2:
            self._aggregation = None
            return []  # _step_sum keeps the own model
        span = None
        if self.setup.slices is not None:  # our slice, and those of the sites we stand in for that are down
            span = self.setup.slices.span(site.me, down=set(site.neighbours) - set(site.live(site.round)))
        length = (span[1] - span[0] if span is not None
                  else flatten(site.own if site.own is not None else site.start_model)[0].size)
        session = start_sum(federation=self.setup.federation, round=site.round, me=site.me, members=members,
                            weights={m: site.row[m] for m in members}, fixed_point=self.setup.fixed_point,
                            length=length, own_weight=site.row[site.me], span=span)
        self._aggregation = _Aggregation(session, now + site.round_timeout_s, rejoin_from=rejoin_from)
        return [messages.group(m, session.request) for m in members]

    def _on_reply(self, msg: wire.Message, now: float) -> list[Action]:
        agg = self._aggregation
        if agg is None or not self.site.mixing or msg.round != self.site.round:
            raise wire.WireError(f"{msg.type} for round {msg.round}, no sum of ours is open for it")
        if msg.type == wire.GOSSIP_MASKED:
            request = agg.session.request
            reason = agg.session.receive(msg.sender, messages.parse_masked(msg, request.members, request.span))
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
        agg.releases[msg.sender] = messages.parse_release(msg, agg.session.request.span)
        return None

    def _step_sum(self, now: float) -> list[Action]:
        """Moves our own sum on: announce when all replied or at the deadline, finish when
        all survivors released or at the next deadline; then mix and go to the next round."""
        site = self.site
        if not site.mixing or site.finished:
            return []
        if self._collection is not None:
            return self._step_collection(now)
        if self._sum_to_open is not _NO_SUM:
            opened = self._start_sum(now, self._sum_to_open)
            if opened is None:
                return []
            if self._aggregation is not None:
                return opened
        agg = self._aggregation
        if agg is None:
            return self._mix(None, "fewer than 2 live neighbours with run keys", now)
        session = agg.session
        if (self.setup.slices is not None and not agg.announced and agg.rejoin_from is not None
                and not self._slice_sources(including_mine=True)[0]):
            # Rejoining a round whose every slice came in the neighbours' published mixes:
            # our own sum (its members may have given our slice to our backup) adds nothing.
            return self._mix(None, "rejoined from the round's published mixes", now)
        if not agg.announced:
            outstanding = set(session.request.members) - set(session.replies) - site.dead
            # Remembered, not judged at the deadline alone: a member that reached our round
            # just before it is still training then (found by test_fault_tolerance on CI).
            agg.member_behind = agg.member_behind or bool(outstanding) and site.catching_up(outstanding)
            if outstanding and now < agg.deadline:
                return []
            if outstanding and not agg.extended and agg.member_behind:
                # A live member a round behind (it waited for a site we did not) answers when
                # it gets here: once, the sum waits one more round time for it rather than
                # leave us a round ahead and, at the last round, alone.
                agg.extended = True
                agg.deadline = now + site.round_timeout_s
                return []
            agg.announced = True
            agg.deadline = now + site.round_timeout_s
            self._suspects |= set(session.request.members) - set(session.replies)
            announcements = session.announce()
            if announcements is None:
                return self._mix(None, session.failure, now)
            return [self._announcement(k, a) for k, a in announcements.items()]
        if len(agg.releases) < len(session.survivors) and now < agg.deadline:
            return []
        result = session.finish(agg.releases)
        self._suspects |= set(session.survivors) - set(agg.releases)
        return self._mix(result, session.failure, now)

    def _announcement(self, to: str, a: Announcement) -> Send:
        return messages.announce(to, a)

    def _mix(self, result, failure: str | None, now: float) -> list[Action]:
        """Mixes our own model with the unmasked sum (`result`; None: the sum failed, we keep
        our model) and hands the round's mix and its record to the skeleton."""
        site = self.site
        agg = self._aggregation
        session = agg.session if agg else None
        record = {"members": len(session.request.members) if session else 0,
                  "survivors": len(session.survivors or ()) if session else 0,
                  "dropped": ",".join(session.dropped or ()) if session else "",
                  "clipped": self._clipped()}
        if agg is not None and agg.rejoin_from is not None:
            record["rejoined_from"] = agg.rejoin_from
        own = site.own if site.own is not None else site.start_model
        flat, spec = flatten(own)
        span = session.request.span if session is not None else None
        lo, hi = span if span is not None else (0, flat.size)
        if result is not None:
            # Rejoining with nothing trained: the neighbours' mean alone.
            own_weight = site.row[site.me] if site.own is not None else 0.0
            try:
                flat[lo:hi] = mix_with_own(flat[lo:hi], own_weight, result)
            except ValueError as err:  # our own model diverged: it joins no sum, ours included
                result, failure = None, f"my model cannot take part: {err}"
        record["kept_own"] = result is None
        if result is None:
            record["failure"] = failure
            if site.own is None:  # a rejoining sum failed: the skeleton does not retry this round
                site.failed_rejoin = site.round
        self._aggregation = None
        if self.setup.slices is None:
            return site.next_round(own if result is None else unflatten(flat, spec), record, now)
        # Chunked: our span's mix to every live neighbour, then theirs.
        sends = []
        if result is not None:
            # The live neighbours, and any that asked us to join a sum of this round (one
            # that rejoins it may not be live to us yet).
            to = sorted(set(site.live(site.round)) | self._asked.get(site.round, set()))
            self._published = {r: p for r, p in self._published.items() if r >= site.round - 1}
            self._published[site.round] = (span, flat[lo:hi].copy(), set(to))
            sends = [messages.chunk(n, site.round, span, flat[lo:hi]) for n in to]
        # A slice no mix will bring keeps the values the round started from (the federation's
        # last mix, the same at every site): the sites stay identical, that slice does not move.
        start = site.start_model if site.start_model is not None else site.initial
        if start is not None and site.own is not None:
            base = flatten({name: start[name] for name in own})[0]
            if result is not None:
                base[lo:hi] = flat[lo:hi]
            flat = base
        self._collection = _Collection(now + site.round_timeout_s, flat, spec, record,
                                       mixed=span if result is not None else None)
        return sends + self._step_collection(now)

    # Chunked sums: the neighbours' slices.

    def _resend_mix(self, request: wire.Message) -> list[Action]:
        """Our published mix of the round a neighbour we did not send it to asks us to sum
        (it rejoins that round: the members may have given its slice to its backup); sent
        once. The mix went to every live neighbour already: nothing new is revealed."""
        if request.round not in self._published:
            return []
        span, mix, sent_to = self._published[request.round]
        if request.sender in sent_to:
            return []
        sent_to.add(request.sender)
        return [messages.chunk(request.sender, request.round, span, mix)]

    def _allowed(self, aggregator: str) -> set:
        """The slices `aggregator` may sum: {None} (the whole model) without chunked sums."""
        slices = self.setup.slices
        return {None} if slices is None else slices.allowed(aggregator)

    def _on_chunk(self, msg: wire.Message, now: float) -> list[Action]:
        """A neighbour's mix of its slice (and of those it stands in for): kept for its round
        (ours, or the next while we are behind); one per neighbour and round, finite and
        within the encoding's range (an honest mix is)."""
        site = self.site
        if self.setup.slices is None:
            raise wire.WireError(f"{msg.type} from {msg.sender}, but this federation's sums are not chunked")
        span, mix = messages.parse_chunk(msg, self._allowed(msg.sender))
        if msg.round < site.round or (msg.round == site.round and not site.mixing and not site.training):
            return []  # a round we mixed already: too late to matter, not a fault
        self.check_round(msg, site.round, site.rounds - 1)
        if not np.all(np.isfinite(mix)) or np.max(np.abs(mix), initial=0.0) > self.setup.fixed_point.clip:
            raise wire.WireError(f"{msg.type} from {msg.sender} holds values no mix can take "
                                 f"(non-finite, or beyond +-{self.setup.fixed_point.clip:g})")
        if msg.sender in self._chunks.get(msg.round, {}):
            raise wire.WireError(f"second {msg.type} from {msg.sender} for round {msg.round}")
        # Rounds ahead of ours: kept for a rejoin, the latest two of them (a site behind
        # rejoins at the latest; two, so a neighbour cannot fill our memory with mixes of
        # made-up rounds). Checked last: a refused mix changes nothing.
        ahead = sorted(r for r in self._chunks if r > site.round)
        if msg.round > site.round and msg.round not in self._chunks and len(ahead) >= 2:
            if msg.round < ahead[0]:
                raise wire.WireError(f"{msg.type} for round {msg.round}: mixes of rounds {ahead} are kept, later ones")
            del self._chunks[ahead[0]]
        self._chunks.setdefault(msg.round, {})[msg.sender] = (span, mix)
        self._chunk_silent.discard(msg.sender)
        return self._step_sum(now)

    def _step_collection(self, now: float) -> list[Action]:
        """Puts the round's model together once every expected neighbour's slice came, or at
        the deadline with what came (a missing slice keeps the round's start values), and moves on."""
        site, collection = self.site, self._collection
        heard = self._chunks.get(site.round, {})
        expected = [n for n in site.live(site.round) if n not in self._suspects and n not in self._chunk_silent]
        if any(n not in heard for n in expected) and now < collection.deadline:
            return []
        missing, stood_in = self._slice_sources(collection.flat, collection.mixed)
        self._chunk_silent = set(site.neighbours) - set(heard)
        record = {**collection.record, "chunks_heard": len(heard), "chunks_missing": ",".join(sorted(missing)),
                  "chunks_stood_in": ",".join(sorted(stood_in))}
        self._collection = None
        self._chunks = {r: c for r, c in self._chunks.items() if r > site.round}
        return site.next_round(unflatten(collection.flat, collection.spec), record, now)

    def _slice_sources(self, flat: np.ndarray | None = None, mine: tuple[int, int] | None = None,
                       including_mine: bool = False) -> tuple[list[str], list[str]]:
        """(missing, stood in): the sites whose slice of this round no mix covers (ours only
        if `including_mine`), and those whose slice came from their backup's mix. Each slice
        is taken from its own site's mix, else from its backup's (which stands in for it), the
        same choice at every site that heard the same; with `flat`, written into it. `mine`:
        the span our own sum mixed, already in `flat` (None: none)."""
        site, slices, missing, stood_in = self.site, self.setup.slices, [], []
        heard = self._chunks.get(site.round, {})
        for owner, (lo, hi) in slices.spans.items():
            source = None
            for candidate in (owner, slices.backup(owner)):
                if candidate == site.me:
                    if mine is not None and mine[0] <= lo and hi <= mine[1]:
                        source = candidate
                        break
                elif candidate in heard and heard[candidate][0][0] <= lo and hi <= heard[candidate][0][1]:
                    if flat is not None:
                        start = heard[candidate][0][0]
                        flat[lo:hi] = heard[candidate][1][lo - start:hi - start]
                    source = candidate
                    break
            if source is None:
                if owner != site.me or including_mine:
                    missing.append(owner)
            elif source != owner:
                stood_in.append(owner)
        return missing, stood_in

    def _clipped(self) -> int:
        """Values clipped by the fixed-point encoding in the sums we joined this round."""
        return sum(s.clipped for (r, _), s in self._joined.items() if r == self.site.round)

    # The neighbours' sums, as member.

    def _on_request(self, msg: wire.Message) -> list[Action]:
        """Checks a group request as it arrives; answers it now if our model for its round
        is trained, keeps it until then if that round is ours or the next."""
        if msg.round in self._contributions:
            return self._join(messages.parse_group(msg, self.setup.federation), raise_refusal=True)
        self.check_round(msg, self.site.round, self.site.round + 1)
        request = messages.parse_group(msg, self.setup.federation)
        reason = check_request(request, federation=self.setup.federation, me=self.site.me,
                               topology=self.site.graph, shared=self._run_shared, slices=self.setup.slices)
        if reason:
            raise wire.WireError(f"group request refused: {reason}")
        self._waiting_requests.setdefault(msg.round, {})[msg.sender] = request
        return []

    def _join(self, request: GroupRequest, raise_refusal: bool = False) -> list[Action]:
        site = self.site
        aggregator = request.aggregator
        outcome = join(request, federation=self.setup.federation, me=site.me, topology=site.graph,
                       shared=self._run_shared, contribution=self._contributions[request.round],
                       weight=site.weights[aggregator][site.me], fixed_point=self.setup.fixed_point,
                       joined=self._joined_rounds, slices=self.setup.slices)
        if isinstance(outcome, Refusal):
            reason = f"group request of {aggregator} for round {request.round} refused: {outcome.reason}"
            if raise_refusal:
                raise wire.WireError(reason)
            return [Refuse(reason)]
        session, reply = outcome
        self._joined = {k: s for k, s in self._joined.items() if k[0] >= site.round - 1}
        self._joined[(request.round, aggregator)] = session
        # The join is on disk before the reply leaves (JoinedRounds: never join twice).
        return [CHECKPOINT, messages.masked(aggregator, request.round, reply, request.span)]

    def _on_announcement(self, msg: wire.Message) -> list[Action]:
        session = self._joined.get((msg.round, msg.sender))
        if session is None:
            raise wire.WireError(f"announcement for round {msg.round} of a sum we did not join")
        outcome = session.release(messages.parse_announce(msg, self.setup.federation))
        if isinstance(outcome, Refusal):
            raise wire.WireError(f"announcement refused: {outcome.reason}")
        return [messages.release(msg.sender, msg.round, outcome, session.request.span)]

    # The end.

    def _finish_when_served(self, now: float) -> list[Action]:
        """The final model, once every live neighbour's last sum got our release (or the
        time to serve them ran out): leaving earlier would make their sums fail."""
        site = self.site
        if site.final is None or site.finished:
            return []

        def served(neighbour: str) -> bool:
            session = self._joined.get((site.rounds - 1, neighbour))
            return session is not None and session.first_announcement is not None

        waiting = [n for n in site.live(site.rounds - 1) if n not in self._suspects and not served(n)]
        if waiting and now < self._serve_until:
            return []
        return site.end()
