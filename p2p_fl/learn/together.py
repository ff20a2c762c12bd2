"""Training many simulated sites together: one compiled epoch over stacked states.

An in-process simulation runs many sites (10 to 1000) in one process. Sites
that train in the same round should not run N Python loops of jitted calls:
``fit_together`` stacks the training states of compatible sites, pads their
shards to one size with a per-site count of real examples, and runs one
jitted ``jax.vmap`` of ``train.plain_epoch`` (the same function that
``Learner.fit`` runs for one site) per epoch, so the work is one model's
training over all the sites' images.

Each learner ends exactly where ``learner.fit`` would have left it, up to
float rounding: the shuffle and the step keys of ``plain_epoch`` are defined
per index, so padding does not change them, and steps beyond a site's own
batch count leave its state (Adam's moments and counter included) untouched
and do not count in its mean loss. (With Adam, small-cnn's convolution
biases that feed a BatchNorm differ by up to about the learning rate per
step: their true gradient is zero, and Adam scales each program's own
rounding noise up to full steps; see tests/test_train_together.py.)

Cost, measured on 2 CPU cores for 10 sites of 130 to 170 images, one epoch:
once compiled, one call takes about 1.2 times a Python loop of ``fit``
(XLA:CPU runs the batched matrix products and im2col concatenations of the
vmapped convolutions somewhat slower), but it compiles one program where
the loop compiles one per distinct shard size (5 s against 22 s). The
batching is meant for accelerators, where one site's small batches leave
the device mostly idle.

Example:
    >>> losses = fit_together(learners, shards, epochs=2,          # doctest: +SKIP
    ...                       learning_rates=[1e-3] * len(learners))
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from p2p_fl.learn import privacy
from p2p_fl.learn.train import Learner, TrainState, _with_learning_rate, plain_epoch

# Padded images of one call stay under this many bytes.
DEFAULT_MAX_IMAGE_BYTES = 256 << 20
# Images of all sites in one vmapped step: bounds the step's activations and
# gradients (small-cnn at 28x28: 0.9 MB of temporaries per image, by XLA's
# memory analysis on CPU, so about 0.9 GB; 16 sites at batch size 64).
DEFAULT_MAX_STEP_IMAGES = 1024


@functools.partial(jax.jit,
                   static_argnames=("graphdef", "tx", "batch_size", "augment", "prox_mu"),
                   donate_argnames=("states",))
def train_epoch_together(states: TrainState, images: jax.Array, labels: jax.Array,
                         num_valid: jax.Array, num_batches: jax.Array, *, graphdef, tx,
                         batch_size: int, augment: bool, prox_mu: float = 0.0,
                         anchors=None, logit_shifts=None) -> tuple[TrainState, jax.Array]:
    """One epoch of S sites at once: ``plain_epoch`` vmapped over the leading axis.

    Args:
      states: the sites' stacked training states (donated).
      images: (S, N, H, W, C) raw images, site s's first ``num_valid[s]`` real.
      labels: (S, N) labels.
      num_valid: (S,) int32 real examples per site.
      num_batches: (S,) int32 steps per site (0: an inert padding row).
      anchors: stacked FedProx anchors (with ``prox_mu`` > 0), else None.
      logit_shifts: (S, L) each site's logit adjustment, else None.

    Returns:
      (stacked new states, (S,) mean losses).
    """
    def one_site(state, site_images, site_labels, site_valid, site_batches, anchor, shift):
        return plain_epoch(state, site_images, site_labels, site_valid, site_batches,
                           graphdef=graphdef, tx=tx, batch_size=batch_size, augment=augment,
                           prox_mu=prox_mu, anchor=anchor, logit_shift=shift)

    return jax.vmap(one_site)(states, images, labels, num_valid, num_batches, anchors,
                              logit_shifts)


@jax.jit
def _stack(states):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)


@functools.partial(jax.jit, static_argnames=("count",))
def _unstack(stacked, count: int):
    return [jax.tree_util.tree_map(lambda leaf: leaf[row], stacked) for row in range(count)]


def padded_rows(count: int) -> int:
    """The number of vmapped rows a call of ``count`` sites runs with.

    1..4, then multiples of 2**k in (4 * 2**k, 8 * 2**k] (5, 6, 7, 8, 10,
    12, 14, 16, 20, ...): at most a quarter of the rows are padding, and
    calls of similar size share one compiled program.
    """
    if count <= 4:
        return max(count, 1)
    step = 1 << ((count - 1).bit_length() - 3)
    return -(-count // step) * step


def _rows_at_most(limit: int) -> int:
    """The largest ``padded_rows`` value <= limit (limit >= 1)."""
    if limit <= 4:
        return limit
    step = 1 << (limit.bit_length() - 3)
    return limit // step * step


def fit_together(learners: Sequence[Learner],
                 shards: Sequence[tuple[np.ndarray, np.ndarray]], *, epochs: int,
                 learning_rates: Sequence[float | None],
                 max_sites_per_call: int | None = None,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 max_step_images: int = DEFAULT_MAX_STEP_IMAGES) -> list[list[float]]:
    """Trains each learner on its shard, compatible ones in one compiled program.

    The effect is that of ``learners[i].fit(*shards[i], epochs=epochs,
    learning_rate=learning_rates[i])`` for every i, up to float rounding:
    the same weights, BatchNorm statistics, optimizer state and advanced
    PRNG key (so later training continues the same random stream), and the
    same per-epoch mean losses.

    Learners train together when they share the model structure, optimizer,
    effective batch size (``min(batch_size, len(shard))``, as ``fit`` uses),
    augmentation, FedProx mu (each site's anchor is its own weights at the
    start, as in ``fit``), logit adjustment (each site's shift from its own
    shard's labels), image shape and image dtype. Within such a group
    sites are sorted by shard size and run in calls of at most
    ``max_sites_per_call`` sites whose padded images stay under
    ``max_image_bytes`` and whose vmapped step holds at most
    ``max_step_images`` images; a call pads its site count up to
    ``padded_rows`` and each shard up to one less than a whole number of
    batches past its largest, so that calls of similar shape reuse one
    compiled program (padding rows are inert and discarded). With
    ``max_sites_per_call=1`` the sites of a group run one by one through that
    one padded program (on a CPU that is faster than vmapping them, and
    compiles once where ``fit`` compiles once per shard size). A DP-SGD
    learner (``learner.dp is not None``), and a site alone in its group,
    simply runs ``learner.fit``, one after another.

    Everything is checked before anything trains: shapes, labels, empty
    shards, a learner listed twice, and each DP learner's privacy budget.

    Args:
      learners: the sites' learners, each listed once.
      shards: (images, labels) per learner, as ``fit`` takes them.
      epochs: passes over each shard.
      learning_rates: per learner, the learning rate from now on (None:
        keep the current one).
      max_sites_per_call: cap on the sites of one call (None: no cap but
        the two budgets).
      max_image_bytes: budget of one call's padded images.
      max_step_images: budget of the images of one vmapped step (sites x
        batch size), which bounds its activations.

    Returns:
      Per learner, the mean training loss of each epoch.

    Raises:
      ValueError: mismatched lengths, a learner listed twice, an empty
        shard, or images or labels ``fit`` would refuse.
      privacy.BudgetExceeded: a DP learner would go past its target epsilon.
    """
    if not len(learners) == len(shards) == len(learning_rates):
        raise ValueError(f"{len(learners)} learners, {len(shards)} shards and "
                         f"{len(learning_rates)} learning rates: expected one each")
    if len({id(learner) for learner in learners}) != len(learners):
        raise ValueError("a learner is listed twice")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    checked = []
    for learner, (images, labels) in zip(learners, shards):
        images = learner._checked_images(images)
        labels = learner._checked_labels(labels, len(images))
        if len(images) == 0:
            raise ValueError("fit needs at least one image")
        if learner.dp is not None:
            sample_rate, steps = privacy.batch_sampling(len(images), learner.batch_size)
            learner._check_budget(sample_rate, epochs * steps)
        checked.append((images, labels))

    groups: dict[tuple, list[int]] = {}
    sequential = []
    for index, (learner, (images, _)) in enumerate(zip(learners, checked)):
        if learner.dp is not None:
            sequential.append(index)
            continue
        config = (learner.model_name, learner.num_classes, learner._graphdef, learner._tx,
                  min(learner.batch_size, len(images)), learner.augment, learner.prox_mu,
                  learner.logit_adjustment, images.shape[1:], images.dtype)
        groups.setdefault(config, []).append(index)

    losses: list[list[float] | None] = [None] * len(learners)
    calls = []
    for members in groups.values():
        if len(members) == 1:  # alone in its group: nothing to share, its own fit
            sequential.append(members[0])
            continue
        members.sort(key=lambda index: -len(checked[index][0]))
        sizes = [len(checked[index][0]) for index in members]
        batch_size = min(learners[members[0]].batch_size, sizes[0])  # alike in the group
        calls += _plan_calls(members, sizes, batch_size, checked[members[0]][0][0].nbytes,
                             max_sites_per_call, max_image_bytes, max_step_images)
    for members in calls:
        for index, site_losses in zip(members, _fit_call(
                [learners[index] for index in members], [checked[index] for index in members],
                [learning_rates[index] for index in members], epochs)):
            losses[index] = site_losses
    for index in sorted(sequential):
        losses[index] = learners[index].fit(*checked[index], epochs=epochs,
                                            learning_rate=learning_rates[index])
    return losses


def _plan_calls(members: list[int], sizes: list[int], batch_size: int, image_bytes: int,
                max_sites: int | None, max_image_bytes: int,
                max_step_images: int) -> list[list[int]]:
    """Cuts a group (sorted by shard size, largest first) into calls within budget."""
    calls, start = [], 0
    while start < len(members):
        padded_size = _padded_size(sizes[start], batch_size)
        limit = min(max_image_bytes // (padded_size * image_bytes),
                    max_step_images // batch_size,
                    max_sites if max_sites is not None else len(members))
        take = min(_rows_at_most(max(limit, 1)), len(members) - start)
        calls.append(members[start:start + take])
        start += take
    return calls


def _padded_size(largest: int, batch_size: int) -> int:
    """Examples per site in a call whose largest shard is ``largest``: the most
    that still gives the same number of batches, so calls whose largest
    shards cut into as many batches share a compiled program."""
    return (largest // batch_size + 1) * batch_size - 1


def _fit_call(learners: list[Learner], shards: list[tuple[np.ndarray, np.ndarray]],
              learning_rates: list[float | None], epochs: int) -> list[list[float]]:
    """Trains compatible learners in one vmapped program per epoch."""
    first = learners[0]
    sizes = [len(images) for images, _ in shards]
    batch_size = min(first.batch_size, sizes[0])
    padded_size = _padded_size(max(sizes), batch_size)
    count, rows = len(learners), padded_rows(len(learners))
    images = np.zeros((rows, padded_size) + shards[0][0].shape[1:], shards[0][0].dtype)
    labels = np.zeros((rows, padded_size), np.int32)
    for row, (site_images, site_labels) in enumerate(shards):
        images[row, :len(site_images)] = site_images
        labels[row, :len(site_labels)] = site_labels
    num_valid = np.array(sizes + [padded_size] * (rows - count), np.int32)
    # Padding rows run no step (0 batches): their state never changes.
    num_batches = np.array([size // batch_size for size in sizes] + [0] * (rows - count),
                           np.int32)
    states = []
    for learner, learning_rate in zip(learners, learning_rates):
        if learning_rate is not None:
            learner._state = learner._state._replace(
                opt_state=_with_learning_rate(learner._state.opt_state, learning_rate))
        states.append(learner._state)
    stacked = _stack(states + [states[0]] * (rows - count))
    # A copy: the stacked parameters are donated to the first epoch.
    anchors = (jax.tree_util.tree_map(jnp.copy, stacked.params) if first.prox_mu else None)
    shifts = [learner.logit_shift(site_labels) for learner, (_, site_labels) in zip(learners, shards)]
    # Padding rows train nothing; any shift of the right shape will do.
    logit_shifts = None if shifts[0] is None else jnp.stack(shifts + [shifts[0]] * (rows - count))
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    num_valid, num_batches = jnp.asarray(num_valid), jnp.asarray(num_batches)
    epoch_losses = []
    for _ in range(epochs):
        stacked, loss = train_epoch_together(
            stacked, images, labels, num_valid, num_batches, graphdef=first._graphdef,
            tx=first._tx, batch_size=batch_size, augment=first.augment,
            prox_mu=first.prox_mu, anchors=anchors, logit_shifts=logit_shifts)
        epoch_losses.append(loss)
    for learner, state in zip(learners, _unstack(stacked, count)):
        learner._state = state
    losses = np.asarray(jnp.stack(epoch_losses)) if epochs else np.zeros((0, rows))
    return [[float(loss) for loss in losses[:, row]] for row in range(count)]
