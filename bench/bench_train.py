"""Training throughput of Learner.fit against a plain jitted train step looped in Python.

Both train the same model on the same builtin PneumoniaMNIST images with the
same batch size and Adam; the reference is the minimal loop a JAX user would
write (batches put on the device beforehand, one jitted step per batch, no
shuffling, no augmentation). Prints one JSON line per model: images/s of
each (Learner with and without augmentation), the median of interleaved
repeats after one warm-up epoch, and the ratio Learner / reference.

    .venv/bin/python bench/bench_train.py [--models small-cnn seed-cnn] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from p2p_fl.data.sources import load_dataset
from p2p_fl.learn import Learner, build_model, configure_jax, describe_backend


def reference_epoch(model_name: str, images: np.ndarray, labels: np.ndarray,
                    batch_size: int) -> Callable[[], None]:
    """One epoch of a hand-written jitted step looped in Python, as a callable."""
    model = build_model(model_name, num_classes=2, in_channels=images.shape[-1],
                        image_size=images.shape[1], seed=0)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, batch_stats, copy=True)
            logits = model(x, train=True, rngs=nnx.Rngs(dropout=key))
            loss = optax.sigmoid_binary_cross_entropy(logits[:, 0], y).mean()
            return loss, nnx.state(model, nnx.BatchStat)

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    num_batches = len(images) // batch_size
    batches = [(jnp.asarray(images[i * batch_size:(i + 1) * batch_size]),
                jnp.asarray(labels[i * batch_size:(i + 1) * batch_size], jnp.float32))
               for i in range(num_batches)]
    keys = jax.random.split(jax.random.key(0), num_batches)

    def epoch():
        nonlocal params, batch_stats, opt_state
        for (x, y), key in zip(batches, keys):
            params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                                        x, y, key)
        loss.block_until_ready()

    return epoch


def learner_epoch(model_name: str, images: np.ndarray, labels: np.ndarray,
                  batch_size: int, augment: bool) -> Callable[[], None]:
    """One epoch of Learner.fit (data transfer included), as a callable."""
    learner = Learner(model_name, image_shape=images.shape[1:], batch_size=batch_size,
                      augment=augment)
    return lambda: learner.fit(images, labels, epochs=1)


def median_seconds(epochs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per epoch of each callable after a warm-up (compiling) epoch.

    Repeats are interleaved so that a change of load on a shared machine
    affects every contender alike.
    """
    for epoch in epochs.values():
        epoch()
    seconds = {name: [] for name in epochs}
    for _ in range(repeats):
        for name, epoch in epochs.items():
            start = time.perf_counter()
            epoch()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


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
