"""Topology files: one TOML file describes one federation, read by every node and by launch.

A wrong file is refused at start-up with one line naming the field (`ConfigError`).
Protocols are chosen from a fixed table, never by importing names found in a config.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from p2p_fl.data import parse_partition
from p2p_fl.federate import isolating_view, mixing, robust
from p2p_fl.net.keys import is_public_key

PROTOCOLS = ("swt", "cwt", "gossip", "local", "ensemble")
RING_PROTOCOLS = ("swt", "cwt")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
RING_ORDERS = ("listed", "shuffle")
RING_FINALS = ("last", "average-last-cycle")
GOSSIP_GRAPHS = ("complete", "ring", "regular:K", "edges")
GOSSIP_AGGREGATIONS = robust.AGGREGATIONS
OUTER_OPTIMIZERS = ("avg", "momentum", "adam")  # learn/outer.py

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ADDRESS = re.compile(r"^tcp://[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$|^ipc://.+$|^inproc://.+$")


class ConfigError(ValueError):
    """A topology file that cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class TrainingConfig:
    model: str = "small-cnn"
    rounds: int = 5  # ring cycles (cwt), or rounds of local training (local)
    local_epochs: int = 1
    # A round (a ring hop) trains at least this many optimizer steps: a site whose
    # local_epochs are fewer steps (a small shard: 100 images are one batch of 64) trains
    # as many whole epochs as reach it. Each site counts its own steps, so a federation of
    # small clinics adapts without anyone tuning epochs to it (docs/results.md: 300 images
    # over 3 sites, gossip-3 went from 0.757 to 0.946 test AUC, ring-3 from 0.913 to 0.954;
    # 10 sites with 25 to 1,400 images each, no change). 0: local_epochs as given.
    min_local_steps: int = 16
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    # Cosine decay over the whole run (all hops of a ring): late hops move the model
    # less, so the last sites of a skewed ring cannot drag it to their labels.
    lr_schedule: str = "cosine"
    augment: bool = True
    # FedProx: each fit adds (prox_mu / 2) * ||w - w_start||^2 to the local loss, w_start
    # being the model that arrived, so skewed sites drift less from it. 0: plain training.
    prox_mu: float = 0.0
    # FedBN: BatchNorm scale, bias and running statistics stay at each site, never sent.
    fedbn: bool = False
    # Logit adjustment: training adds the log-odds of the site's own shard's labels to its
    # logits, so a site's class mix does not pull the shared model towards its base rate
    # (predictions use the raw logit: probabilities as for equally common classes). On 10
    # label-skewed sites +0.002 test AUC for FedAvgM and +0.006 for CWT on every seed; on
    # IID sites no change (docs/results.md). Under DP the counts are released with noise
    # first, at a share of the site's target epsilon (privacy.LABEL_PRIOR_SHARE), so the
    # accounting covers them; with a noise multiplier and no target it is off
    # (`logit_adjustment_applies`).
    logit_adjustment: bool = True
    # false: a site's optimizer restarts (fresh Adam moments / SGD momentum) on every model
    # that arrives, shaped by other sites. true: its state carries over from its own last
    # fit. With DP-SGD keep it: a site's 1 to 10 noisy steps per round never build up SGD
    # momentum, which is what averages the noise out (docs/results.md, DP recipe).
    keep_optimizer_state: bool = False
    # After the run, each site fine-tunes a copy of its final model this many epochs on its
    # own training data (fresh optimizer, the base learning rate) and reports the copy's AUC
    # on its own test split: personalized_test_auc, beside the shared model's local_test_auc.
    # The copy is never saved nor sent. Not under DP (it would spend privacy) nor for an
    # ensemble. 0: no fine-tune (the default: in one process, `--engine inproc`, each
    # site's fine-tune compiles a program of its own shard's shape).
    personalize_epochs: int = 0


@dataclass(frozen=True)
class RingConfig:
    order: str = "shuffle"  # "listed": the peers' order every cycle; "shuffle": seeded per cycle
    final: str = "average-last-cycle"  # or "last": the model as the last site left it


@dataclass(frozen=True)
class GossipConfig:
    graph: str = "complete"  # complete | ring | regular:K (random, seeded) | edges
    edges: list = field(default_factory=list)  # [["a", "b"], ...] with graph = "edges"
    graph_seed: int = 0  # draws the regular:K graph
    # Masked sums of the neighbourhood (docs/protocols.md, Gossip averaging with secure sums);
    # false: plain averaging.
    secure: bool = True
    # Secure sums on the complete graph as a reduce-scatter: each site sums one slice of the
    # model over all the others and sends its mix of that slice to each of them, so a site
    # sends about twice its model a round instead of once per neighbour, and the sites end
    # with the same model to the last bit (docs/protocols.md, "Chunked sums"). No effect on
    # other graphs (each site's neighbourhood is its own) nor on plain gossip (`chunked_sums`).
    chunked: bool = True
    round_timeout_s: float = 120.0  # after its own training, a site waits this long for its neighbours
    # Secure sums encode weights in fixed point in uint32; values beyond +-clip are clipped
    # (and counted). The scale is the finest at which no neighbourhood sum can wrap.
    clip: float = 16.0
    # Training samples per peer, for FedAvg weights on the complete graph (launch fills it
    # in from its shards). Taken from the file, never from a peer's messages, so no site can
    # claim a bigger share. Empty: Metropolis-Hastings weights (equal on the complete graph).
    samples: dict = field(default_factory=dict)
    # A site away (an [[events]] leave, or silent past network.peer_timeout_s): "forget" its
    # weights (the mean is over who is there), or "keep-last": its last model stays in the
    # mean (plain gossip only: with masked sums nobody holds it).
    on_leave: str = "forget"
    # Plain gossip only: "mean" (mixing weights), or "median" / "trimmed-mean" coordinate
    # by coordinate over the site's own and its neighbours' models, so that one poisoning
    # neighbour cannot drag the model (federate/robust.py). Secure sums hide every model.
    aggregation: str = "mean"
    trim: float = 0.2  # trimmed-mean: fraction of the models cut at each end, per coordinate
    # After each round's mix: "avg" adopts the average (FedAvg); "momentum" (FedAvgM) or
    # "adam" (FedAdam) take a step of that optimizer over rounds along start - average, the
    # same step at every site (learn/outer.py). Post-processing: no privacy cost under DP.
    outer_optimizer: str = "avg"
    outer_learning_rate: float = 1.0
    outer_momentum: float = 0.9  # Nesterov momentum; Adam's b1
    # After the last training round, this many rounds refit the head alone: each site sends
    # the head's gradient and Hessian on its own images instead of a model, and every site
    # takes the same Newton step on the round's average (learn/head_refit.py). 0: none.
    head_refit_steps: int = 0


@dataclass(frozen=True)
class EnsembleConfig:
    # After its own training a site waits this long for the other sites' final models,
    # then predicts with those it has (local training times differ with the shard sizes).
    wait_s: float = 600.0


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "builtin:pneumoniamnist"  # what launch partitions (a node with --data reads its own)
    partition: str = "iid"  # iid | dirichlet:ALPHA | quantity:ALPHA
    # launch and centralized only: keep this many of the dataset's training images (drawn
    # class by class, seeded; val cut by the same ratio, test whole) for small-data studies. 0: all.
    train_images: int = 0
    # A test set every site also reports on (the headline), e.g. the test split of `dataset`;
    # "": each site's own test split is its headline. Never a default: a shared test set from
    # another source than a site's data scores a model of one dataset on another.
    test: str = ""
    # With `test`: the models that start this many of the last trainings (a ring's last hops)
    # are scored on it too; with the final model they give the swing over the last
    # score_last_rounds + 1 rounds (result.json, experiment tables). Each is a pass over the
    # test set per site: 0 (the final model only) for studies of hundreds of sites.
    score_last_rounds: int = 2
    # The model's input, the same at every site: images are resized to image_size x image_size
    # with `channels` (1 gray, 3 RGB). 0: an .npz keeps its own; an image folder gets 28 x 28, gray.
    image_size: int = 0
    channels: int = 0
    # The class names in label order (label 0 first), matched case-insensitively to class
    # folder names or CSV labels, so that `normal/` at one site and `NORMAL/` at another
    # mean the same class. []: the sorted folder names (each site must have every class).
    classes: list = field(default_factory=list)
    # A regular expression whose first group, searched in an image file's name, is its
    # patient (e.g. "^(person\\d+)_"): the val and test splits a site's folder lacks are then
    # carved by patient, so that no patient is in both train and test. "": by image.
    patient_pattern: str = ""


@dataclass(frozen=True)
class PrivacyConfig:
    # DP-SGD on every site (learn/privacy.py): per-example clipping and Gaussian noise,
    # epsilon accounted per site for its own shard (docs/protocols.md).
    enabled: bool = False
    # The site's budget for its whole run. Alone: the noise is chosen so that the planned
    # run (training.rounds fits x local_epochs) spends exactly this. 0: unset.
    target_epsilon: float = 0.0
    # Fixed noise (sigma); the site reports what it spends, and stops training before it
    # would pass target_epsilon if that is also given. 0: unset.
    noise_multiplier: float = 0.0
    clip_norm: float = 1.0  # C: each example's gradient is clipped to this L2 norm
    delta: float = 0.0  # 0: min(1e-5, 1 / (10 x the site's training samples))


# network.max_message_mb is an upper cap on a frame (the peer sizes it from the model below it).
MAX_MESSAGE_MB = 4096


@dataclass(frozen=True)
class NetworkConfig:
    ack_timeout_s: float = 2.0  # resend a hand-off not acknowledged within this
    handoff_timeout_s: float = 60.0  # then skip the successor that never acknowledged
    # A node gives up after waiting this long in all (time spent training does not count):
    # one line, exit 3, its checkpoint kept for a restart.
    run_timeout_s: float = 3600.0
    # A fresh node waits up to this long for every peer to be heard before its first round
    # (logging who it waits for), then starts with those it heard; a late site rejoins.
    start_window_s: float = 300.0
    max_message_mb: int = 512
    # Liveness (docs/architecture.md, Fault tolerance): a heartbeat to every peer this often; a peer
    # silent for peer_timeout_s is dead (a ring skips it or repairs round it, a gossip sum
    # leaves it out) and alive again when it speaks.
    heartbeat_interval_s: float = 1.0
    peer_timeout_s: float = 10.0
    # Plaintext, unauthenticated ZeroMQ: for debugging only; every node warns at start.
    insecure: bool = False


EVENT_ACTIONS = ("leave", "join")
ON_LEAVE = ("forget", "keep-last")


@dataclass(frozen=True)
class Event:
    """A planned absence, as in the chest X-ray study's intermittent sites: `peer` leaves
    (or joins) at the start of gossip round / ring cycle `round`. The same file on every
    site makes an experiment reproducible: everyone knows who is away when."""

    round: int
    peer: str
    action: str


@dataclass(frozen=True)
class PeerConfig:
    name: str
    address: str = ""  # "" in templates: launch fills in a loopback address
    public_key: str = ""  # Z85 CURVE key from `p2p-fl keygen`; launch makes fresh ones
    # false: the site accepts no inbound connections (a hospital firewall that allows only
    # outbound): it has no address, connects out to every peer, and they answer on those
    # connections. Two such sites cannot reach each other without a relay: at most one.
    inbound: bool = True


@dataclass(frozen=True)
class Topology:
    federation: str
    protocol: str
    peers: tuple[PeerConfig, ...]
    seed: int = 0
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ring: RingConfig = field(default_factory=RingConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    events: tuple[Event, ...] = ()

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.peers]

    def peer(self, name: str) -> PeerConfig:
        for p in self.peers:
            if p.name == name:
                return p
        raise ConfigError(f"--name {name!r} is not a peer of this topology (peers: {', '.join(self.names)})")

    def absences(self) -> dict[str, frozenset[int]]:
        """Peer -> the rounds (gossip) or cycles (ring) it is away for, from `events`.

        A peer whose first event is a join is away from round 0 until it joins.
        """
        away: dict[str, frozenset[int]] = {}
        for name in self.names:
            events = sorted((e for e in self.events if e.peer == name), key=lambda e: e.round)
            if not events:
                continue
            rounds, present, since = set(), events[0].action == "leave", 0
            for e in events:
                if e.action == "join" and not present:
                    rounds.update(range(since, e.round))
                    present = True
                elif e.action == "leave" and present:
                    since, present = e.round, False
            if not present:
                rounds.update(range(since, self.training.rounds))
            away[name] = frozenset(rounds)
        return away


_SECTIONS = {"training": TrainingConfig, "ring": RingConfig, "gossip": GossipConfig, "ensemble": EnsembleConfig, "privacy": PrivacyConfig, "data": DataConfig, "network": NetworkConfig}


def read_toml(path: Path, what: str, error: type[ConfigError] = ConfigError) -> dict:
    """The parsed TOML of `path`; `error` with one line if it is missing or not TOML."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{path}: not valid TOML ({err})") from None


def load_topology(path: str | Path) -> Topology:
    """Reads and checks a topology file; raises ConfigError naming the field."""
    path = Path(path)
    return parse_topology(read_toml(path, "topology"), source=str(path))


def chunked_sums(t: Topology) -> bool:
    """Whether this federation's gossip sums are chunked: `gossip.chunked` (the default) with
    secure sums on the complete graph. Elsewhere each sum is over a site's whole neighbourhood
    model: on other graphs each site's neighbourhood is its own."""
    return t.protocol == "gossip" and t.gossip.secure and t.gossip.chunked and t.gossip.graph == "complete"


def parse_topology(raw: dict, source: str = "<topology>") -> Topology:
    """Builds a checked Topology from a parsed TOML table."""

    def fail(message: str):
        raise ConfigError(f"{source}: {message}")

    top_fields = {"federation", "protocol", "seed", "peers", "events", *_SECTIONS}
    for key in raw:
        if key not in top_fields:
            fail(f"unknown field {key!r} (known: {', '.join(sorted(top_fields))})")
    for key in ("federation", "protocol", "peers"):
        if key not in raw:
            fail(f"missing field {key!r}")
    federation = _typed(raw, "federation", str, "", fail)
    if not _NAME.match(federation):
        fail(f"federation {federation!r} must be 1-63 letters, digits, '_', '.', '-'")
    protocol = _typed(raw, "protocol", str, "", fail)
    if protocol not in PROTOCOLS:
        fail(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    seed = _typed(raw, "seed", int, "", fail) if "seed" in raw else 0
    sections = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            fail(f"[{name}] must be a table")
        sections[name] = _build(cls, table, name, fail)
    peers = _parse_peers(raw["peers"], fail)
    events = _parse_events(raw.get("events", []), fail)
    topology = Topology(federation=federation, protocol=protocol, peers=peers, seed=seed, events=events, **sections)
    _check_semantics(topology, fail)
    return topology


def _parse_peers(raw_peers, fail) -> tuple[PeerConfig, ...]:
    if not isinstance(raw_peers, list) or not raw_peers:
        fail("[[peers]] must list at least one peer")
    peers = []
    for i, table in enumerate(raw_peers):
        if not isinstance(table, dict):
            fail(f"peers[{i}] must be a table")
        peer = _build(PeerConfig, table, f"peers[{i}]", fail)
        if not _NAME.match(peer.name):
            fail(f"peers[{i}].name {peer.name!r} must be 1-63 letters, digits, '_', '.', '-'")
        if peer.address and not _ADDRESS.match(peer.address):
            fail(f"peers[{i}].address {peer.address!r} is not like tcp://HOST:PORT")
        if not peer.inbound and peer.address:
            fail(f"peers[{i}] ({peer.name}) accepts no inbound connections (inbound = false): leave its address out")
        if peer.public_key and not is_public_key(peer.public_key):
            fail(f"peers[{i}].public_key does not parse as a 40-character Z85 CURVE key")
        peers.append(peer)
    outbound_only = [p.name for p in peers if not p.inbound]
    if len(outbound_only) > 1:
        fail(f"peers {', '.join(outbound_only)} all accept no inbound connections (inbound = false): two such "
             "sites cannot reach each other without a relay; at most one site may be outbound-only")
    names = [p.name for p in peers]
    for name in names:
        if names.count(name) > 1:
            fail(f"peers: duplicate name {name!r}")
    keys = [p.public_key for p in peers if p.public_key]
    for key in keys:
        if keys.count(key) > 1:
            fail(f"peers: public key {key[:8]}... is listed for two peers")
    return tuple(peers)


def _parse_events(raw_events, fail) -> tuple[Event, ...]:
    if not isinstance(raw_events, list):
        fail("[[events]] must be a list of tables")
    events = []
    for i, table in enumerate(raw_events):
        if not isinstance(table, dict):
            fail(f"events[{i}] must be a table")
        events.append(_build(Event, table, f"events[{i}]", fail))
    return tuple(events)


def _check_events(t: Topology, fail) -> None:
    if t.events and t.protocol not in ("gossip", "cwt"):
        fail(f"[[events]] apply to gossip rounds and cwt cycles, not to protocol {t.protocol!r}")
    for i, e in enumerate(t.events):
        if e.peer not in t.names:
            fail(f"events[{i}].peer {e.peer!r} is not a peer of this topology")
        _choice(e.action, EVENT_ACTIONS, f"events[{i}].action", fail)
        if not 0 < e.round < t.training.rounds:
            fail(f"events[{i}].round must be in 1..{t.training.rounds - 1} (training.rounds - 1), got {e.round}")
    for name in t.names:
        mine = sorted((e for e in t.events if e.peer == name), key=lambda e: e.round)
        for a, b in zip(mine, mine[1:]):
            if a.round == b.round or a.action == b.action:
                fail(f"events for {name!r} must alternate leave and join at distinct rounds "
                     f"(round {a.round} {a.action}, round {b.round} {b.action})")
    away = t.absences()
    for r in range(t.training.rounds if t.events else 0):
        present = [n for n in t.names if r not in away.get(n, ())]
        if len(present) < 2:
            fail(f"[[events]] leave fewer than 2 peers present in round {r}")
    if t.gossip.on_leave == "keep-last" and t.protocol == "gossip" and t.gossip.secure:
        fail("gossip.on_leave = \"keep-last\" needs gossip.secure = false: with masked sums nobody holds "
             "a site's last model to keep")


def _check_semantics(t: Topology, fail) -> None:
    tr = t.training
    if tr.rounds < 1:
        fail(f"training.rounds must be >= 1, got {tr.rounds}")
    if t.protocol == "swt" and tr.rounds != 1:
        fail(f"training.rounds must be 1 for swt (one pass round the ring), got {tr.rounds}; use protocol = \"cwt\" for cycles")
    if tr.local_epochs < 1:
        fail(f"training.local_epochs must be >= 1, got {tr.local_epochs}")
    if tr.min_local_steps < 0:
        fail(f"training.min_local_steps must be >= 0 (0: local_epochs as given), got {tr.min_local_steps}")
    if tr.batch_size < 1:
        fail(f"training.batch_size must be >= 1, got {tr.batch_size}")
    if not tr.learning_rate > 0:
        fail(f"training.learning_rate must be > 0, got {tr.learning_rate}")
    if tr.personalize_epochs < 0:
        fail(f"training.personalize_epochs must be >= 0 (0: none), got {tr.personalize_epochs}")
    if not tr.prox_mu >= 0:
        fail(f"training.prox_mu must be >= 0, got {tr.prox_mu}")
    if tr.fedbn and t.protocol == "ensemble":
        fail("training.fedbn does not apply to protocol ensemble: its members travel as whole models")
    _check_privacy(t.privacy, fail)
    _choice(tr.optimizer, OPTIMIZERS, "training.optimizer", fail)
    _choice(tr.lr_schedule, LR_SCHEDULES, "training.lr_schedule", fail)
    _choice(t.ring.order, RING_ORDERS, "ring.order", fail)
    _choice(t.ring.final, RING_FINALS, "ring.final", fail)
    _check_data(t.data, fail)
    if t.protocol in RING_PROTOCOLS and len(t.peers) < 2:
        fail(f"a {t.protocol} ring needs at least 2 peers, got {len(t.peers)}")
    if t.protocol == "gossip":
        _check_gossip(t, fail)
    if t.protocol == "ensemble" and len(t.peers) < 2:
        fail(f"an ensemble needs at least 2 peers, got {len(t.peers)}")
    if not t.ensemble.wait_s > 0:
        fail(f"ensemble.wait_s must be > 0, got {t.ensemble.wait_s}")
    _choice(t.gossip.on_leave, ON_LEAVE, "gossip.on_leave", fail)
    _check_events(t, fail)
    net = t.network
    for key in ("ack_timeout_s", "handoff_timeout_s", "run_timeout_s"):
        if not getattr(net, key) > 0:
            fail(f"network.{key} must be > 0")
    if not net.start_window_s >= 0:
        fail(f"network.start_window_s must be >= 0 (0: start at once), got {net.start_window_s}")
    if net.handoff_timeout_s < net.ack_timeout_s:
        fail("network.handoff_timeout_s must be >= network.ack_timeout_s")
    if not 0 < net.heartbeat_interval_s:
        fail("network.heartbeat_interval_s must be > 0")
    if not 0 < net.max_message_mb <= MAX_MESSAGE_MB:
        fail(f"network.max_message_mb must be > 0 and at most {MAX_MESSAGE_MB} (MiB), got {net.max_message_mb}")
    if not net.peer_timeout_s >= 2 * net.heartbeat_interval_s:
        fail("network.peer_timeout_s must be at least 2 x network.heartbeat_interval_s")


MAX_IMAGE_SIZE = 1024


def data_options(d: DataConfig) -> dict:
    """`load_dataset`'s keyword arguments for data read as [data] says (size, channels, classes)."""
    return {"image_size": d.image_size or None, "channels": d.channels or None, "classes": d.classes or None,
            "patient_pattern": d.patient_pattern or None}


def _check_data(d: DataConfig, fail) -> None:
    try:
        parse_partition(d.partition)
    except ValueError as err:
        fail(f"data.partition: {err}")
    if d.train_images < 0:
        fail(f"data.train_images must be >= 0 (0: every training image), got {d.train_images}")
    if d.score_last_rounds < 0:
        fail(f"data.score_last_rounds must be >= 0 (0: the final model only), got {d.score_last_rounds}")
    if not 0 <= d.image_size <= MAX_IMAGE_SIZE:
        fail(f"data.image_size must be 1..{MAX_IMAGE_SIZE} pixels (or 0: the data's own), got {d.image_size}")
    if d.channels not in (0, 1, 3):
        fail(f"data.channels must be 1 (gray) or 3 (RGB) (or 0: the data's own), got {d.channels}")
    if d.patient_pattern:
        try:
            if re.compile(d.patient_pattern).groups < 1:
                fail(f"data.patient_pattern {d.patient_pattern!r} needs a group for the patient, e.g. \"^(person\\\\d+)_\"")
        except re.error as err:
            fail(f"data.patient_pattern {d.patient_pattern!r} is not a regular expression ({err})")
    if d.classes:
        if not all(isinstance(c, str) and c.strip() for c in d.classes):
            fail("data.classes must be a list of class names (non-empty strings)")
        folded = [c.strip().casefold() for c in d.classes]
        repeated = sorted({c for c in d.classes if folded.count(c.strip().casefold()) > 1})
        if repeated:
            fail(f"data.classes names {', '.join(repeated)} twice (names match case-insensitively)")
        if len(d.classes) < 2:
            fail(f"data.classes must name at least 2 classes, got {d.classes}")


def _check_privacy(p: PrivacyConfig, fail) -> None:
    for key in ("target_epsilon", "noise_multiplier", "delta"):
        if not getattr(p, key) >= 0:
            fail(f"privacy.{key} must be > 0 (or 0: unset), got {getattr(p, key)}")
    if not p.clip_norm > 0:
        fail(f"privacy.clip_norm must be > 0, got {p.clip_norm}")
    if not p.delta < 1:
        fail(f"privacy.delta must be below 1, got {p.delta}")
    if p.enabled and not (p.target_epsilon or p.noise_multiplier):
        fail("privacy.enabled = true needs privacy.target_epsilon or privacy.noise_multiplier")


def gossip_graph(t: Topology) -> mixing.Adjacency:
    """The gossip graph of the topology, the same on every site; ValueError names the problem."""
    g, names = t.gossip, t.names
    if g.graph == "complete":
        return mixing.complete(names)
    if g.graph == "ring":
        return mixing.ring_neighbours(names)
    if g.graph == "edges":
        return mixing.edge_list(names, g.edges)
    degree = g.graph.removeprefix("regular:")
    if g.graph.startswith("regular:") and degree.isdigit():
        return mixing.random_regular(names, int(degree), g.graph_seed)
    raise ValueError(f"{g.graph!r} is not one of {', '.join(GOSSIP_GRAPHS)}")


def _check_gossip(t: Topology, fail) -> None:
    g = t.gossip
    if len(t.peers) < 2:
        fail(f"gossip needs at least 2 peers, got {len(t.peers)}")
    if g.edges and g.graph != "edges":
        fail(f"gossip.edges is given but gossip.graph is {g.graph!r}; set graph = \"edges\"")
    if not all(isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e) for e in g.edges):
        fail("gossip.edges must be a list of [\"peer\", \"peer\"] pairs")
    try:
        graph = gossip_graph(t)
    except ValueError as err:
        fail(f"gossip.{'edges' if g.graph == 'edges' else 'graph'}: {err}")
    if not mixing.is_connected(graph):
        fail(f"gossip.graph {g.graph!r} is disconnected: every peer must reach every other")
    if g.secure:
        leak = isolating_view(graph, chunked=chunked_sums(t))
        if leak:
            site, other = leak
            fail(f"gossip.graph {g.graph!r}: a secure sum at {site} would reveal {other}'s model alone "
                 f"({site} has fewer than 2 neighbours, too few for a secure sum; gossip.secure = true)")
    if not g.round_timeout_s > 0:
        fail("gossip.round_timeout_s must be > 0")
    if not g.clip > 0:
        fail(f"gossip.clip must be > 0, got {g.clip}")
    _choice(g.aggregation, GOSSIP_AGGREGATIONS, "gossip.aggregation", fail)
    if g.secure and g.aggregation != "mean":
        fail(f"gossip.aggregation {g.aggregation!r} needs every neighbour's model in the clear; with "
             "gossip.secure = true a site sees only the masked sum (use \"mean\", or secure = false)")
    if not 0 <= g.trim < 0.5:
        fail(f"gossip.trim must be in [0, 0.5), got {g.trim}")
    _choice(g.outer_optimizer, OUTER_OPTIMIZERS, "gossip.outer_optimizer", fail)
    if not g.outer_learning_rate > 0:
        fail(f"gossip.outer_learning_rate must be > 0, got {g.outer_learning_rate}")
    if not 0 <= g.outer_momentum < 1:
        fail(f"gossip.outer_momentum must be in [0, 1), got {g.outer_momentum}")
    if g.head_refit_steps < 0:
        fail(f"gossip.head_refit_steps must be >= 0, got {g.head_refit_steps}")
    if g.head_refit_steps and t.privacy.enabled:
        fail("gossip.head_refit_steps: the refit sends exact statistics of each site's images, which DP-SGD's "
             "noise does not cover; set it to 0 with privacy.enabled = true")
    if g.head_refit_steps and not all(len(nbrs) == len(graph) - 1 for nbrs in graph.values()):
        fail(f"gossip.head_refit_steps needs the complete graph (gossip.graph is {g.graph!r}): only there is a "
             "round's average the pooled mean every site steps from alike")
    if g.head_refit_steps and (g.aggregation != "mean" or g.on_leave != "forget"):
        fail("gossip.head_refit_steps needs the mean of this round's statistics (gossip.aggregation = \"mean\", "
             "gossip.on_leave = \"forget\")")
    if g.secure and t.network.insecure:
        fail("gossip.secure = true derives its masks from the CURVE keys; network.insecure = true has none")
    if g.samples:
        unknown = sorted(set(g.samples) - set(t.names))
        if unknown:
            fail(f"gossip.samples names unknown peers {', '.join(unknown)}")
        missing = [n for n in t.names if n not in g.samples]
        if missing:
            fail(f"gossip.samples has no count for {', '.join(missing)}")
        bad = [n for n, c in g.samples.items() if not isinstance(c, int) or isinstance(c, bool) or c < 1]
        if bad:
            fail(f"gossip.samples must be positive integers; not for {', '.join(bad)}")


def _choice(value, options, key, fail) -> None:
    if value not in options:
        fail(f"{key} {value!r} is not one of {', '.join(options)}")


def _build(cls, table: dict, section: str, fail):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            fail(f"unknown field {section}.{key} (known: {', '.join(sorted(known))})")
        values[key] = _typed(table, key, hints[key], section + ".", fail)
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values:
            fail(f"missing field {section}.{f.name}")
    return cls(**values)


def _typed(table: dict, key: str, kind: type, prefix: str, fail):
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        fail(f"{prefix}{key} must be {kind.__name__}, got {value!r}")
    return value


def logit_adjustment_applies(t: Topology) -> bool:
    """Whether the sites (and centralized training) train with logit adjustment: as
    `training.logit_adjustment` says, except under DP without a target epsilon to take
    the noisy counts' share from (see TrainingConfig)."""
    return t.training.logit_adjustment and (not t.privacy.enabled or bool(t.privacy.target_epsilon))


def dump_topology(t: Topology) -> str:
    """The TOML text of a topology (launch writes the one it actually ran)."""
    table = {
        "federation": t.federation,
        "protocol": t.protocol,
        "seed": t.seed,
        **{name: dataclasses.asdict(getattr(t, name)) for name in _SECTIONS},
        "peers": [dataclasses.asdict(p) for p in t.peers],
        **({"events": [dataclasses.asdict(e) for e in t.events]} if t.events else {}),
    }
    return tomli_w.dumps(table)
