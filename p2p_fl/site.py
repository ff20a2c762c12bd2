"""One institution's side of a run, without the network: its data, its learner and DP
settings, its protocol, and its files (metrics.jsonl, checkpoint, result.json, the model).

Both engines build the same `Site`: `p2p_fl.node` (one site per process, over ZeroMQ) and
`p2p_fl.simulate` (many sites in one process, over memory). `p2p_fl.driver.Driver` carries
out the protocol's actions between the site and its transport.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Callable

import numpy as np

from p2p_fl.checkpoint import FILENAME as CHECKPOINT_FILE
from p2p_fl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, split_prefixed
from p2p_fl.config import (
    RING_PROTOCOLS,
    ConfigError,
    Topology,
    TrainingConfig,
    chunked_sums,
    gossip_graph,
    logit_adjustment_applies,
)
from p2p_fl.data import Dataset, Split
from p2p_fl.federate import Slices, flatten, shared_secrets_with
from p2p_fl.files import write_json, write_npz
from p2p_fl.fingerprint import federation_fingerprint
from p2p_fl.learn import Learner
from p2p_fl.learn.ensemble import evaluate_ensemble
from p2p_fl.learn.head_refit import BIAS, KERNEL, PREFIX, HeadRefit, head_statistics, refit_applies, statistics_spec
from p2p_fl.learn.models import model_code
from p2p_fl.learn.outer import OuterOptimizer
from p2p_fl.learn.privacy import LABEL_PRIOR_SHARE, BudgetExceeded, DPConfig, batch_sampling, default_delta, noise_for_target
from p2p_fl.net import Curve, load_secret_key
from p2p_fl.protocols import EnsembleProtocol, Finish, GossipProtocol, LocalProtocol, RingProtocol, Train, Weights
from p2p_fl.protocols.base import Protocol
from p2p_fl.protocols.gossip import SecureSetup, mixing_weights, secure_fixed_point
from p2p_fl.protocols.ring import ring_cycles

log = logging.getLogger(__name__)

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
    t = topology.training
    return Learner(
        t.model, num_classes=num_classes, image_shape=image_shape, optimizer=t.optimizer,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, batch_size=t.batch_size,
        augment=t.augment, seed=topology.seed, dp=dp, prox_mu=t.prox_mu,
        logit_adjustment=logit_adjustment_applies(topology),
        training_secret=None if dp is None else secrets.token_bytes(32),
    )


def epochs_per_round(training: TrainingConfig, steps_per_epoch: int) -> int:
    """Epochs a site trains per round (ring hop): local_epochs, or the fewest whole epochs
    that reach training.min_local_steps steps if local_epochs fall short."""
    return max(training.local_epochs, -(-training.min_local_steps // max(steps_per_epoch, 1)))


def dp_config(topology: Topology, num_train: int) -> DPConfig | None:
    """This site's DP-SGD settings from [privacy] and its shard size (None: DP is off).

    With a target epsilon and no noise multiplier, the noise is the smallest whose planned
    run spends at most the target: training.rounds fits of `epochs_per_round` epochs on this
    shard, the most any protocol asks of a site (a ring: one hop per cycle). The target is
    the site's budget either way; ConfigError if no noise up to 1000 meets it. With logit
    adjustment, LABEL_PRIOR_SHARE of the target goes to the shard's noisy class counts,
    planned and counted beside the steps.
    """
    p, t = topology.privacy, topology.training
    if not p.enabled:
        return None
    delta = p.delta or default_delta(num_train)
    budget = p.target_epsilon or None
    label_prior_epsilon = LABEL_PRIOR_SHARE * budget if logit_adjustment_applies(topology) else 0.0
    noise = p.noise_multiplier
    if not noise:
        sample_rate, steps = batch_sampling(num_train, t.batch_size)
        try:
            noise = noise_for_target(budget, delta, sample_rate, t.rounds * epochs_per_round(t, steps) * steps,
                                     label_prior_epsilon)
        except ValueError as err:
            raise ConfigError(f"privacy.target_epsilon: {err} on {num_train} training samples") from None
    return DPConfig(clip_norm=p.clip_norm, noise_multiplier=noise, target_epsilon=budget, delta=delta,
                    label_prior_epsilon=label_prior_epsilon)


def adopt_model(learner: Learner, weights: dict[str, np.ndarray], *, keep: frozenset,
                keep_optimizer_state: bool) -> None:
    """Trains on from a model that arrived: its tensors replace the learner's (except `keep`,
    FedBN's local ones), and the optimizer restarts unless `keep_optimizer_state`: the
    arriving model was shaped by other sites' moments, but under DP-SGD momentum built over
    a site's own noisy steps is what averages the noise out (training.keep_optimizer_state)."""
    learner.set_weights(model_part(weights), keep=keep)
    if not keep_optimizer_state:
        learner.reset_optimizer()


def model_part(weights: Weights) -> Weights:
    """A shared model without the head refit's statistics (they never enter a learner)."""
    return {name: value for name, value in weights.items() if not name.startswith(PREFIX)}


def make_protocol(topology: Topology, me: str, curve: Curve | None, initial: Weights | None = None,
                  statistics: frozenset[str] = frozenset(), refit_steps: int = 0) -> Protocol:
    """This site's protocol. Gossip with an outer optimizer also needs the shared part of
    the initial model and the names of its running statistics (the learner's); `refit_steps`:
    the head refit's Newton steps that apply (`Site.refit_steps`)."""
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
            # A site shares sums only with its neighbours (as aggregator or member) and their
            # neighbours (fellow members): run keys and pair secrets for those alone, so a
            # sparse graph of N sites costs N x k^2 hellos and secrets, not N^2.
            near = set(graph[me]).union(*(graph[n] for n in graph[me])) - {me}
            keys = {p: k for p, k in curve.peer_keys.items() if p in near}
            slices = None
            if chunked_sums(t):
                if initial is None:
                    raise ValueError("chunked secure gossip needs the initial model to cut into slices")
                slices = Slices.of(graph, flatten(initial)[0].size)
            secure = SecureSetup(t.federation, shared_secrets_with(curve.secret, keys, me),
                                 secure_fixed_point(graph, t.gossip.clip), slices)
        outer = None
        if t.gossip.outer_optimizer != "avg":
            outer = OuterOptimizer(t.gossip.outer_optimizer, t.gossip.outer_learning_rate,
                                   t.gossip.outer_momentum, statistics)
        refit = HeadRefit(refit_steps) if refit_steps else None
        return GossipProtocol(me, graph, mixing_weights(graph, t.gossip.samples), t.training.rounds,
                              round_timeout_s=t.gossip.round_timeout_s, secure=secure,
                              aggregation=t.gossip.aggregation, trim=t.gossip.trim, away=t.absences(),
                              on_leave=t.gossip.on_leave, resume_wait_s=3 * t.network.heartbeat_interval_s,
                              hello_interval_s=t.network.heartbeat_interval_s, outer=outer, initial=initial,
                              refit=refit)
    raise ValueError(f"protocol {t.protocol!r} has no implementation")


def site_curve(topology: Topology, name: str, key_path: Path, source: Path) -> Curve | None:
    """This node's CURVE keys, checked against the topology; None only if it says insecure."""
    if topology.network.insecure:
        return None
    unkeyed = [f"peers[{i}] ({p.name})" for i, p in enumerate(topology.peers) if not p.public_key]
    if unkeyed:
        raise ConfigError(f"{source}: {', '.join(unkeyed)} has no public_key; run `p2p-fl keygen` at each "
                          "site and list the keys, or set network.insecure = true to debug without CURVE")
    public, secret = load_secret_key(key_path)
    if public != topology.peer(name).public_key:
        raise ConfigError(f"{key_path}: its public key is not the one {source} lists for {name!r}")
    return Curve(public, secret, {p.name: p.public_key for p in topology.peers if p.name != name})


# What a site's run leaves in its folder (the node adds status.json): `clear_finished_run`.
RUN_FILES = ("result.json", "final_model.npz", "ensemble_models.npz", "test_predictions.npz", "metrics.jsonl",
             CHECKPOINT_FILE, "status.json", "report.html", "roc.png", "calibration.png", "learning_curves.png")


def clear_finished_run(out_dir: Path) -> list[str]:
    """Deletes a finished run's files from `out_dir` (the user asked to overwrite it: result.json
    last, so a crash midway leaves a folder still refused as finished); returns their names."""
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    for name in sorted(present, key=lambda n: n == "result.json"):
        (out_dir / name).unlink()
    return present


class Site:
    """One site's data, learner, protocol and files; resumed from its checkpoint if it has one.

    Args:
        topology: the federation (every site reads the same one).
        name: this site's peer name.
        data: this site's own train/val/test data (the test split is its local test set).
        out_dir: where this site writes its files.
        curve: this site's CURVE keys and its peers' (None only for `insecure = true`).
        common_test: the test set shared by the whole study (None: local test only).
        emit: receives progress events (dicts) for a live display.
        durable: fsync each checkpoint (a node process); a simulation, whose sites die only
            by its fault schedule, writes them without.
        checkpoints: write checkpoints at all; a simulated site its fault schedule never
            kills would never read one, so the simulation skips them (a fifth of a 100-site
            run's time).
        now: the driver's clock at the start (a restored protocol's deadlines count from it).

    Raises:
        CheckpointError: `out_dir` holds a finished run, or another run's checkpoint.
    """

    def __init__(self, topology: Topology, name: str, data: Dataset, out_dir: Path, *, curve: Curve | None,
                 common_test: Split | None = None, emit: Emit = lambda event: None, durable: bool = True,
                 checkpoints: bool = True, now: float = 0.0):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = out_dir / CHECKPOINT_FILE
        self.metrics_path = out_dir / "metrics.jsonl"
        if (out_dir / "result.json").exists():
            # A site takes part in a run once: its run keys went with the checkpoint, and the
            # finished run's metrics, model and result stay as they are. (result.json is
            # written last: a checkpoint beside it is one the end did not get to delete.)
            self.checkpoint_path.unlink(missing_ok=True)
            raise CheckpointError(f"{out_dir} holds a finished run (result.json); use another --out, or --overwrite "
                                  "to replace it")
        self.started = time.monotonic()
        self.topology = topology
        self.name = name
        self.data = data
        self.out_dir = out_dir
        self.common_test = common_test
        self._start_test_auc: float | None = None  # of the training under way
        self.emit = emit
        self.durable = durable
        self.checkpoints = checkpoints
        self.dp = dp_config(topology, len(data.train))
        self.learner = make_learner(topology, data.num_classes, data.image_shape, dp=self.dp)
        steps = self.learner.steps_per_epoch(len(data.train))
        self.local_epochs = epochs_per_round(topology.training, steps)
        if self.local_epochs > topology.training.local_epochs:
            log.info("%s: %d training images are %d step(s) an epoch: %d epochs a round reach "
                     "training.min_local_steps = %d", name, len(data.train), steps, self.local_epochs,
                     topology.training.min_local_steps)
        if self.dp is not None:
            log.info("%s: DP-SGD with noise multiplier %.4g, clip norm %g, delta %.3g, budget epsilon %s%s",
                     name, self.dp.noise_multiplier, self.dp.clip_norm, self.dp.delta,
                     self.dp.target_epsilon or "none",
                     f", of which {self.dp.label_prior_epsilon:.3g} for the noisy class counts of logit "
                     "adjustment" if self.dp.label_prior_epsilon else "")
        # FedBN: these tensors never leave the site; the transport knows only the shared ones.
        self.local = frozenset(self.learner.batchnorm_names()) if topology.training.fedbn else frozenset()
        # The head refit's statistics travel beside the model in every round (zeros while
        # training). Whether it runs depends on the topology and the model alone: every site
        # decides alike.
        self.refit_spec: list = []
        self.refit_steps, self.refit_off = 0, ""
        if topology.protocol == "gossip" and topology.gossip.head_refit_steps:
            try:
                off = refit_applies(self.learner.weight_spec(), topology.gossip.samples)
            except ValueError as err:
                raise ConfigError(f"gossip.head_refit_steps with model {topology.training.model!r}: {err}") from None
            if off is None:
                self.refit_steps = topology.gossip.head_refit_steps
                self.refit_spec = statistics_spec(self.learner.weight_spec())
            else:
                self.refit_off = off
                log.info("%s: no head refit: %s", name, off)
        self.protocol = make_protocol(topology, name, curve, initial=self.shared_weights(),
                                      statistics=frozenset(self.learner.statistic_names()),
                                      refit_steps=self.refit_steps)
        self.fingerprint = federation_fingerprint(topology, data.image_shape, data.num_classes,
                                                  self.learner.weight_spec(), model_code(topology.training.model))
        listed = topology.gossip.samples.get(name) if topology.protocol == "gossip" else None
        if listed is not None and listed != len(data.train):
            log.warning("%s: gossip.samples lists %d training samples, the data has %d; mixing uses the listed "
                        "count", name, listed, len(data.train))
        resumed = self._resume(now)
        self.resumes = resumed["resumes"] + 1 if resumed else 0
        # The round this site first found its privacy budget spent (kept across restarts).
        self.budget_reached_round: int | None = resumed.get("budget_reached_round")
        if self.resumes:
            log.warning("%s: resumed from %s (restart %d)", name, self.checkpoint_path, self.resumes)
            emit({"event": "resumed", "resumes": self.resumes})
        else:
            self.metrics_path.write_text("")
        emit({"event": "state", "state": "waiting", "samples": len(data.train)})
        # As of the last finished training (a training thread may be busy with the learner);
        # only for the checkpoint, so none without checkpoints (a simulated site's megabyte).
        self._learner_state = self.learner.get_state() if checkpoints else {}

    def shared_spec(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of the tensors that leave the site (not FedBN's local ones)."""
        model = [spec for spec in self.learner.weight_spec() if spec[0] not in self.local]
        return sorted(model + self.refit_spec)

    # Checkpoints.

    def save_checkpoint(self) -> None:
        if not self.checkpoints:
            return
        state, arrays = self.protocol.snapshot()
        save_checkpoint(self.checkpoint_path, {
            "federation": self.topology.federation, "name": self.name, "protocol": self.topology.protocol,
            "resumes": self.resumes, "protocol_state": state, "budget_reached_round": self.budget_reached_round,
        }, {**{f"learner/{k}": v for k, v in self._learner_state.items()},
            **{f"protocol/{k}": v for k, v in arrays.items()}}, durable=self.durable)

    def _resume(self, now: float) -> dict:
        """Restores learner and protocol from the checkpoint; returns the site's own part of
        its state (`resumes`, `budget_reached_round`), {} for a fresh start."""
        path = self.checkpoint_path
        if not path.exists():
            return {}
        state, arrays = load_checkpoint(path)
        t = self.topology
        mine = {"federation": t.federation, "name": self.name, "protocol": t.protocol}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise CheckpointError(f"{path} belongs to {theirs}, not {mine}; use another --out or move it away")
        try:
            self.learner.set_state(split_prefixed(arrays, "learner"))
            self.protocol.restore(state["protocol_state"], split_prefixed(arrays, "protocol"), now)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path} does not fit this topology's model or protocol ({err}); "
                                  "use another --out or move it away") from None
        return {"resumes": state["resumes"], "budget_reached_round": state.get("budget_reached_round")}

    # Training: `train` for one site; `begin_training`, the fit, then `end_training` for an
    # engine that fits several sites' learners together.

    def train(self, step: Train) -> tuple[Weights, dict]:
        """Trains one hop or round as `step` asks; returns (shared weights, metrics record)."""
        if "head_refit_step" in step.meta:
            return self.refit_statistics(step)
        learning_rate = self.begin_training(step)
        t0 = time.monotonic()

        def on_epoch(epoch: int, loss: float) -> None:
            self.emit({"event": "epoch", "round": step.round, "epoch": epoch + 1,
                       "epochs": self.local_epochs, "loss": loss, **step.meta})

        try:
            losses = self.learner.fit(self.data.train.images, self.data.train.labels,
                                      epochs=self.local_epochs,
                                      learning_rate=learning_rate, on_epoch=on_epoch)
        except BudgetExceeded as err:
            # Out of privacy budget, the site stops training but stays in the federation: it
            # hands on (ring) or mixes (gossip) the models it holds, already released, which
            # costs no privacy. Exiting would cost the others a ring hand-off timeout per hop
            # or a member of every secure sum.
            if self.budget_reached_round is None:
                self.budget_reached_round = step.round
                log.warning("%s: %s; no more training from round %d, the site only passes models on",
                            self.name, err, step.round)
            losses = [None]
        return self.end_training(step, losses, time.monotonic() - t0)

    def refit_statistics(self, step: Train) -> tuple[Weights, dict]:
        """A head refit round (learn/head_refit.py): the model the round started from goes back
        as it came, with the head's gradient and Hessian on this site's training images."""
        t0 = time.monotonic()
        if step.weights is not None:
            self.learner.set_weights(model_part(step.weights), keep=self.local)
        weights = self.learner.get_weights()
        features = self.learner.head_features(self.data.train.images)
        validation = (self.learner.head_features(self.data.val.images), self.data.val.labels)
        statistics, loss = head_statistics(features, self.data.train.labels, weights[KERNEL], weights[BIAS],
                                           validation)
        val = self.learner.evaluate(self.data.val.images, self.data.val.labels)
        # Nothing was trained ("train_loss" None keeps the round out of the report's training
        # curve); the head's loss on the site's own training images at the round's start.
        record = {"round": step.round, **step.meta, "epochs": 0, "train_loss": None, "head_refit_train_loss": loss,
                  "val_loss": _plain(val["loss"]), "val_auc": _plain(val["auc"]), "train_s": time.monotonic() - t0}
        return {**self.shared_weights(), **statistics}, record

    def begin_training(self, step: Train) -> float:
        """Takes the model the step starts from; returns the step's learning rate."""
        self._start_test_auc = None
        if step.weights is not None:
            adopt_model(self.learner, step.weights, keep=self.local,
                        keep_optimizer_state=self.topology.training.keep_optimizer_state)
            rounds, scored = self.topology.training.rounds, self.topology.data.score_last_rounds
            # + 0.5: a ring hop's progress lies within its cycle.
            if (scored and self.common_test is not None and len(self.common_test)
                    and step.progress >= 1 - (scored + 0.5) / rounds):
                # The federation's model as this round got it, on the common test set: how
                # the shared model moves from round to round (the swing in result.json).
                # Only the last rounds (data.score_last_rounds): each is a pass over the
                # test set per site.
                self._start_test_auc = _plain(
                    self.learner.evaluate(self.common_test.images, self.common_test.labels)["auc"])
        return learning_rate_at(self.topology, step.progress)

    def end_training(self, step: Train, losses: list, train_s: float) -> tuple[Weights, dict]:
        val = self.learner.evaluate(self.data.val.images, self.data.val.labels)
        record = {"round": step.round, **step.meta, "lr": learning_rate_at(self.topology, step.progress),
                  "epochs": len(losses), "train_loss": _plain(losses[-1]), "val_loss": _plain(val["loss"]),
                  "val_auc": _plain(val["auc"]),  # None: one class only
                  "train_s": train_s, **self.privacy_fields()}
        if self._start_test_auc is not None:
            record["start_test_auc"] = self._start_test_auc
        if self.budget_reached_round is not None:
            record["budget_reached"] = True
        return self.shared_weights(), record

    def shared_weights(self) -> Weights:
        """The learner's model as the federation sees it: without FedBN's site-local tensors."""
        weights = {k: v for k, v in self.learner.get_weights().items() if k not in self.local}
        weights.update({name: np.zeros(shape, dtype) for name, dtype, shape in self.refit_spec})
        return {name: weights[name] for name, _, _ in self.shared_spec()}

    def trained(self, record: dict) -> None:
        """A training's record is final (bytes and time added): log it; the learner's state
        as of now is what the next checkpoint keeps."""
        record["elapsed_s"] = time.monotonic() - self.started
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.emit({"event": "trained", **record})
        if self.checkpoints:
            self._learner_state = self.learner.get_state()

    def privacy_fields(self) -> dict:
        dp = self.dp
        return {} if dp is None else {"epsilon": self.learner.privacy_spent(), "delta": dp.delta,
                                      "dp_sampling": self.learner.dp_sampling}

    # The end.

    def finishing(self, final: Finish) -> None:
        """The protocol finished: gossip's last mix gets its metrics line, like the others'."""
        if "mixed_round" in final.meta:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"round": final.meta["rounds"], **final.meta,
                                    **self.privacy_fields()}) + "\n")

    def write_result(self, final: Finish, traffic: dict, process: dict | None = None) -> dict:
        """Evaluates the final model; writes result.json and the model; the checkpoint goes.

        `traffic`: bytes_sent, messages_sent, bytes_received and dropped of the transport;
        `process`: the engine's figures of the process that ran the site, if any."""
        self.emit({"event": "state", "state": "evaluating"})
        learner, topology, dp = self.learner, self.topology, self.dp
        shortfall = self.protocol.shortfall()
        if shortfall:
            log.warning("%s: the run ended without the federation: %s", self.name, shortfall)
        if final.weights is not None:
            learner.set_weights(model_part(final.weights), keep=self.local)
        result = _evaluate(learner, self.data, self.common_test, final.members)
        result.update({
            "name": self.name,
            "protocol": topology.protocol,
            "data": self.data.name,
            "model": topology.training.model,  # with image_shape and classes: what `p2p-fl predict` rebuilds
            "num_classes": self.data.num_classes,
            "image_shape": list(self.data.image_shape),
            "classes": list(self.data.class_names),
            "class_counts": np.bincount(self.data.train.labels, minlength=self.data.num_classes).tolist(),
            "test_set": topology.data.test or "own",  # what test_* was measured on (local_test_*: own)
            "samples": len(self.data.train),
            **traffic,
            "wall_s": time.monotonic() - self.started,
            "resumes": self.resumes,
            "repaired": self.protocol.repaired,
            "rejoined": self.protocol.rejoined,
            "prox_mu": topology.training.prox_mu,
            "fedbn": topology.training.fedbn,
            "logit_adjustment": self.learner.logit_adjustment,
            "keep_optimizer_state": topology.training.keep_optimizer_state,
            "epochs_per_round": self.local_epochs,
            # Newton steps of the head refit run (0: none; `head_refit_off` says why when asked for).
            "head_refit_steps": self.refit_steps,
            **({"head_refit_off": self.refit_off} if self.refit_off else {}),
            **({} if dp is None else {
                **self.privacy_fields(), "noise_multiplier": dp.noise_multiplier, "clip_norm": dp.clip_norm,
                "target_epsilon": dp.target_epsilon, "budget_reached_round": self.budget_reached_round,
                # Spent on the noisy class counts of logit adjustment (inside "epsilon"); 0: none.
                "label_prior_epsilon": dp.label_prior_epsilon}),
            **{f"final_{k}": v for k, v in final.meta.items()},
            "shortfall": shortfall or "",  # why the run did not include the federation ("" : it did)
            **({} if process is None else {"process": process}),
        })
        # The models first, result.json last (it marks the run finished), then the checkpoint
        # goes: a kill anywhere in between loses nothing.
        write_npz(self.out_dir / "final_model.npz", learner.get_weights())
        headline = self.common_test if self.common_test is not None else self.data.test
        if not final.members and len(headline):
            # What the report's confusion matrix, calibration and AUC interval are computed
            # from: the site's own file (0600), never sent.
            write_npz(self.out_dir / "test_predictions.npz",
                             {"labels": headline.labels, "probs": learner.predict_proba(headline.images)})
        if final.members:  # an ensemble: every member, to predict again as this site did
            write_npz(self.out_dir / "ensemble_models.npz",
                             {f"member{i}/{k}": v for i, m in enumerate(final.members) for k, v in m.items()})
        result["test_auc_swing"] = self._last_rounds_swing(result.get("test_auc"))
        result.update(self._personalized(final))
        write_json(self.out_dir / "result.json", result)
        self.checkpoint_path.unlink(missing_ok=True)  # the run is over: result.json and the model are its record
        # A site with no test images (no common test set, an empty shard of it) has no scores.
        self.emit({"event": "done", **{k: result.get(k) for k in ("test_auc", "test_acc", "test_loss", "bytes_sent",
                                                                  "wall_s")}})
        return result


    def _last_rounds_swing(self, final_auc: float | None) -> float | None:
        """The largest change of the common-test AUC between consecutive rounds over the last
        models (the starts of the last `data.score_last_rounds` trainings, then the final
        one), read back from metrics.jsonl so that a restart loses nothing; None without a
        common test set or scored rounds."""
        if final_auc is None or self.common_test is None:
            return None
        aucs = []
        for line in self.metrics_path.read_text().splitlines():
            auc = json.loads(line).get("start_test_auc")
            if auc is not None:
                aucs.append(auc)
        last = (aucs + [final_auc])[-(self.topology.data.score_last_rounds + 1):]
        return max((abs(b - a) for a, b in zip(last, last[1:])), default=None)

    def _personalized(self, final: Finish) -> dict:
        """The final model fine-tuned at this site (`training.personalize_epochs`), scored on
        its own test split; the learner is left fine-tuned (its final model is saved before)."""
        epochs = self.topology.training.personalize_epochs
        if not epochs or self.dp is not None or final.members or not len(self.data.test):
            return {}
        self.emit({"event": "state", "state": "personalizing"})
        self.learner.reset_optimizer()
        self.learner.fit(self.data.train.images, self.data.train.labels, epochs=epochs,
                         learning_rate=self.topology.training.learning_rate)
        report = self.learner.evaluate(self.data.test.images, self.data.test.labels)
        return {"personalized_test_auc": _plain(report["auc"]), "personalized_test_loss": _plain(report["loss"]),
                "personalize_epochs": epochs}


def train_together(steps: list[tuple[Site, Train]]) -> list[tuple[Weights, dict]]:
    """Trains each site's step; returns each one's (shared weights, record), in order.

    Sites without DP that train the same number of epochs go through one padded program
    together (`learn.together`); a lone site and every DP site train alone (`Site.train`:
    their epoch events, each DP site's own budget checks). Both engines that host several
    sites in one process (`p2p_fl.simulate`, `p2p_fl.node.run_group`) train through here.
    """
    import jax

    from p2p_fl.learn.together import fit_together

    outcomes: dict[int, tuple[Weights, dict]] = {}
    by_epochs: dict[int, list[tuple[Site, Train]]] = {}
    for site, step in steps:
        if site.dp is None and "head_refit_step" not in step.meta:  # a refit round trains nothing
            by_epochs.setdefault(site.local_epochs, []).append((site, step))
    for epochs, together in by_epochs.items():
        if len(together) == 1:
            continue
        rates = [site.begin_training(step) for site, step in together]
        t0 = time.monotonic()
        # On a CPU one site at a time through the shared padded program beats vmapping the
        # sites (10 sites x 470 images, one epoch: 1.81 s against 2.18 s on 2 cores); on an
        # accelerator the sites of a round go in one vmapped call.
        per_call = 1 if jax.default_backend() == "cpu" else None
        losses = fit_together([site.learner for site, _ in together],
                              [(site.data.train.images, site.data.train.labels) for site, _ in together],
                              epochs=epochs, learning_rates=rates, max_sites_per_call=per_call)
        share = (time.monotonic() - t0) / len(together)  # each site's train_s: its share of the call
        for (site, step), site_losses in zip(together, losses):
            outcomes[id(site)] = site.end_training(step, site_losses, share)
    return [outcomes[id(site)] if id(site) in outcomes else site.train(step) for site, step in steps]


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


