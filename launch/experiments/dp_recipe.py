"""Searches a DP-SGD recipe for FedAvg on 10 Dirichlet(0.5) sites, in one process.

Each call trains the 10 sites' DP-SGD learners (built, noised and fed the mean by the
node's own functions) one after the other and averages their weights by sample count after
every round: the arithmetic of secure gossip on the complete graph without the network or
the fixed-point encoding (epsilon 8: AUC 0.5891 with the old recipe where the 10-process
federation gave 0.5894; 0.8771 with the new one, as the federation). Ten recipes fit in the time of
a few federations on a 2-core machine; the chosen recipe is measured for real by
`noniid.py`. Each result is appended as one JSON line to OUT.

Each simulated site gets its own secret training key from `make_learner`, as a node does
(Poisson batches and noise nobody else can rebuild), so two runs of the same command differ
by their noise; --seed fixes the partition and the initial model only.

    .venv/bin/python launch/experiments/dp_recipe.py --epsilon 8 --model small-cnn-dp \\
        --lr 0.02 --schedule constant --keep-optimizer-state [--seed 0] [--out runs/dp_recipe.jsonl]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from foundation import ROOT
from p2p_fl.config import parse_topology
from p2p_fl.data import load_dataset, partition_dataset
from p2p_fl.federate import weighted_average
from p2p_fl.site import adopt_model, dp_config, learning_rate_at, make_learner

SITES, PARTITION = 10, "dirichlet:0.5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, required=True)
    parser.add_argument("--model", default="small-cnn-dp")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--clip-norm", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    parser.add_argument("--keep-optimizer-state", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="partition and initial model (as noniid.py --seed)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "dp_recipe.jsonl")
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # the accountant's convergence chatter
    # The node's own functions plan each site's noise, build its learner, adopt the mean
    # and set the rate, from the topology the federation would run.
    topology = parse_topology({
        "federation": "dp-recipe", "protocol": "gossip", "seed": args.seed,
        "peers": [{"name": f"site-{i}"} for i in range(SITES)],
        "training": {"model": args.model, "rounds": args.rounds, "local_epochs": 1, "batch_size": args.batch_size,
                     "optimizer": "sgd", "learning_rate": args.lr, "lr_schedule": args.schedule,
                     "keep_optimizer_state": args.keep_optimizer_state},
        "privacy": {"enabled": True, "target_epsilon": args.epsilon, "clip_norm": args.clip_norm}})
    data = load_dataset("builtin:pneumoniamnist")
    shards = partition_dataset(data, SITES, PARTITION, args.seed)
    dps = [dp_config(topology, len(shard.train)) for shard in shards]
    learners = [make_learner(topology, data.num_classes, data.image_shape, dp=dp) for dp in dps]
    mean = learners[0].get_weights()
    started = time.monotonic()
    for r in range(args.rounds):
        lr = learning_rate_at(topology, r / args.rounds)
        models = []
        for learner, shard in zip(learners, shards):
            adopt_model(learner, mean, keep=frozenset(), keep_optimizer_state=args.keep_optimizer_state)
            learner.fit(shard.train.images, shard.train.labels, learning_rate=lr)
            models.append(learner.get_weights())
        mean = weighted_average(models, [len(shard.train) for shard in shards])
        learners[0].set_weights(mean)
        report = learners[0].evaluate(data.test.images, data.test.labels, data.val.images, data.val.labels)
        print(f"round {r + 1}: test AUC {report['auc']:.4f}, loss {report['loss']:.3f}, "
              f"{time.monotonic() - started:.0f} s", flush=True)
    result = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "test_auc": report["auc"], "test_acc": report["acc"], "test_loss": report["loss"],
              "epsilon_spent": max(learner.privacy_spent() for learner in learners),
              "dp_sampling": learners[0].dp_sampling, "wall_s": round(time.monotonic() - started),
              "noise_multipliers": [round(dp.noise_multiplier, 4) for dp in dps],
              "samples": [len(shard.train) for shard in shards]}
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
