"""One institution's process: its data, its learner, its peer, and the protocol driving them.

This is the only place that has side effects: it trains (on a worker thread, so the peer
keeps answering while JAX computes), sends, writes metrics and results, and reports
progress. Protocols decide; the node carries out what they return.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from p2p_fl.checkpoint import FILENAME as CHECKPOINT_FILE
from p2p_fl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, split_prefixed
from p2p_fl.config import RING_PROTOCOLS, ConfigError, Topology, gossip_graph
from p2p_fl.data import Dataset, Split
from p2p_fl.learn import Learner
from p2p_fl.learn.privacy import BudgetExceeded, DPConfig, batch_sampling, default_delta, noise_for_target
from p2p_fl.net import Curve, Peer, WireError, wire
from p2p_fl.federate import shared_secrets_with
from p2p_fl.protocols import Finish, GossipProtocol, LocalProtocol, Refuse, RingProtocol, Send, Train
from p2p_fl.protocols.ring import ring_cycles
from p2p_fl.protocols.ensemble import EnsembleProtocol
from p2p_fl.learn.ensemble import evaluate_ensemble
from p2p_fl.protocols.gossip import SecureSetup, mixing_weights, secure_fixed_point

log = logging.getLogger(__name__)

POLL_S = 0.05
Emit = Callable[[dict], None]


def learning_rate_at(topology: Topology, progress: float) -> float:
    """The learning rate for a step that starts at `progress` (0..1) of the whole run."""
    base = topology.training.learning_rate
    if topology.training.lr_schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base


def make_learner(topology: Topology, num_classes: int, image_shape: tuple[int, ...],
                 dp: DPConfig | None = None) -> Learner:
    """Every site builds the same initial model from the federation's seed.

    With DP, the site's batches and noise are keyed by a secret drawn here from the OS
    CSPRNG, never sent (from the public seed any site could rebuild and subtract the
    noise); a resumed node's checkpoint restores the key it had. Without DP, training
    randomness stays the seed's, so runs are reproducible.
    """
    import secrets  # local: this function is the only user

    t = topology.training
    return Learner(
        t.model, num_classes=num_classes, image_shape=image_shape, optimizer=t.optimizer,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, batch_size=t.batch_size,
        augment=t.augment, seed=topology.seed, dp=dp, prox_mu=t.prox_mu,
        training_secret=None if dp is None else secrets.token_bytes(32),
    )


def dp_config(topology: Topology, num_train: int) -> DPConfig | None:
    """This site's DP-SGD settings from [privacy] and its shard size (None: DP is off).

    With a target epsilon and no noise multiplier, the noise is the smallest whose planned
    run spends at most the target: training.rounds fits of local_epochs epochs on this shard,
    the most any protocol asks of a site (a ring: one hop per cycle). The target is the
    site's budget either way; ConfigError if no noise up to 1000 meets it.
    """
    p, t = topology.privacy, topology.training
    if not p.enabled:
        return None
    delta = p.delta or default_delta(num_train)
    budget = p.target_epsilon or None
    noise = p.noise_multiplier
    if not noise:
        sample_rate, steps = batch_sampling(num_train, t.batch_size)
        try:
            noise = noise_for_target(budget, delta, sample_rate, t.rounds * t.local_epochs * steps)
        except ValueError as err:
            raise ConfigError(f"privacy.target_epsilon: {err} on {num_train} training samples") from None
    return DPConfig(clip_norm=p.clip_norm, noise_multiplier=noise, target_epsilon=budget, delta=delta)


def adopt_model(learner: Learner, weights: dict[str, np.ndarray], *, keep: frozenset,
                keep_optimizer_state: bool) -> None:
    """Trains on from a model that arrived: its tensors replace the learner's (except `keep`,
    FedBN's local ones), and the optimizer restarts unless `keep_optimizer_state`: the
    arriving model was shaped by other sites' moments, but under DP-SGD momentum built over
    a site's own noisy steps is what averages the noise out (training.keep_optimizer_state)."""
    learner.set_weights(weights, keep=keep)
    if not keep_optimizer_state:
        learner.reset_optimizer()


def make_protocol(topology: Topology, me: str, curve: Curve | None):
    t = topology
    if t.protocol in RING_PROTOCOLS:
        cycles = ring_cycles(t.names, t.training.rounds, t.ring.order, t.seed, t.absences())
        return RingProtocol(me, [site for cycle in cycles for site in cycle], ack_timeout_s=t.network.ack_timeout_s,
                            handoff_timeout_s=t.network.handoff_timeout_s, final=t.ring.final,
                            cycle_lengths=[len(cycle) for cycle in cycles],
                            resume_wait_s=3 * t.network.heartbeat_interval_s)
    if t.protocol == "ensemble":
        return EnsembleProtocol(me, t.names, t.training.rounds, wait_s=t.ensemble.wait_s)
    if t.protocol == "local":
        return LocalProtocol(me, t.training.rounds)
    if t.protocol == "gossip":
        graph = gossip_graph(t)
        secure = None
        if t.gossip.secure:
            secure = SecureSetup(t.federation, shared_secrets_with(curve.secret, curve.peer_keys, me),
                                 secure_fixed_point(graph, t.gossip.clip))
        return GossipProtocol(me, graph, mixing_weights(graph, t.gossip.samples), t.training.rounds,
                              round_timeout_s=t.gossip.round_timeout_s, secure=secure,
                              aggregation=t.gossip.aggregation, trim=t.gossip.trim, away=t.absences(),
                              on_leave=t.gossip.on_leave, resume_wait_s=3 * t.network.heartbeat_interval_s,
                              hello_interval_s=t.network.heartbeat_interval_s)
    raise ValueError(f"protocol {t.protocol!r} has no implementation")


def run_node(
    topology: Topology,
    name: str,
    data: Dataset,
    out_dir: Path,
    *,
    curve: Curve | None,
    common_test: Split | None = None,
    emit: Emit = lambda event: None,
) -> dict:
    """Runs one site until its protocol finishes; writes metrics.jsonl and result.json.

    Args:
        topology: the federation (every node reads the same one).
        name: this site's peer name.
        data: this site's own train/val/test data (the test split is its local test set).
        out_dir: where this node writes its files.
        curve: this node's CURVE keys and its peers' (None only for `insecure = true`).
        common_test: the test set shared by the whole study (None: local test only).
        emit: receives progress events (dicts) for a live display.

    Returns:
        The result dict also written to out_dir/result.json.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "result.json").exists() and not (out_dir / CHECKPOINT_FILE).exists():
        # A site takes part in a run once: its run keys went with the checkpoint, and the
        # finished run's metrics, model and result stay as they are.
        raise CheckpointError(f"{out_dir} holds a finished run (result.json); use another --out")
    started = time.monotonic()
    me = topology.peer(name)
    dp = dp_config(topology, len(data.train))
    learner = make_learner(topology, data.num_classes, data.image_shape, dp=dp)
    if dp is not None:
        log.info("%s: DP-SGD with noise multiplier %.4g, clip norm %g, delta %.3g, budget epsilon %s",
                 name, dp.noise_multiplier, dp.clip_norm, dp.delta, dp.target_epsilon or "none")
    # FedBN: these tensors never leave the site; the peer knows only the shared ones.
    local = frozenset(learner.batchnorm_names()) if topology.training.fedbn else frozenset()
    protocol = make_protocol(topology, name, curve)
    listed = topology.gossip.samples.get(name) if topology.protocol == "gossip" else None
    if listed is not None and listed != len(data.train):
        log.warning("%s: gossip.samples lists %d training samples, the data has %d; mixing uses the listed count",
                    name, listed, len(data.train))
    peer = None
    if topology.protocol != "local":
        others = {p.name: p.address for p in topology.peers if p.name != name}
        missing = [n for n, a in others.items() if not a] + ([name] if not me.address else [])
        if missing:
            raise ValueError(f"peers {', '.join(missing)} have no address in the topology; use launch or fill in [[peers]].address")
        shared_spec = [spec for spec in learner.weight_spec() if spec[0] not in local]
        peer = Peer(name, me.address, others, topology.federation, shared_spec, curve=curve,
                    max_message_bytes=topology.network.max_message_mb * 2**20,
                    heartbeat_interval_s=topology.network.heartbeat_interval_s,
                    peer_timeout_s=topology.network.peer_timeout_s)
    metrics_path = out_dir / "metrics.jsonl"
    checkpoint_path = out_dir / CHECKPOINT_FILE
    resumed = _resume(checkpoint_path, topology, name, learner, protocol)
    resumes = resumed["resumes"] + 1 if resumed else 0
    # The round this site first found its privacy budget spent (kept across restarts).
    budget_reached_round: int | None = resumed.get("budget_reached_round")
    if resumes:
        log.warning("%s: resumed from %s (restart %d)", name, checkpoint_path, resumes)
        emit({"event": "resumed", "resumes": resumes})
    else:
        metrics_path.write_text("")
    emit({"event": "state", "state": "waiting", "samples": len(data.train)})
    learner_state = learner.get_state()  # as of the last finished training: the worker may be busy

    def checkpointed(actions: list) -> list:
        """Writes the checkpoint the protocol asked for, before any of its messages leave."""
        if getattr(protocol, "checkpoint_due", False):
            protocol.checkpoint_due = False
            state, arrays = protocol.snapshot()
            save_checkpoint(checkpoint_path, {
                "federation": topology.federation, "name": name, "protocol": topology.protocol,
                "resumes": resumes, "protocol_state": state, "budget_reached_round": budget_reached_round,
            }, {**{f"learner/{k}": v for k, v in learner_state.items()},
                **{f"protocol/{k}": v for k, v in arrays.items()}})
        return actions

    def guarded(callback: Callable[..., list], *args) -> list:
        """Runs a protocol callback under drop-and-count: a message it refuses, or an error
        it hits on something a peer sent, is counted and logged; the node never exits on it.
        The checkpoint it asks for is written outside the guard: a failed write must stop
        the node (it resumes from the last good one), not silently drop the actions."""
        if peer is None:  # a local run: nothing from outside, so an error is a bug
            return checkpointed(callback(*args))
        try:
            actions = callback(*args)
        except WireError as err:
            what = f"{args[0].type} from {args[0].sender}: " if args and isinstance(args[0], wire.Message) else ""
            peer.drop("refused", f"{what}{err}")
            return []
        except Exception as err:  # noqa: BLE001 - a bug here must not let a peer end the node:
            # it is logged with its traceback and counted (result.json: protocol-error), so it shows
            log.exception("%s: %s failed; dropped and counted", name, callback.__name__)
            peer.drop("protocol-error", f"{callback.__name__}: {type(err).__name__}: {err}")
            return []
        return checkpointed(actions)

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"train-{name}")
    queue: list = guarded(protocol.start, time.monotonic())
    training: tuple[Train, concurrent.futures.Future] | None = None
    waiting_train: list[Train] = []
    final: Finish | None = None
    deadline = started + topology.network.run_timeout_s

    def privacy_fields() -> dict:
        return {} if dp is None else {"epsilon": learner.privacy_spent(), "delta": dp.delta,
                                      "dp_sampling": learner.dp_sampling}

    def train(step: Train) -> tuple[dict, dict]:
        nonlocal budget_reached_round
        if step.weights is not None:
            adopt_model(learner, step.weights, keep=local,
                        keep_optimizer_state=topology.training.keep_optimizer_state)
        lr = learning_rate_at(topology, step.progress)
        t0 = time.monotonic()

        def on_epoch(epoch: int, loss: float) -> None:
            emit({"event": "epoch", "round": step.round, "epoch": epoch + 1,
                  "epochs": topology.training.local_epochs, "loss": loss, **step.meta})

        try:
            losses = learner.fit(data.train.images, data.train.labels,
                                 epochs=topology.training.local_epochs, learning_rate=lr, on_epoch=on_epoch)
        except BudgetExceeded as err:
            # Out of privacy budget, the site stops training but stays in the federation: it
            # hands on (ring) or mixes (gossip) the models it holds, already released, which
            # costs no privacy. Exiting would cost the others a ring hand-off timeout per hop
            # or a member of every secure sum.
            if budget_reached_round is None:
                budget_reached_round = step.round
                log.warning("%s: %s; no more training from round %d, the site only passes models on",
                            name, err, step.round)
            losses = [None]
        val = learner.evaluate(data.val.images, data.val.labels)
        record = {"round": step.round, **step.meta, "lr": lr, "train_loss": _plain(losses[-1]),
                  "val_loss": _plain(val["loss"]), "val_auc": _plain(val["auc"]),  # None: one class only
                  "train_s": time.monotonic() - t0, **privacy_fields()}
        if budget_reached_round is not None:
            record["budget_reached"] = True
        return {k: v for k, v in learner.get_weights().items() if k not in local}, record

    try:
        while final is None:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{name}: run did not finish within network.run_timeout_s={topology.network.run_timeout_s}")
            for action in queue:
                if isinstance(action, Send):
                    peer.send(action.to, action.type, action.round, action.weights, action.meta)
                elif isinstance(action, Train):
                    waiting_train.append(action)
                elif isinstance(action, Refuse):
                    peer.drop("refused", action.reason)
                elif isinstance(action, Finish):
                    final = action
                    if "mixed_round" in action.meta:  # gossip: the last round's mix, like the others'
                        with metrics_path.open("a") as f:
                            f.write(json.dumps({"round": topology.training.rounds, **action.meta,
                                                **privacy_fields()}) + "\n")
            queue = []
            if training is None and waiting_train:
                step = waiting_train.pop(0)
                emit({"event": "state", "state": "training", "round": step.round, **step.meta})
                training = (step, executor.submit(train, step))
            if training is not None and training[1].done():
                step, future = training
                training = None
                weights, record = future.result()  # a training error is a bug: let it raise
                record["bytes_sent"] = peer.bytes_sent if peer else 0
                record["elapsed_s"] = time.monotonic() - started
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                emit({"event": "trained", **record})
                learner_state = learner.get_state()
                queue += guarded(protocol.on_trained, step.round, weights, time.monotonic())
                if not waiting_train and not any(isinstance(a, Train) for a in queue):
                    emit({"event": "state", "state": "waiting"})  # handed on; the next model is elsewhere
                continue
            if peer is not None:
                for msg in peer.receive(POLL_S if training is None else POLL_S / 5):
                    queue += guarded(protocol.on_message, msg, time.monotonic())
                peer.pulse(getattr(protocol, "progress", 0))
                if hasattr(protocol, "on_peers"):
                    dead, revived = peer.liveness_changes()
                    for site in sorted(dead):
                        log.warning("%s: %s is silent past %.1f s: dead", name, site, topology.network.peer_timeout_s)
                    for site in sorted(revived):
                        log.warning("%s: %s is back", name, site)
                    queue += guarded(protocol.on_peers, dead, revived, peer.health.progress, time.monotonic())
                queue += guarded(protocol.on_tick, time.monotonic())
            elif training is not None:
                time.sleep(POLL_S / 5)
        # Let the last acks/finals drain before the sockets close.
        for action in queue:
            if isinstance(action, Send):
                peer.send(action.to, action.type, action.round, action.weights, action.meta)
    finally:
        executor.shutdown(wait=True)
        if peer is not None:
            peer.close()

    emit({"event": "state", "state": "evaluating"})
    if final.weights is not None:
        learner.set_weights(final.weights, keep=local)
    result = _evaluate(learner, data, common_test, final.members)
    result.update({
        "name": name,
        "protocol": topology.protocol,
        "samples": len(data.train),
        "bytes_sent": peer.bytes_sent if peer else 0,
        "messages_sent": peer.messages_sent if peer else 0,
        "bytes_received": peer.bytes_received if peer else 0,
        "dropped": dict(peer.dropped) if peer else {},
        "wall_s": time.monotonic() - started,
        "resumes": resumes,
        "repaired": getattr(protocol, "repaired", 0),
        "rejoined": getattr(protocol, "rejoined", 0),
        "prox_mu": topology.training.prox_mu,
        "fedbn": topology.training.fedbn,
        "keep_optimizer_state": topology.training.keep_optimizer_state,
        **({} if dp is None else {
            **privacy_fields(), "noise_multiplier": dp.noise_multiplier, "clip_norm": dp.clip_norm,
            "target_epsilon": dp.target_epsilon, "budget_reached_round": budget_reached_round}),
        **{f"final_{k}": v for k, v in final.meta.items()},
    })
    _write_json_atomic(out_dir / "result.json", result)
    checkpoint_path.unlink(missing_ok=True)  # the run is over: result.json and the model are its record
    np.savez(out_dir / "final_model.npz", **learner.get_weights())
    if final.members:  # an ensemble: every member, to predict again as this site did
        np.savez(out_dir / "ensemble_models.npz",
                 **{f"member{i}/{k}": v for i, m in enumerate(final.members) for k, v in m.items()})
    emit({"event": "done", **{k: result[k] for k in ("test_auc", "test_acc", "test_loss", "bytes_sent", "wall_s")}})
    return result


def _resume(path: Path, topology: Topology, name: str, learner: Learner, protocol) -> dict:
    """Restores learner and protocol from this node's checkpoint; returns the node's own part
    of its state (`resumes`, `budget_reached_round`), {} for a fresh start (no checkpoint).
    Raises CheckpointError for one of another run."""
    if not path.exists() or not hasattr(protocol, "restore"):
        return {}
    state, arrays = load_checkpoint(path)
    mine = {"federation": topology.federation, "name": name, "protocol": topology.protocol}
    theirs = {k: state.get(k) for k in mine}
    if theirs != mine:
        raise CheckpointError(f"{path} belongs to {theirs}, not {mine}; use another --out or move it away")
    try:
        learner.set_state(split_prefixed(arrays, "learner"))
        protocol.restore(state["protocol_state"], split_prefixed(arrays, "protocol"), time.monotonic())
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path} does not fit this topology's model or protocol ({err}); "
                              "use another --out or move it away") from None
    return {"resumes": state["resumes"], "budget_reached_round": state.get("budget_reached_round")}


def _evaluate(learner: Learner, data: Dataset, common_test: Split | None, members: tuple = ()) -> dict:
    """Final metrics: common test set (the headline) and this site's own test shard.

    The decision threshold reported beside 0.5 is chosen on this site's validation data.
    """
    result = {}
    test_sets = {"test": common_test, "local_test": data.test}
    for prefix, split in test_sets.items():
        if split is None or len(split) == 0:
            continue
        if members:  # an ensemble predicts with its members' mean probabilities
            report = evaluate_ensemble(learner, members, split.images, split.labels, data.val.images, data.val.labels)
        else:
            report = learner.evaluate(split.images, split.labels, data.val.images, data.val.labels)
        result.update({f"{prefix}_{k}": _plain(v) for k, v in report.items()})
    if common_test is None:  # the local test set is then the headline
        result.update({k.removeprefix("local_"): v for k, v in list(result.items())})
    return result


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
