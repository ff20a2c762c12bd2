"""Secure neighbourhood sum (docs/protocols.md, Gossip averaging with secure sums): double
masking without a server.

Aggregator i learns sum_{j in S} w_ij * x_j over the members S of its group G that replied,
and nothing about any single x_j. Socket-free steps, in protocol order:

    aggregator                                   member j
    ----------                                   --------
    session = start_sum(...)
    session.request  ----- GroupRequest ----->   join(request, ...) -> (member, MaskedReply)
    session.receive(j, reply) <- MaskedReply --    (or a Refusal with its reason)
    ... until all replied or the deadline ...
    session.announce() -- Announcement ------>   member.release(announcement)
    session.finish(releases) <--- Release -----    (or a Refusal)
      -> NeighbourhoodSum, or None: keep your own model (session.failure says why)

Choices (and why):

* Who is in G: i's live topology neighbours, never i itself. i knows its own model, so
  it adds w_ii * x_i itself, to the unmasked fixed-point sum (`mix_with_own`); G needs
  >= 2 members so that even the masked sum never equals one neighbour's model.
* Threshold t: `default_threshold` = majority of |G|, floor(|G|/2) + 1.
* How many may drop: at most `max_dropped(|G|, t)` = min(|G| - t, t - 2). |G| - t so the
  survivors hold t shares of every self-mask seed. t - 2 because corrections here are per
  pair, released by the dropped member's partners (docs/protocols.md, Gossip averaging
  with secure sums), not rebuilt from shares of a key: an aggregator telling different
  members different stories needs, to unmask j, every pair (j, k) corrected and t shares
  of b_j; the members that hold shares of b_j for it are only j and the members j was
  told were dropped, so 1 + |D_j| < t keeps b_j hidden. Each member refuses an
  announcement that drops more (see the tests for the attack this stops: with |G| = 3
  and t = 2 it recovers a model if 1 drop were allowed).
  Hence groups of 2 or 3 tolerate no dropout (the round keeps its own model); 4-5
  tolerate 1, 6-7 tolerate 2, 8-9 tolerate 3, 10-11 tolerate 4.
* Sign convention: member j adds sign(j, k) * PRG(seed_jk), sign = +1 if j < k in string
  order. For a dropped d, survivor k releases sign(k, d) * PRG(seed_kd) summed over d (the
  term left in its own reply); the aggregator subtracts it.
* Weights and fixed-point settings come from the topology on every node, never from the
  aggregator's messages: an aggregator that could give one member weight 1 and the others
  2^-20, or different scales, would read that member's model out of the "sum".
* Each member joins at most one sum per (round, aggregator) (`JoinedRounds`): pairwise
  seeds are bound to the round and aggregator, not to one sum, so a second sum would let
  the aggregator combine one sum's self-mask shares with the other's corrections.
* Each member refuses: a group outside the topology neighbourhood of i or smaller than 2;
  a second, different announcement; an announcement naming itself dropped, leaving fewer
  than max(2, t) survivors or dropping more than `max_dropped`; and never releases both a
  self-mask share and a pairwise correction for the same peer in one sum.

Threat model: honest-but-curious nodes plus an aggregator that lies about dropouts or
tells members different stories. Out of scope: the aggregator colluding with members (with
t of them it rebuilds self-masks; with all survivors but one, any sum gives away the last
one's model), and members that send wrong values (they can spoil the sum, not read it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from p2p_fl.federate import masks, shares
from p2p_fl.federate.fixed_point import FixedPoint, check_capacity, decode_sum, encode, uint_dtype


class GroupRequest(NamedTuple):
    """Aggregator -> each member: who takes part in this sum, and over which slice of the
    flat model ([lo, hi); None: all of it)."""

    federation: str
    round: int
    aggregator: str
    members: tuple[str, ...]
    threshold: int
    span: tuple[int, int] | None = None


class MaskedReply(NamedTuple):
    """Member -> aggregator: the masked vector and its self-mask seed's encrypted shares.

    Attributes:
        masked: uint32/uint64 masked contribution.
        encrypted_shares: recipient -> AES-GCM encrypted share, for every other member.
        seed_commitment: `shares.seed_commitment` of the self-mask seed.
    """

    masked: np.ndarray
    encrypted_shares: dict[str, bytes]
    seed_commitment: bytes


class Announcement(NamedTuple):
    """Aggregator -> each survivor, once: who survived, and the shares addressed to it.

    Attributes:
        survivors, dropped: partition of the group (sorted).
        encrypted_shares: owner (a survivor) -> that owner's share for this recipient.
    """

    federation: str
    round: int
    aggregator: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    encrypted_shares: dict[str, bytes]


class Release(NamedTuple):
    """Survivor -> aggregator: what lets it remove the masks.

    Attributes:
        shares: survivor j -> this member's (decrypted) share of b_j.
        correction: sum over dropped d of sign(me, d) * PRG(seed_{me,d}); None if nobody dropped.
    """

    shares: dict[str, bytes]
    correction: np.ndarray | None


class Refusal(NamedTuple):
    """A step an honest member will not take, and why (for the log and the tests)."""

    reason: str


class NeighbourhoodSum(NamedTuple):
    """The outcome of a successful secure sum.

    Attributes:
        encoded: the unmasked fixed-point sum over survivors of encode(w_ij * x_j), kept in
            the integers so that `mix_with_own` adds the aggregator's own model exactly there.
        fixed_point: the encoding it is in.
        weight: sum over survivors of w_ij.
        survivors, dropped: the announced partition of the group.
    """

    encoded: np.ndarray
    fixed_point: FixedPoint
    weight: float
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    @property
    def total(self) -> np.ndarray:
        """float32 vector, sum over survivors of w_ij * x_j."""
        return decode_sum(self.encoded, self.fixed_point)


def default_threshold(group_size: int) -> int:
    """Majority of the group: floor(n / 2) + 1 shares rebuild a self-mask seed."""
    return group_size // 2 + 1


def max_dropped(group_size: int, threshold: int) -> int:
    """How many members may drop out of one sum: min(n - t, t - 2) (module docstring)."""
    return max(0, min(group_size - threshold, threshold - 2))


def shared_secrets_with(secret_key: str | bytes, public_keys: Mapping[str, str | bytes],
                        me: str) -> dict[str, bytes]:
    """X25519 secrets of `me` with every other peer of the topology (compute once, reuse).

    Args:
        secret_key: my CURVE secret key (Z85).
        public_keys: peer -> CURVE public key (Z85) from the topology.
        me: my name (skipped).

    Returns:
        peer -> 32-byte shared secret.
    """
    out = {}
    for peer, public in public_keys.items():
        if peer == me:
            continue
        try:
            out[peer] = masks.x25519_shared(secret_key, public)
        except ValueError as err:
            raise ValueError(f"public key of peer {peer!r}: {err}") from None
    return out


def isolated_sites(rows: list[Mapping[str, float]]) -> list[str]:
    """The sites whose model alone the linear combinations `rows` reveal: site j such that
    the unit vector of j lies in their row space (rank([rows; e_j]) == rank(rows)).

    Args:
        rows: coefficient maps, site -> weight of its model in one combination a site learns.
    """
    sites = sorted({s for row in rows for s in row})
    if not rows:
        return []
    matrix = np.array([[row.get(s, 0.0) for s in sites] for row in rows], np.float64)
    rank = np.linalg.matrix_rank(matrix)
    return [s for i, s in enumerate(sites)
            if np.linalg.matrix_rank(np.vstack([matrix, np.eye(len(sites))[i]])) == rank]


def _fewest_survivors(neighbours: list[str]) -> list[str]:
    n = len(neighbours)
    return neighbours[:max(1, n - max_dropped(n, default_threshold(n)))]


def round_view(graph: Mapping[str, set[str]], site: str, chunked: bool = False) -> list[list[dict[str, float]]]:
    """What `site` learns of the others' models in one secure-gossip round, as groups of rows
    for `isolated_sites`, one group per set of coordinates (no group's coordinates meet
    another's).

    Full sums (`chunked` false): the one sum it aggregates (members join one sum per round
    and aggregator, `JoinedRounds`; a site that rejoins does so through that sum), over its
    neighbours less the most an announcement may drop (`max_dropped`). Nothing else: no
    message hands a site a neighbour's model or mix.

    Chunked sums (`chunk_spans`, the complete graph): on each other site k's slice, k's mix
    as k publishes it (k's own model and k's sum over the fewest survivors), with the site's
    own model, which it knows, as a row of its own; on its own slice, its sum as above.
    Each member joins one sum per round and aggregator, and each slice has one aggregator,
    so no coordinate is in two sums of a round. Returns [] where no sum can run."""
    neighbours = sorted(graph[site])
    if not neighbours:
        return []
    views = [[{k: 1.0 for k in _fewest_survivors(neighbours)}]]
    if chunked:
        for k in neighbours:
            mix = {k: 1.0, **{j: 1.0 for j in _fewest_survivors(sorted(graph[k]))}}
            views.append([{site: 1.0}, mix])
    return views


def isolating_view(graph: Mapping[str, set[str]], chunked: bool = False) -> tuple[str, str] | None:
    """(site, other) when what `site` learns in a round would reveal `other`'s model alone
    (a cheap rank test over `round_view`); None when no site's view isolates anyone."""
    for site in sorted(graph):
        for rows in round_view(graph, site, chunked):
            isolated = [s for s in isolated_sites(rows) if s != site]
            if isolated:
                return site, isolated[0]
    return None


@dataclass(frozen=True)
class Slices:
    """Chunked sums: the slice of the flat model each site sums (`chunk_spans`), and which
    site stands in for a site that is down: the next in name order (the last site's, the
    one before it), so that a site's slice and those it stands in for are one contiguous span.

    Attributes:
        spans: site -> its slice [lo, hi).
    """

    spans: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, sites, length: int) -> Slices:
        if len(set(sites)) < 2:
            raise ValueError("chunked sums need at least 2 sites")
        return cls(chunk_spans(sites, length))

    def backup(self, site: str) -> str:
        """The site that sums `site`'s slice while `site` is down."""
        order = sorted(self.spans)
        i = order.index(site)
        return order[i + 1] if i + 1 < len(order) else order[i - 1]

    def stood_in_for(self, site: str) -> list[str]:
        """The sites whose slice `site` sums while they are down, in slice order."""
        return [k for k in sorted(self.spans) if k != site and self.backup(k) == site]

    def span(self, aggregator: str, down=()) -> tuple[int, int]:
        """`aggregator`'s slice joined with those of the sites in `down` it stands in for."""
        covered = [self.spans[aggregator]] + [self.spans[k] for k in self.stood_in_for(aggregator) if k in down]
        return min(lo for lo, _ in covered), max(hi for _, hi in covered)

    def allowed(self, aggregator: str) -> set[tuple[int, int]]:
        """Every span `aggregator` may sum (its slice, with any of those it stands in for):
        what a member joins and a mix may cover, and nothing else."""
        others = self.stood_in_for(aggregator)
        subsets = [[k for i, k in enumerate(others) if mask >> i & 1] for mask in range(1 << len(others))]
        return {self.span(aggregator, down) for down in subsets}


def chunk_spans(sites, length: int) -> dict[str, tuple[int, int]]:
    """Chunked sums: the slice [lo, hi) of the flat model each site aggregates, contiguous
    and as equal as they can be, in sorted name order: the same on every node, from the
    topology alone, so no aggregator can choose its slice (nor two the same coordinates).

    Raises:
        ValueError: fewer coordinates than sites (a slice would be empty).
    """
    sites = sorted(sites)
    if length < len(sites):
        raise ValueError(f"a flat model of {length} values cannot be cut into {len(sites)} non-empty slices")
    bounds = [length * i // len(sites) for i in range(len(sites) + 1)]
    return {site: (bounds[i], bounds[i + 1]) for i, site in enumerate(sites)}


def check_request(request: GroupRequest, *, federation: str, me: str,
                  topology: Mapping[str, set[str]], shared: Mapping[str, bytes],
                  slices: Slices | None = None) -> str | None:
    """Why an honest member refuses this group request (None: it may join), checked as the
    request arrives, before the member's own model for that round exists. `slices`: chunked
    sums' slices (None: every sum is over the whole model)."""
    if request.federation != federation:
        return f"request is for federation {request.federation!r}, I am in {federation!r}"
    if request.aggregator not in topology:
        return f"aggregator {request.aggregator!r} is not in the topology"
    allowed = {None} if slices is None else slices.allowed(request.aggregator)
    if request.span not in allowed:
        return (f"request is over the slice {request.span} of the model; {request.aggregator!r} may sum "
                f"{sorted(allowed) if slices is not None else 'the whole model'}")
    members = list(request.members)
    if len(set(members)) != len(members):
        return f"group lists a member twice: {members}"
    if me not in members:
        return f"group {members} does not include me ({me!r})"
    if request.aggregator in members:
        return f"group includes the aggregator {request.aggregator!r} itself"
    outside = sorted(set(members) - set(topology[request.aggregator]))
    if outside:
        return f"group members {outside} are not neighbours of {request.aggregator!r} in the topology"
    if len(members) < 2:
        return f"group of {len(members)} would reveal a single model; need at least 2"
    if not 2 <= request.threshold <= len(members):
        return f"threshold {request.threshold} is outside [2, {len(members)}]"
    unknown = sorted(set(members) - {me} - set(shared))
    if unknown:
        return f"no key for group members {unknown}"
    return None


@dataclass
class MemberSession:
    """One member's state in one sum (one round, one aggregator). Made by `join`."""

    request: GroupRequest
    me: str
    members: tuple[str, ...]
    length: int
    dtype: np.dtype
    pair_seeds: dict[str, bytes]
    share_keys: dict[str, bytes]
    own_share: bytes
    clipped: int
    first_announcement: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    shares_released_for: set[str] = field(default_factory=set)
    corrections_released_for: set[str] = field(default_factory=set)

    def release(self, announcement: Announcement) -> Release | Refusal:
        """Answers the aggregator's survivors/dropped announcement, or refuses with a reason.

        Args:
            announcement: as sent by the aggregator.

        Returns:
            `Release` with my shares of every survivor's self-mask seed and my correction for
            the dropped members, or a `Refusal`.
        """
        req = self.request
        if (announcement.federation, announcement.round, announcement.aggregator) != (
                req.federation, req.round, req.aggregator):
            return Refusal(f"announcement for {announcement.federation!r} round {announcement.round} "
                           f"at {announcement.aggregator!r} does not belong to this sum")
        story = (tuple(sorted(announcement.survivors)), tuple(sorted(announcement.dropped)))
        if self.first_announcement is None:
            self.first_announcement = story
        elif story != self.first_announcement:
            return Refusal(f"announcement survivors={list(story[0])} dropped={list(story[1])} "
                           f"contradicts the earlier survivors={list(self.first_announcement[0])} "
                           f"dropped={list(self.first_announcement[1])}")
        survivors, dropped = story
        reason = self._check_story(survivors, dropped)
        if reason:
            return Refusal(reason)
        received: dict[str, bytes] = {self.me: self.own_share}
        for owner in survivors:
            if owner == self.me:
                continue
            blob = announcement.encrypted_shares.get(owner)
            if blob is None:
                return Refusal(f"announcement carries no share from survivor {owner!r}")
            try:
                received[owner] = shares.decrypt_share(
                    blob, key=self.share_keys[owner], federation=req.federation, round=req.round,
                    aggregator=req.aggregator, sender=owner, recipient=self.me, members=self.members)
            except shares.ShareDecryptionError as err:
                return Refusal(str(err))
        correction = None
        if dropped:
            correction = masks.pairwise_correction(
                self.length, pair_seeds_of_dropped={d: self.pair_seeds[d] for d in dropped},
                me=self.me, dtype=self.dtype)
        # Ledger, recorded before anything leaves: never both kinds for one peer.
        self.shares_released_for.update(survivors)
        self.corrections_released_for.update(dropped)
        return Release(shares=received, correction=correction)

    def _check_story(self, survivors: tuple[str, ...], dropped: tuple[str, ...]) -> str | None:
        group = set(self.members)
        overlap = sorted(set(survivors) & set(dropped))
        if overlap:
            return f"announcement lists {overlap} as both survived and dropped"
        if set(survivors) | set(dropped) != group or len(survivors) + len(dropped) != len(group):
            return (f"announcement survivors+dropped {sorted(survivors + dropped)} "
                    f"is not the group {sorted(group)}")
        if self.me in dropped:
            return f"announcement names me ({self.me!r}) as dropped, but I replied"
        n, t = len(self.members), self.request.threshold
        if len(survivors) < max(2, t):
            return f"{len(survivors)} survivors: a sum needs at least {max(2, t)} (2 and threshold {t})"
        if len(dropped) > max_dropped(n, t):
            return (f"announcement drops {len(dropped)} of {n} members; at most {max_dropped(n, t)} can "
                    f"drop safely with threshold {t}")
        both = sorted((set(survivors) & self.corrections_released_for)
                      | (set(dropped) & self.shares_released_for))
        if both:
            return f"would release both a self-mask share and a pairwise correction for {both}"
        return None


@dataclass
class JoinedRounds:
    """The last round this node joined a sum of each aggregator: one join per round.

    Pairwise seeds depend only on (federation, round, aggregator, pair), so a second sum in
    the same round would reuse them: the aggregator could collect a member's self-mask
    shares in one sum and its partners' corrections for it in the other, and unmask it.
    Persist `last` with the node's checkpoint, written before a reply is sent, so a
    restarted node does not join the same round again.

    With chunked sums, a site's slice may also be summed by its backup (`Slices`): no
    coordinate of ours goes into two sums of one round either, or the two sums' aggregators
    (and everyone, from their published mixes) could subtract one from the other.

    Attributes:
        last: aggregator -> highest round joined.
        given: round -> the slices of our model already in a sum of that round (the
            latest two rounds: a member answers an aggregator a round behind).
    """

    last: dict[str, int] = field(default_factory=dict)
    given: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def claim(self, request: GroupRequest) -> str | None:
        """Records the request's round; returns a reason instead if it is not a new one."""
        previous = self.last.get(request.aggregator)
        if previous is not None and request.round <= previous:
            return (f"already joined round {previous} of {request.aggregator!r}; refusing round "
                    f"{request.round}: one sum per round, rounds only go forward")
        if request.span is not None:
            given = self.given.get(request.round, [])
            lo, hi = request.span
            if any(lo < g_hi and g_lo < hi for g_lo, g_hi in given):
                return (f"values in {request.span} already went into another sum of round {request.round}: "
                        "each coordinate joins one sum a round")
            newest = max([request.round, *self.given])
            if request.round < newest - 1:
                return f"round {request.round} is too far behind round {newest}, whose sums I joined"
            self.given[request.round] = given + [tuple(request.span)]
            self.given = {r: g for r, g in self.given.items() if r >= newest - 1}
        self.last[request.aggregator] = request.round
        return None


def join(request: GroupRequest, *, federation: str, me: str, topology: Mapping[str, set[str]],
         shared: Mapping[str, bytes], contribution: np.ndarray, weight: float,
         fixed_point: FixedPoint, joined: JoinedRounds,
         slices: Slices | None = None) -> tuple[MemberSession, MaskedReply] | Refusal:
    """Member side, first step: check the group, mask my weighted model, share my self-mask.

    Args:
        request: the aggregator's `GroupRequest`.
        federation: my federation id.
        me: my name.
        topology: the gossip graph (adjacency) from the topology file.
        shared: peer -> X25519 secret (`shared_secrets_with`).
        contribution: my flat float32 model x_me (all of it: the request's slice is taken here).
        weight: my mixing weight w_{aggregator, me}, from the topology (not from the request).
        fixed_point: the federation's encoding, from the topology.
        joined: this node's `JoinedRounds`; the request's round is claimed in it.
        slices: chunked sums' slices (None: every sum is over the whole model).

    Returns:
        (session, reply) to keep and to send, or a `Refusal` (also when my own model
        holds NaN or infinity: it is never encoded, and `session.clipped` counts clipping).
    """
    reason = check_request(request, federation=federation, me=me, topology=topology, shared=shared,
                           slices=slices)
    if reason:
        return Refusal(reason)
    if request.span is not None:
        lo, hi = request.span
        if not 0 <= lo < hi <= contribution.size:
            return Refusal(f"slice {request.span} is outside my model of {contribution.size} values")
        contribution = contribution[lo:hi]
    members = tuple(sorted(request.members))
    others = [k for k in members if k != me]
    context = dict(federation=request.federation, round=request.round, aggregator=request.aggregator)
    pair_seeds = {k: masks.pairwise_seed(shared[k], a=me, b=k, **context) for k in others}
    share_keys = {k: shares.share_key(shared[k], a=me, b=k, **context) for k in others}
    try:
        encoded, clipped = encode(contribution, fixed_point, weight=weight)
    except ValueError as err:
        return Refusal(f"my model cannot take part: {err}")
    reason = joined.claim(request)
    if reason:
        return Refusal(reason)
    self_seed = shares.new_self_seed()
    seed_shares = shares.split_seed(self_seed, members, request.threshold)
    masked = masks.masked_contribution(encoded, self_seed=self_seed, pair_seeds=pair_seeds, me=me)
    encrypted = {k: shares.encrypt_share(seed_shares[k], key=share_keys[k], sender=me, recipient=k,
                                         members=members, **context) for k in others}
    commitment = shares.seed_commitment(self_seed, owner=me, **context)
    session = MemberSession(request=request, me=me, members=members, length=encoded.size,
                            dtype=encoded.dtype, pair_seeds=pair_seeds, share_keys=share_keys,
                            own_share=seed_shares[me], clipped=clipped)
    return session, MaskedReply(masked=masked, encrypted_shares=encrypted, seed_commitment=commitment)


@dataclass
class AggregatorSession:
    """The aggregator's state in one sum. Made by `start_sum`."""

    request: GroupRequest
    weights: dict[str, float]
    fixed_point: FixedPoint
    length: int
    masked_total: np.ndarray
    replies: dict[str, MaskedReply] = field(default_factory=dict)
    survivors: tuple[str, ...] | None = None
    dropped: tuple[str, ...] | None = None
    failure: str | None = None

    @property
    def complete(self) -> bool:
        """Every member has replied: no need to wait for the deadline."""
        return len(self.replies) == len(self.request.members)

    def receive(self, sender: str, reply: MaskedReply) -> str | None:
        """Adds one member's masked reply to the running sum.

        Args:
            sender: the authenticated sender (the connection's CURVE identity).
            reply: its `MaskedReply`.

        Returns:
            None if accepted, else the reason it was discarded (late, unknown, malformed).
        """
        if self.survivors is not None:
            return (f"late reply from {sender!r} for round {self.request.round} discarded: "
                    "survivors already announced")
        if sender not in self.request.members:
            return f"reply from {sender!r}, who is not in the group"
        if sender in self.replies:
            return f"second reply from {sender!r} discarded"
        masked = reply.masked
        expected = uint_dtype(self.fixed_point)
        if not isinstance(masked, np.ndarray) or masked.dtype != expected or masked.shape != (self.length,):
            got = (f"{masked.dtype}{masked.shape}" if isinstance(masked, np.ndarray)
                   else type(masked).__name__)
            return f"reply from {sender!r} is {got}, expected {expected}({self.length},)"
        others = set(self.request.members) - {sender}
        if set(reply.encrypted_shares) != others:
            return (f"reply from {sender!r} carries shares for {sorted(reply.encrypted_shares)}, "
                    f"expected {sorted(others)}")
        if len(reply.seed_commitment) != 32:
            return f"reply from {sender!r} has a malformed seed commitment"
        np.add(self.masked_total, masked, out=self.masked_total)
        # The vector is in the running sum; keep only the small parts.
        self.replies[sender] = reply._replace(masked=None)
        return None

    def announce(self) -> dict[str, Announcement] | None:
        """Closes collection (at the deadline) and fixes survivors S and dropped D, once.

        Returns:
            survivor -> its `Announcement`, or None when the sum cannot go ahead (too few
            survivors or too many dropped; `failure` says which): keep your own model.
        """
        if self.survivors is not None:
            raise RuntimeError("survivors were already announced for this sum")
        members = self.request.members
        survivors = tuple(m for m in members if m in self.replies)
        dropped = tuple(m for m in members if m not in self.replies)
        self.survivors, self.dropped = survivors, dropped
        t = self.request.threshold
        if len(survivors) < max(2, t):
            self.failure = f"{len(survivors)} of {len(members)} replied; a sum needs {max(2, t)}"
            return None
        if len(dropped) > max_dropped(len(members), t):
            self.failure = (f"{len(dropped)} of {len(members)} dropped; at most "
                            f"{max_dropped(len(members), t)} can drop safely with threshold {t}")
            return None
        req = self.request
        return {k: Announcement(req.federation, req.round, req.aggregator, survivors, dropped,
                                {j: self.replies[j].encrypted_shares[k] for j in survivors if j != k})
                for k in survivors}

    def finish(self, releases: Mapping[str, Release]) -> NeighbourhoodSum | None:
        """Removes the masks and decodes the weighted sum of the survivors.

        Args:
            releases: survivor -> its `Release` (refusals and silent members left out).

        Returns:
            `NeighbourhoodSum`, or None (keep your own model; `failure` says why).
        """
        if self.survivors is None:
            raise RuntimeError("announce() before finish()")
        if self.failure:
            return None
        req = self.request
        survivors, dropped = self.survivors, self.dropped
        dtype = uint_dtype(self.fixed_point)
        valid: dict[str, Release] = {}
        for k, rel in releases.items():
            if k not in survivors:
                continue
            if (not set(rel.shares) <= set(survivors)
                    or any(len(s) != shares.SEED_BYTES for s in rel.shares.values())):
                continue
            if dropped and (not isinstance(rel.correction, np.ndarray) or rel.correction.dtype != dtype
                            or rel.correction.shape != (self.length,)):
                continue
            valid[k] = rel
        if dropped:
            # Each survivor's reply still holds its masks with the dropped: all must correct.
            silent = sorted(set(survivors) - set(valid))
            if silent:
                self.failure = f"survivors {silent} released no correction for dropped {list(dropped)}"
                return None
        seeds = []
        for j in survivors:
            held = {k: rel.shares[j] for k, rel in valid.items() if j in rel.shares}
            if len(held) < req.threshold:
                self.failure = f"{len(held)} shares of {j!r}'s self-mask seed, threshold {req.threshold}"
                return None
            seed = shares.combine_seed(held, req.members, req.threshold)
            commitment = shares.seed_commitment(seed, federation=req.federation, round=req.round,
                                                aggregator=req.aggregator, owner=j)
            if commitment != self.replies[j].seed_commitment:
                self.failure = f"self-mask seed of {j!r} rebuilt from shares does not match its commitment"
                return None
            seeds.append(seed)
        corrections = [valid[k].correction for k in survivors] if dropped else []
        encoded = masks.unmask(self.masked_total, seeds, corrections)
        return NeighbourhoodSum(encoded=encoded, fixed_point=self.fixed_point,
                                weight=float(sum(self.weights[j] for j in survivors)),
                                survivors=survivors, dropped=dropped)


def start_sum(*, federation: str, round: int, me: str, members, weights: Mapping[str, float],
              fixed_point: FixedPoint, length: int, threshold: int | None = None,
              own_weight: float = 0.0, span: tuple[int, int] | None = None) -> AggregatorSession:
    """Aggregator side, first step: opens a sum over my live neighbours.

    Args:
        federation: federation id.
        round: gossip round.
        me: my (the aggregator's) name.
        members: my live neighbours, at least 2 (with fewer, keep your own model instead).
        weights: member -> w_{me, member}, from the topology.
        fixed_point: the federation's encoding; its capacity is checked for this group.
        length: length of the flat model vector (of the slice, with `span`).
        threshold: t, default `default_threshold(len(members))`.
        own_weight: w_{me, me}, which `mix_with_own` adds to the sum in fixed point (its
            capacity is checked with the sum's).
        span: the slice [lo, hi) of the flat model this sum is over (`chunk_spans`), None: all.

    Returns:
        The session; send `session.request` to every member.

    Raises:
        ValueError: fewer than 2 members, me among them, a missing weight, or a
            fixed-point setting under which this sum could wrap.
    """
    members = tuple(sorted(members))
    if len(set(members)) != len(members):
        raise ValueError(f"member list has duplicates: {list(members)}")
    if len(members) < 2:
        raise ValueError(f"a secure sum needs at least 2 members, got {list(members)}: keep your own model")
    if me in members:
        raise ValueError(f"the aggregator {me!r} adds its own model in plain; it is not a member")
    missing = sorted(set(members) - set(weights))
    if missing:
        raise ValueError(f"no mixing weight for {missing}")
    t = default_threshold(len(members)) if threshold is None else threshold
    if not 2 <= t <= len(members):
        raise ValueError(f"threshold {t} outside [2, {len(members)}]")
    if span is not None and span[1] - span[0] != length:
        raise ValueError(f"slice {span} does not hold {length} values")
    check_capacity(fixed_point, num_contributions=len(members) + (own_weight != 0),
                   total_weight=sum(abs(weights[m]) for m in members) + abs(own_weight))
    return AggregatorSession(
        request=GroupRequest(federation, round, me, members, t, span),
        weights={m: float(weights[m]) for m in members}, fixed_point=fixed_point, length=int(length),
        masked_total=np.zeros(int(length), uint_dtype(fixed_point)))


def mix_with_own(own: np.ndarray, own_weight: float, result: NeighbourhoodSum) -> np.ndarray:
    """The gossip step: (w_ii * x_i + sum_S w_ij x_j) / (w_ii + sum_S w_ij), as float32.

    The own model joins the sum in fixed point, encoded (and clipped) as a member's would be:
    where every aggregator's row holds the same weights (the complete graph with sample-count
    weights) and saw the same survivors, every site adds the same integers and ends with the
    same model to the last bit, as plain gossip's sites do. Dividing by the weight actually
    present renormalises over the survivors.

    Raises:
        ValueError: the weights add up to nothing, or the own model holds NaN or infinity.
    """
    if not own_weight + result.weight > 0:
        raise ValueError(f"own weight {own_weight} plus survivors' weight {result.weight} must be positive")
    encoded = result.encoded
    if own_weight:
        mine, _ = encode(own, result.fixed_point, weight=own_weight)
        encoded = encoded + mine  # modulo 2^bits, as the members' encodings were added
    total = decode_sum(encoded, result.fixed_point).astype(np.float64)
    return (total / (own_weight + result.weight)).astype(np.float32)
