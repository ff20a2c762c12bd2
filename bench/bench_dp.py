"""What DP-SGD and FedProx cost per training epoch: Learner.fit with and without them.

All contenders train the same model on the same builtin PneumoniaMNIST images with the same
batch size and Adam; DP-SGD draws each step's batch by Poisson sampling (expected size the
batch size), computes one gradient per example (jax.vmap) over a padded chunk of
`dp_slots` slots, clips and noises them, keyed by a site secret as the node does; FedProx
adds mu * (w - w0) to the gradient. Prints one JSON line per model: seconds per epoch
(median of interleaved repeats after one warm-up epoch) and the ratios to plain.

    .venv/bin/python bench/bench_dp.py [--models small-cnn] [--images 1024] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import secrets

from p2p_fl.bench import median_seconds
from p2p_fl.data.sources import load_dataset
from p2p_fl.learn import DPConfig, Learner, configure_jax, describe_backend
from p2p_fl.learn.privacy import batch_sampling, poisson_capacity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small-cnn"])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_jax(threads=args.threads)

    train = load_dataset("builtin:pneumoniamnist").train
    images, labels = train.images[:args.images], train.labels[:args.images]
    for model in args.models:
        learners = {
            "plain": Learner(model, batch_size=args.batch_size),
            "fedprox": Learner(model, batch_size=args.batch_size, prox_mu=0.01),
            "dp": Learner(model, batch_size=args.batch_size, dp=DPConfig(noise_multiplier=1.0),
                          training_secret=secrets.token_bytes(32)),
        }
        rate, steps = batch_sampling(len(images), args.batch_size)
        seconds = median_seconds({name: (lambda learner=learner: learner.fit(images, labels))
                                  for name, learner in learners.items()}, args.repeats)
        print(json.dumps({
            "model": model, "backend": describe_backend(), "images": len(images),
            "batch_size": args.batch_size, "repeats": args.repeats,
            "dp_steps": steps, "dp_slots": poisson_capacity(len(images), rate),
            "seconds_per_epoch": {k: round(v, 3) for k, v in seconds.items()},
            "dp_over_plain": round(seconds["dp"] / seconds["plain"], 2),
            "fedprox_over_plain": round(seconds["fedprox"] / seconds["plain"], 2),
        }), flush=True)


if __name__ == "__main__":
    main()
