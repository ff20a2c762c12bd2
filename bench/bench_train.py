"""Training throughput of Learner.fit against a plain jitted train step looped in Python.

Both train the same model on the same builtin PneumoniaMNIST images with the
same batch size and Adam; the reference is the minimal loop a JAX user would
write (batches put on the device beforehand, one jitted step per batch, no
shuffling, no augmentation). Prints one JSON line per model: images/s of
each (Learner with and without augmentation), the median of interleaved
repeats after one warm-up epoch, and the ratio Learner / reference.

    .venv/bin/python bench/bench_train.py [--models small-cnn seed-cnn] [--threads N]

The functions live in p2p_fl/bench.py; `p2p-fl bench --only train` gives the same figures as
one JSON line each.
"""

from __future__ import annotations

import argparse
import json

from p2p_fl.bench import learner_epoch, median_seconds, reference_epoch
from p2p_fl.data.sources import load_dataset
from p2p_fl.learn import configure_jax, describe_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small-cnn", "seed-cnn"])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_jax(threads=args.threads)

    train = load_dataset("builtin:pneumoniamnist").train
    images, labels = train.images[:args.images], train.labels[:args.images]
    images_per_epoch = len(images) // args.batch_size * args.batch_size
    for model_name in args.models:
        seconds = median_seconds({
            "reference": reference_epoch(model_name, images, labels, args.batch_size),
            "learner": learner_epoch(model_name, images, labels, args.batch_size,
                                     augment=False),
            "learner_augment": learner_epoch(model_name, images, labels, args.batch_size,
                                             augment=True),
        }, args.repeats)
        rates = {f"{name}_img_s": round(images_per_epoch / value, 1)
                 for name, value in seconds.items()}
        print(json.dumps({
            "bench": "train_throughput",
            "model": model_name,
            "backend": describe_backend(),
            "batch_size": args.batch_size,
            "images_per_epoch": images_per_epoch,
            "repeats": args.repeats,
            **rates,
            "ratio_learner_to_reference": round(seconds["reference"] / seconds["learner"], 3),
        }), flush=True)


if __name__ == "__main__":
    main()
