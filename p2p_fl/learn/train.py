"""Training and inference of one site's model, after Flax's examples/mnist train.py.

The pure core is ``loss_fn``, ``train_step``, ``dp_train_step``,
``plain_epoch`` and ``train_epoch``: one epoch is a single jitted call that
samples and augments on the device and runs ``lax.scan`` over the steps, so
no Python runs per step. Plain training shuffles and cuts fixed-size
batches, with an order and step keys defined per index so that a padded
shard trains as the shard alone (``together`` vmaps ``plain_epoch`` over many
sites); DP-SGD draws each step's batch by Poisson sampling, as its
accountant assumes (``privacy``).
``Learner`` wraps them with the state a site keeps (weights, BatchNorm
statistics, optimizer state, PRNG key) and the flat ``dict[str, np.ndarray]``
view of the weights that crosses into the federation.

Example:
    >>> learner = Learner("small-cnn", num_classes=2, image_shape=(28, 28, 1))
    >>> losses = learner.fit(images, labels, epochs=2)          # doctest: +SKIP
    >>> peer.set_weights(learner.get_weights())                 # doctest: +SKIP
"""

from __future__ import annotations

import collections
import functools
import hashlib
import threading
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from p2p_fl.learn import metrics, privacy
from p2p_fl.learn.models import build_model, count_params
from p2p_fl.learn.privacy import DPConfig

# Random shifts of up to this many pixels in each direction augment training.
MAX_SHIFT_PX = 2
# Domain separation for the training key derived from a site's secret.
_SECRET_KEY_CONTEXT = b"p2p_fl/learn/train: training key v1\x00"
# A training secret has at least this many bytes (128 bits).
_MIN_SECRET_BYTES = 16

# predict_proba's recent answers by digest of (model, weights, images, batch size): the sites
# of one process that hold the same model (on the complete graph, every round's average)
# score the shared test set once, not once each. Same inputs, same compiled program: the
# same probabilities, so nothing but time changes.
_PREDICTIONS: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
_PREDICTIONS_KEPT = 32
_PREDICTIONS_LOCK = threading.Lock()  # a group process scores from its training thread and its main one


def make_optimizer(name: str = "adam", learning_rate: float = 1e-3,
                   weight_decay: float = 0.0,
                   momentum: float = 0.9) -> optax.GradientTransformation:
    """Builds an optimizer whose hyperparameters live in its state.

    ``optax.inject_hyperparams`` keeps the learning rate (and the other
    numeric hyperparameters) in ``opt_state.hyperparams``, so changing it
    between epochs does not recompile the training step.

    Args:
      name: ``"adam"`` and ``"sgd"`` (weight decay added to the gradient as
        an L2 term) or ``"adamw"`` (decoupled weight decay).
      learning_rate: initial learning rate.
      weight_decay: weight decay coefficient.
      momentum: SGD momentum (ignored by the Adam variants).

    Returns:
      The optax gradient transformation.

    Raises:
      ValueError: unknown optimizer name.
    """
    if name == "adam":
        factory, hyperparams = _adam_with_l2, {"weight_decay": weight_decay}
    elif name == "adamw":
        factory, hyperparams = optax.adamw, {"weight_decay": weight_decay}
    elif name == "sgd":
        factory, hyperparams = _sgd_with_l2, {"weight_decay": weight_decay,
                                              "momentum": momentum}
    else:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: adam, adamw, sgd")
    return optax.inject_hyperparams(factory)(learning_rate=learning_rate, **hyperparams)


def _adam_with_l2(learning_rate, weight_decay):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


def _sgd_with_l2(learning_rate, weight_decay, momentum):
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))


# Learners configured alike share one optimizer object, hence one compiled
# training epoch (the optimizer is a static argument of the jit).
_shared_optimizer = functools.lru_cache(maxsize=None)(make_optimizer)


class TrainState(NamedTuple):
    """Everything a training step reads and replaces (a pytree)."""

    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    key: jax.Array


def to_float_images(images: jax.Array) -> jax.Array:
    """uint8 pixels to float32 in [0, 1]; float images pass through as float32."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def random_shift(images: jax.Array, key: jax.Array, max_shift: int = MAX_SHIFT_PX
                 ) -> jax.Array:
    """Shifts each NHWC image by up to ``max_shift`` pixels, repeating the edge."""
    _, height, width, channels = images.shape
    pad = (max_shift, max_shift)
    padded = jnp.pad(images, ((0, 0), pad, pad, (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                     (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy: sigmoid for a single logit, softmax otherwise."""
    if logits.shape[-1] == 1:
        return optax.sigmoid_binary_cross_entropy(
            logits[:, 0], labels.astype(logits.dtype)).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """How many of ``labels`` fall in each of the ``num_classes`` classes."""
    return np.bincount(np.asarray(labels).reshape(-1), minlength=num_classes)[:num_classes]


def label_log_prior(counts: np.ndarray, pseudo_count: float = 1.0) -> np.ndarray:
    """The logit shift of logit adjustment for a shard's class counts (smoothed).

    Binary models (2 counts) have one logit: ``[log((positives + s) / (negatives + s))]``
    with ``s = pseudo_count``; K classes: ``log((count_k + s) / (N + K s))`` per class.
    Added to the training logits, the shift explains the shard's own class mix, so the
    gradients fit the features rather than the site's base rate (Menon et al. 2021,
    "Long-tail learning via logit adjustment"; FedLC, Zhang et al. 2022, for
    label-skewed sites). Prediction uses the raw logits: a model trained so scores as
    if the classes were equally common. Exact counts take add-one smoothing; noisy
    ones a pseudo-count as large as their noise (``privacy.count_noise_sd``), which
    shrinks the shift towards none as far as the noise could have made it.

    Returns:
      float32 of shape (1,) for ``num_classes`` 2, else (num_classes,).
    """
    counts = np.asarray(counts, np.float64)
    if len(counts) == 2:
        return np.array([np.log((counts[1] + pseudo_count) / (counts[0] + pseudo_count))], np.float32)
    return np.log((counts + pseudo_count) / (counts.sum() + len(counts) * pseudo_count)).astype(np.float32)


def loss_fn(params: nnx.State, batch_stats: nnx.State, graphdef: nnx.GraphDef,
            images: jax.Array, labels: jax.Array, dropout_key: jax.Array,
            logit_shift: jax.Array | None = None) -> tuple[jax.Array, nnx.State]:
    """Training loss of one batch and the BatchNorm statistics it updates.

    Args:
      params: model parameters (differentiated).
      batch_stats: BatchNorm running statistics before the batch.
      graphdef: the model's structure from ``nnx.split``.
      images: (B, H, W, C) float32 images.
      labels: (B,) int32 labels.
      dropout_key: PRNG key for dropout.
      logit_shift: added to every example's logits before the loss
        (``label_log_prior``), or None.

    Returns:
      (loss, batch statistics after the batch).
    """
    # copy=True: BatchNorm writes its statistics into this traced copy, not
    # into Variables created outside the gradient's trace.
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model(images, train=True, rngs=nnx.Rngs(dropout=dropout_key))
    if logit_shift is not None:
        logits = logits + logit_shift
    return cross_entropy(logits, labels), nnx.state(model, nnx.BatchStat)


def example_loss_fn(params: nnx.State, batch_stats: nnx.State, graphdef: nnx.GraphDef,
                    image: jax.Array, label: jax.Array,
                    logit_shift: jax.Array | None = None) -> jax.Array:
    """Loss of ONE example (no batch axis) for DP-SGD's per-example gradients.

    The model runs in inference mode: BatchNorm uses its running statistics
    as constants, so the loss depends on this example alone (see
    ``privacy``'s module docstring); dropout is off. ``logit_shift``: as in
    ``loss_fn`` (under DP, from the released noisy counts: a constant here).
    """
    model = nnx.merge(graphdef, params, batch_stats)
    logits = model(image[None], train=False)
    if logit_shift is not None:
        logits = logits + logit_shift
    return cross_entropy(logits, label[None])


def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
               step_key: jax.Array, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, augment: bool,
               prox_mu: float = 0.0, anchor: nnx.State | None = None,
               logit_shift: jax.Array | None = None) -> tuple[TrainState, jax.Array]:
    """One optimizer step on one batch of raw (uint8 or float) images, without DP
    (DP-SGD samples its own batches: ``dp_train_step``).

    With ``prox_mu`` > 0 (FedProx), the gradient of
    (mu / 2) * ||params - anchor||^2 is added; the returned loss is the data
    loss alone. ``logit_shift``: see ``loss_fn``.

    Returns:
      (new state, batch loss). ``state.key`` is left alone: the epoch owns it.
    """
    shift_key, dropout_key = jax.random.split(step_key)
    images = to_float_images(images)
    if augment:
        images = random_shift(images, shift_key)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, graphdef, images, labels, dropout_key, logit_shift)
    if prox_mu:  # a static float: mu = 0 compiles the plain step, bit for bit
        grads = prox_gradient(grads, state.params, anchor, prox_mu)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, batch_stats, opt_state, state.key), loss


def prox_gradient(grads: nnx.State, params: nnx.State, anchor: nnx.State,
                  prox_mu: float) -> nnx.State:
    """``grads`` plus the gradient of FedProx's (mu / 2) * ||params - anchor||^2.

    Under DP-SGD this is added to the already clipped and noised gradient: it
    depends on the current weights and the model that arrived, never on an
    example, so it is post-processing and costs no privacy (clipping it would
    only bias the proximal pull).
    """
    return jax.tree_util.tree_map(lambda g, w, a: g + prox_mu * (w - a),
                                  grads, params, anchor)


def clipped_gradient_sum(params: nnx.State, batch_stats: nnx.State,
                         images: jax.Array, labels: jax.Array, valid: jax.Array, *,
                         graphdef: nnx.GraphDef, clip_norm: float,
                         logit_shift: jax.Array | None = None
                         ) -> tuple[jax.Array, nnx.State]:
    """Sums of the losses and of the clipped per-example gradients of one chunk.

    Args:
      params: model parameters.
      batch_stats: BatchNorm statistics (constants under DP).
      images: (K, H, W, C) float32 images, augmented already.
      labels: (K,) int32 labels.
      valid: (K,) bool, False for padded slots: they add exactly nothing,
        whatever they hold.
      graphdef: the model's structure.
      clip_norm: C.
      logit_shift: see ``example_loss_fn``.

    Returns:
      (sum of the valid examples' losses, sum of their clipped gradients).
    """
    def example_loss(params, image, label):
        return example_loss_fn(params, batch_stats, graphdef, image, label, logit_shift)

    losses, example_grads = privacy.per_example_grads(example_loss, params, images, labels)
    return (jnp.where(valid, losses, 0).sum(),
            privacy.clipped_sum(example_grads, clip_norm, valid))


def dp_train_step(state: TrainState, images: jax.Array, labels: jax.Array,
                  step_key: jax.Array, *, graphdef: nnx.GraphDef,
                  tx: optax.GradientTransformation, augment: bool, dp: DPConfig,
                  sample_rate: float, capacity: int, prox_mu: float = 0.0,
                  anchor: nnx.State | None = None,
                  logit_shift: jax.Array | None = None) -> tuple[TrainState, jax.Array]:
    """One DP-SGD step on a Poisson sample of the whole shard.

    Each example is in the step's batch independently with probability
    ``sample_rate`` (q), as the accountant assumes. The sample is processed
    in chunks of ``capacity`` slots, padded and masked, so one compiled
    program serves every batch size; the first chunk always runs, and a
    ``lax.while_loop`` runs more only when the sample outgrows it (rare: see
    ``privacy.poisson_capacity``): no drawn example is ever dropped, so the
    accountant's epsilon holds with nothing added to delta. The noisy sum of
    clipped gradients is divided by the expected batch size q N. BatchNorm
    statistics stay unchanged; FedProx's term is added as in ``train_step``.

    Args:
      state: the training state; ``state.key`` is left alone (the epoch owns it).
      images: (N, H, W, C) raw images of the whole shard.
      labels: (N,) labels.
      step_key: this step's key (sample, shifts, noise).
      sample_rate: q.
      capacity: slots per chunk, 1..N.
      logit_shift: see ``example_loss_fn``.

    Returns:
      (new state, mean loss of the examples drawn; 0 if none was).
    """
    sample_key, shift_key, noise_key = jax.random.split(step_key, 3)
    num_examples = images.shape[0]
    indices, count = privacy.poisson_sample(sample_key, num_examples, sample_rate)
    # Padding so a chunk's slice never runs off the end (slices would clamp and shift).
    indices = jnp.concatenate([indices, jnp.zeros(capacity, indices.dtype)])

    def chunk(carry):
        index, loss_sum, grad_sum = carry
        start = index * capacity
        slots = jax.lax.dynamic_slice(indices, (start,), (capacity,))
        valid = start + jnp.arange(capacity) < count
        chunk_images = to_float_images(images[slots])
        if augment:
            chunk_images = random_shift(chunk_images, jax.random.fold_in(shift_key, index))
        losses, grads = clipped_gradient_sum(state.params, state.batch_stats, chunk_images,
                                             labels[slots], valid, graphdef=graphdef,
                                             clip_norm=dp.clip_norm, logit_shift=logit_shift)
        return (index + 1, loss_sum + losses,
                jax.tree_util.tree_map(jnp.add, grad_sum, grads))

    def more(carry):
        index = carry[0]
        # The first chunk runs even for an empty sample: the same work every step.
        return (index == 0) | (index * capacity < count)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    _, loss_sum, grad_sum = jax.lax.while_loop(
        more, chunk, (jnp.int32(0), jnp.float32(0), zeros))
    grads = privacy.noisy_mean(grad_sum, dp.clip_norm, dp.noise_multiplier, noise_key,
                               sample_rate * num_examples)
    if prox_mu:
        grads = prox_gradient(grads, state.params, anchor, prox_mu)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = loss_sum / jnp.maximum(count, 1)
    return TrainState(params, state.batch_stats, opt_state, state.key), loss


@functools.partial(jax.jit,
                   static_argnames=("graphdef", "tx", "batch_size", "augment", "dp",
                                    "prox_mu"),
                   donate_argnames=("state",))
def train_epoch(state: TrainState, images: jax.Array, labels: jax.Array, *,
                graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                batch_size: int, augment: bool, dp: DPConfig | None = None,
                prox_mu: float = 0.0, anchor: nnx.State | None = None,
                logit_shift: jax.Array | None = None) -> tuple[TrainState, jax.Array]:
    """One pass over device-resident data, as a single compiled program.

    Plain training (``plain_epoch``) shuffles and drops the last
    ``len(images) % batch_size`` samples of the shuffled order, so that every
    batch has the same shape.
    DP-SGD instead takes ``privacy.batch_sampling``'s round(N / batch_size)
    steps of ``dp_train_step``, each on a Poisson sample with expected size
    ``batch_size``.

    Args:
      state: the training state (donated: do not use it after the call).
      images: (N, H, W, C) uint8 or float images on the device.
      labels: (N,) int32 labels on the device.
      graphdef: the model's structure.
      tx: the optimizer.
      batch_size: samples per step (expected samples with DP), at most N.
      augment: whether to apply random shifts.
      dp: DP-SGD settings, or None for plain training.
      prox_mu: FedProx's mu (0: no proximal term).
      anchor: the parameters the proximal term pulls towards (with prox_mu > 0).
      logit_shift: the shard's ``label_log_prior`` for logit adjustment, or
        None (under DP, the prior of the released noisy counts).

    Returns:
      (new state with an advanced key, mean training loss over the steps).
    """
    num_examples = images.shape[0]
    if dp is not None:
        # The middle key (the plain path's shuffle key) goes unused.
        key, _, steps_key = jax.random.split(state.key, 3)
        # Shapes are static here, so these are Python numbers fixed at tracing.
        sample_rate, num_steps = privacy.batch_sampling(num_examples, batch_size)
        capacity = privacy.poisson_capacity(num_examples, sample_rate)

        def dp_body(state, step_key):
            return dp_train_step(state, images, labels, step_key, graphdef=graphdef, tx=tx,
                                 augment=augment, dp=dp, sample_rate=sample_rate,
                                 capacity=capacity, prox_mu=prox_mu, anchor=anchor,
                                 logit_shift=logit_shift)

        state, losses = jax.lax.scan(dp_body, state, jax.random.split(steps_key, num_steps))
        return state._replace(key=key), losses.mean()

    return plain_epoch(state, images, labels, num_examples, num_examples // batch_size,
                       graphdef=graphdef, tx=tx, batch_size=batch_size, augment=augment,
                       prox_mu=prox_mu, anchor=anchor, logit_shift=logit_shift)


def shuffled_order(shuffle_key: jax.Array, num_valid: int | jax.Array, size: int
                   ) -> jax.Array:
    """A permutation of ``range(size)``: the first ``num_valid`` indices in a
    random order, then the rest (padding) in ascending order.

    Index i's place is decided by its own sort key, the bits of
    ``fold_in(shuffle_key, i)``, so the order of the valid indices does not
    depend on ``size``: a shard padded to any size shuffles exactly as the
    shard alone (what ``fit_together`` relies on). Equal keys (32 bits) keep
    index order.

    Args:
      shuffle_key: the epoch's shuffle key.
      num_valid: how many leading indices are real examples (may be traced).
      size: the (static) padded size.

    Returns:
      (size,) int32 indices.
    """
    index = jnp.arange(size, dtype=jnp.int32)
    padding = (index >= num_valid).astype(jnp.uint32)
    sort_bits = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(shuffle_key, i)))(index)
    sort_bits = jnp.where(padding, jnp.uint32(0), sort_bits)  # padding stays in index order
    _, _, order = jax.lax.sort((padding, sort_bits, index), num_keys=2, is_stable=True)
    return order


def plain_epoch(state: TrainState, images: jax.Array, labels: jax.Array,
                num_valid: int | jax.Array, num_batches: int | jax.Array, *,
                graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                batch_size: int, augment: bool, prox_mu: float = 0.0,
                anchor: nnx.State | None = None, logit_shift: jax.Array | None = None
                ) -> tuple[TrainState, jax.Array]:
    """One epoch of plain (non-DP) training of one site, padding-aware: the
    one definition behind ``train_epoch`` and ``together.fit_together``
    (which ``jax.vmap``s it over sites whose shards are padded to one size).

    The first ``num_valid`` examples are shuffled (``shuffled_order``) and
    cut into ``num_batches`` batches of ``batch_size``, dropping the rest of
    the shuffled order; step b trains with key ``fold_in(steps_key, b)``.
    Both are defined per index, so they do not depend on how far the arrays
    are padded. (Under JAX's default partitionable threefry,
    ``split(key, n)[b]`` equals ``fold_in(key, b)`` for every n, so the step
    keys are those ``split`` gave; ``fold_in`` keeps that true whatever the
    ``jax_threefry_partitionable`` setting.) The scan runs
    ``len(images) // batch_size`` steps; steps from ``num_batches`` on train
    nothing: the state before them (weights, BatchNorm statistics, optimizer
    moments and counters) is selected unchanged, and their losses do not
    count. When ``num_batches`` is a Python int equal to the step count (one
    unpadded shard) no selection is compiled at all.

    Args:
      state: the training state.
      images: (N, H, W, C) raw images, the first ``num_valid`` real.
      labels: (N,) labels.
      num_valid: real examples, 1..N (a Python int or a traced int32).
      num_batches: steps that train, ``num_valid // batch_size``, at least 1
        for a real site (0 for an inert padding row: nothing changes).
      batch_size: examples per step, at most ``num_valid``.
      logit_shift: the site's logit adjustment (``loss_fn``), or None.

    Returns:
      (new state with an advanced key, mean loss over the ``num_batches`` steps).
    """
    key, shuffle_key, steps_key = jax.random.split(state.key, 3)
    max_batches = images.shape[0] // batch_size
    order = shuffled_order(shuffle_key, num_valid, images.shape[0])
    batch_indices = order[:max_batches * batch_size].reshape(max_batches, batch_size)
    steps = jnp.arange(max_batches, dtype=jnp.int32)
    step_keys = jax.vmap(lambda b: jax.random.fold_in(steps_key, b))(steps)
    every_step_trains = isinstance(num_batches, int) and num_batches == max_batches

    def body(state, batch):
        step, indices, step_key = batch
        new, loss = train_step(state, images[indices], labels[indices], step_key,
                               graphdef=graphdef, tx=tx, augment=augment,
                               prox_mu=prox_mu, anchor=anchor, logit_shift=logit_shift)
        if every_step_trains:
            return new, loss
        trains = step < num_batches
        kept = jax.tree_util.tree_map(
            lambda after, before: jnp.where(trains, after, before),
            (new.params, new.batch_stats, new.opt_state),
            (state.params, state.batch_stats, state.opt_state))
        return TrainState(*kept, state.key), jnp.where(trains, loss, 0.0)

    state, losses = jax.lax.scan(body, state, (steps, batch_indices, step_keys))
    if every_step_trains:
        return state._replace(key=key), losses.mean()
    return state._replace(key=key), losses.sum() / jnp.maximum(num_batches, 1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def predict_step(params: nnx.State, batch_stats: nnx.State, images: jax.Array, *,
                 graphdef: nnx.GraphDef) -> jax.Array:
    """Class probabilities of one batch in inference mode.

    Returns:
      (B,) positive-class probabilities for a single-logit model, else (B, K).
    """
    model = nnx.merge(graphdef, params, batch_stats)
    logits = model(to_float_images(images), train=False)
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits[:, 0])
    return jax.nn.softmax(logits)


class _Identity(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


@functools.partial(jax.jit, static_argnames=("graphdef",))
def features_step(params: nnx.State, batch_stats: nnx.State, images: jax.Array, *,
                  graphdef: nnx.GraphDef) -> jax.Array:
    """The head's inputs for one batch in inference mode: the model with its `head` made the
    identity (learn/head_refit.py)."""
    model = nnx.merge(graphdef, params, batch_stats)
    model.head = _Identity()
    return model(to_float_images(images), train=False)


def _leaf_name(path: tuple) -> str:
    """'conv1/kernel' from a pytree path into an nnx.State."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
            parts.append(key.name)  # 'value' is a Variable's payload, not a name.
    return "/".join(parts)


def _leaf_names(tree) -> list[str]:
    return [_leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_array(name: str, value, dtype: np.dtype, shape: tuple) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype != dtype or value.shape != shape:
        raise ValueError(f"tensor {name!r} is {value.dtype}{list(value.shape)}, "
                         f"expected {dtype}{list(shape)}")
    return value


class _InitialModel(NamedTuple):
    graphdef: nnx.GraphDef
    params: nnx.State
    batch_stats: nnx.State
    num_params: int
    batchnorm_prefixes: tuple[str, ...]


@functools.lru_cache(maxsize=8)
def _initial_model(model: str, num_classes: int, channels: int, size: int, seed: int) -> _InitialModel:
    # Built once per process and setting: the sites of an in-process study start from the
    # same model, and building it (Flax's eager initialisers) took 14 ms a site, 14 s of a
    # 1,000-site run.
    module = build_model(model, num_classes=num_classes, in_channels=channels, image_size=size, seed=seed)
    # The filters must cover the whole module: models keep no other state.
    graphdef, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
    return _InitialModel(graphdef, params, batch_stats, count_params(module), _batchnorm_prefixes(module))


def _batchnorm_prefixes(module: nnx.Module) -> tuple[str, ...]:
    """'path/to/bn/' of every BatchNorm layer of a model, as tensor names start."""
    return tuple("/".join(map(str, path)) + "/" for path, node in nnx.iter_graph(module)
                 if isinstance(node, nnx.BatchNorm))


def _check_names(kind: str, given, expected) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        raise ValueError(f"{kind} lacks tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise ValueError(f"{kind} has unknown tensor {unexpected[0]!r} "
                         f"({len(unexpected)} unknown)")


class Learner:
    """One site's model, its training state, and its weights as a flat dict.

    Args:
      model: a name from ``models.MODELS``.
      num_classes: number of classes (2: one logit, sigmoid).
      image_shape: (height, width, channels) of the square input images.
      optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
      learning_rate: initial learning rate.
      weight_decay: weight decay coefficient.
      batch_size: training batch size (reduced to the shard size if larger).
      augment: random shifts of up to ``MAX_SHIFT_PX`` pixels while training.
      seed: public: seeds the initial weights (equal at every site of a
        federation) and, without ``training_secret``, every later random draw
        too, so equal seeds and data give bit-identical training (research
        runs stay reproducible).
      training_secret: this site's secret (at least 16 bytes from the OS
        CSPRNG, e.g. ``secrets.token_bytes(32)``); if given, it alone keys
        all training randomness (batch sampling, shifts, DP noise) through
        SHAKE-256, and the seed only the initial weights. DP-SGD needs it: with
        the key from the public seed any other site can regenerate a site's
        noise and batches and subtract them (the node passes one whenever DP
        is on). The derived key is in ``get_state``, so a resumed learner
        continues the secret stream; the secret never leaves the learner.
      dp: DP-SGD settings (``privacy.DPConfig``), or None for plain training.
        With DP, each step trains on a Poisson sample (``dp_train_step``),
        BatchNorm statistics are frozen and dropout is off while training;
        ``privacy_spent`` reports the epsilon so far and ``fit`` refuses to go
        past ``dp.target_epsilon`` if set.
      prox_mu: FedProx's mu: each ``fit`` adds (mu / 2) * ||w - w0||^2 over
        the trainable parameters to the loss, w0 being the parameters at the
        start of that fit (the model that arrived). 0: plain training.
      logit_adjustment: each ``fit`` adds the shard's ``label_log_prior`` to
        the training logits, so a site's class mix does not pull the shared
        model towards its own base rate. With DP-SGD only if
        ``dp.label_prior_epsilon`` > 0: the prior then comes from noisy class
        counts, released once and counted in ``privacy_spent``.
    """

    def __init__(self, model: str = "small-cnn", *, num_classes: int = 2,
                 image_shape: tuple[int, int, int] = (28, 28, 1), optimizer: str = "adam",
                 learning_rate: float = 1e-3, weight_decay: float = 0.0,
                 batch_size: int = 64, augment: bool = True, seed: int = 0,
                 training_secret: bytes | None = None, dp: DPConfig | None = None,
                 prox_mu: float = 0.0, logit_adjustment: bool = False):
        height, width, channels = image_shape
        if not prox_mu >= 0:
            raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
        if logit_adjustment and dp is not None and not dp.label_prior_epsilon:
            raise ValueError("logit_adjustment with DP-SGD needs dp.label_prior_epsilon > 0: "
                             "the shift depends on the labels, which only a noisy release "
                             "brings under the privacy accounting")
        if height != width:
            raise ValueError(f"images must be square, got image_shape={image_shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.batch_size = batch_size
        self.augment = augment
        self.dp = dp
        self.prox_mu = float(prox_mu)
        self.logit_adjustment = bool(logit_adjustment)
        # (sample_rate, steps) of each fit with DP, for the accountant.
        self._dp_rounds: list[tuple[float, int]] = []
        # Under DP with logit adjustment: the shard's noisy class counts, drawn once.
        self._noisy_counts: np.ndarray | None = None
        initial = _initial_model(model, num_classes, channels, height, seed)
        self.num_params = initial.num_params
        self._graphdef = initial.graphdef
        # Fresh buffers per learner: training donates them.
        params, batch_stats = jax.tree_util.tree_map(jnp.copy, (initial.params, initial.batch_stats))
        self._tx = _shared_optimizer(optimizer, learning_rate, weight_decay)
        key = (jax.random.key(seed) if training_secret is None
               else secret_training_key(training_secret))
        self._state = TrainState(params, batch_stats, _fresh_optimizer_state(params, tx=self._tx), key)
        self._param_names = _leaf_names(params)
        self._stat_names = _leaf_names(batch_stats)
        self._spec = sorted(
            (name, str(leaf.dtype), tuple(leaf.shape))
            for name, leaf in zip(self._param_names + self._stat_names,
                                  jax.tree_util.tree_leaves((params, batch_stats))))
        prefixes = initial.batchnorm_prefixes
        self._batchnorm_names = [name for name, _, _ in self._spec
                                 if name.startswith(prefixes)]

    # -- training and inference ------------------------------------------------

    def fit(self, images: np.ndarray, labels: np.ndarray, epochs: int = 1,
            learning_rate: float | None = None,
            on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
        """Trains on a shard for some epochs.

        Args:
          images: (N, H, W, C) or, for one channel, (N, H, W); uint8 pixels
            or floats in [0, 1].
          labels: (N,) or (N, 1) integer labels.
          epochs: passes over the shard.
          learning_rate: if given, the optimizer's learning rate from now on
            (no recompilation).
          on_epoch: called as ``on_epoch(epoch_index, mean_loss)`` after each
            epoch, e.g. for a progress display.

        Returns:
          The mean training loss of each epoch.

        Raises:
          privacy.BudgetExceeded: with DP and a target epsilon, if these
            epochs would spend more than the budget (nothing is trained then).
        """
        images = self._checked_images(images)
        labels = self._checked_labels(labels, len(images))
        if len(images) == 0:
            raise ValueError("fit needs at least one image")
        sample_rate, steps = privacy.batch_sampling(len(images), self.batch_size)
        if self.dp is not None:  # before logit_shift, which may release the noisy counts
            self._check_budget(sample_rate, epochs * steps)
        logit_shift = self.logit_shift(labels)
        # One transfer per fit; every epoch reads the data on the device.
        images, labels = jnp.asarray(images), jnp.asarray(labels)
        if learning_rate is not None:
            self._state = self._state._replace(
                opt_state=_with_learning_rate(self._state.opt_state, learning_rate))
        batch_size = min(self.batch_size, images.shape[0])
        # A copy: the parameters' own buffers are donated to the first epoch.
        anchor = (jax.tree_util.tree_map(jnp.copy, self._state.params)
                  if self.prox_mu else None)
        losses = []
        for epoch in range(epochs):
            self._state, loss = train_epoch(
                self._state, images, labels, graphdef=self._graphdef, tx=self._tx,
                batch_size=batch_size, augment=self.augment, dp=self.dp,
                prox_mu=self.prox_mu, anchor=anchor, logit_shift=logit_shift)
            if self.dp is not None:
                self._dp_rounds.append((sample_rate, steps))
            losses.append(float(loss))
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
        return losses

    def logit_shift(self, labels: np.ndarray) -> jax.Array | None:
        """What ``fit`` adds to the training logits for this shard's labels: its
        ``label_log_prior`` with ``logit_adjustment``, else None. Under DP the prior
        of the shard's noisy class counts (``privacy.noisy_class_counts`` at
        ``dp.label_prior_epsilon``, smoothed by the noise's standard deviation),
        drawn from the secret stream at the first call and kept (a second draw
        would be a second release): the learner is one site's, trained on one shard."""
        if not self.logit_adjustment:
            return None
        if self.dp is None:
            return jnp.asarray(label_log_prior(class_counts(labels, self.num_classes)))
        if self._noisy_counts is None:
            key, counts_key = jax.random.split(self._state.key)
            self._state = self._state._replace(key=key)
            self._noisy_counts = privacy.noisy_class_counts(
                labels, self.num_classes, self.dp.label_prior_epsilon, counts_key)
        pseudo_count = max(1.0, privacy.count_noise_sd(self.dp.label_prior_epsilon))
        return jnp.asarray(label_log_prior(self._noisy_counts, pseudo_count))

    def steps_per_epoch(self, num_examples: int) -> int:
        """Optimizer steps of one epoch over ``num_examples`` examples: whole batches (at
        most the shard), the rest dropped; under DP-SGD the Poisson steps whose expected
        batches add up to the shard (``privacy.batch_sampling``)."""
        if self.dp is not None:
            return privacy.batch_sampling(num_examples, self.batch_size)[1]
        return num_examples // max(1, min(self.batch_size, num_examples))

    @property
    def dp_sampling(self) -> str | None:
        """How DP-SGD batches are drawn, as the accountant assumes
        (``privacy.SAMPLING``); None without DP."""
        return None if self.dp is None else privacy.SAMPLING

    def privacy_spent(self, delta: float | None = None) -> float:
        """Epsilon spent by DP training so far (see ``privacy`` for what it means).

        Args:
          delta: the delta; ``dp.delta`` if None.

        Returns:
          epsilon; 0 before any DP step.

        Raises:
          ValueError: the learner trains without DP.
        """
        if self.dp is None:
            raise ValueError("privacy_spent needs a Learner built with dp=DPConfig(...)")
        released = self.dp.label_prior_epsilon if self._noisy_counts is not None else 0.0
        return privacy.epsilon_of_rounds(self.dp.noise_multiplier, self._dp_rounds,
                                         self.dp.delta if delta is None else delta, released)

    def _check_budget(self, sample_rate: float, steps: int) -> None:
        if self.dp.target_epsilon is None or steps == 0:
            return
        # A fit with logit adjustment releases the noisy counts if they are not out yet.
        released = self.dp.label_prior_epsilon if self.logit_adjustment else 0.0
        after = privacy.epsilon_of_rounds(self.dp.noise_multiplier,
                                          self._dp_rounds + [(sample_rate, steps)],
                                          self.dp.delta, released)
        if not privacy.within_budget(after, self.dp.target_epsilon):
            raise privacy.BudgetExceeded(
                f"privacy budget exceeded: {steps} more steps would spend epsilon="
                f"{after:.3g} > target {self.dp.target_epsilon:g} at delta={self.dp.delta:g}")

    def predict_proba(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Class probabilities in inference mode (running BatchNorm statistics).

        Images go in batches of ``batch_size``; the last one is padded to the
        next power of two (at least 8), so a few compiled programs serve every
        size, and a small validation split costs what it holds, not a whole
        batch.

        Args:
          images: images as for ``fit``.
          batch_size: images per compiled call (64: on a 2-core CPU small-cnn
            predicts 0.11 ms an image in batches of 32-64, 0.22 ms in 512s).

        Returns:
          (N,) probabilities of class 1 for binary models, else (N, K).
        """
        images = self._checked_images(images)
        count = len(images)
        if count == 0:
            return np.zeros((0,) if self.num_classes == 2 else (0, self.num_classes),
                            np.float32)
        key = self._prediction_key(images, batch_size)
        with _PREDICTIONS_LOCK:
            if key in _PREDICTIONS:
                _PREDICTIONS.move_to_end(key)
                return _PREDICTIONS[key].copy()
        whole, rest = divmod(count, batch_size)
        batches = [images[i * batch_size:(i + 1) * batch_size] for i in range(whole)]
        if rest:
            bucket = min(batch_size, max(8, 1 << (rest - 1).bit_length()))
            batches.append(np.concatenate(
                [images[whole * batch_size:], np.zeros((bucket - rest,) + images.shape[1:], images.dtype)]))
        probs = [predict_step(self._state.params, self._state.batch_stats, batch, graphdef=self._graphdef)
                 for batch in batches]
        result = np.asarray(jnp.concatenate(probs))[:count]
        with _PREDICTIONS_LOCK:
            _PREDICTIONS[key] = result.copy()
            while len(_PREDICTIONS) > _PREDICTIONS_KEPT:
                _PREDICTIONS.popitem(last=False)
        return result

    def head_features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, F) the inputs of the model's `head` layer in inference mode, as float32."""
        images = self._checked_images(images)
        out = []
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            bucket = max(8, 1 << (len(batch) - 1).bit_length()) if len(batch) < batch_size else batch_size
            padded = np.concatenate([batch, np.zeros((bucket - len(batch),) + batch.shape[1:], batch.dtype)])
            out.append(np.asarray(features_step(self._state.params, self._state.batch_stats, padded,
                                                graphdef=self._graphdef))[:len(batch)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _prediction_key(self, images: np.ndarray, batch_size: int) -> bytes:
        digest = hashlib.sha256(repr((self.model_name, self.num_classes, self.image_shape, batch_size,
                                      images.shape, str(images.dtype))).encode())
        for leaf in jax.tree_util.tree_leaves((self._state.params, self._state.batch_stats)):
            digest.update(np.ascontiguousarray(leaf))
        digest.update(np.ascontiguousarray(images))  # read in place: a large test set is not copied
        return digest.digest()

    def inference_function(self):
        """images (N, H, W, C) float32 in [0, 1] -> probabilities, as ``predict_proba`` gives
        them, with this model's weights fixed in (for ``jax.export``)."""
        params, batch_stats, graphdef = self._state.params, self._state.batch_stats, self._graphdef
        return lambda images: predict_step(params, batch_stats, images, graphdef=graphdef)

    def evaluate(self, test_images: np.ndarray, test_labels: np.ndarray,
                 val_images: np.ndarray | None = None,
                 val_labels: np.ndarray | None = None) -> dict[str, float]:
        """Test metrics, with the binary threshold chosen on validation data if given.

        Empty validation data counts as none (a small site may have none).

        Returns:
          ``metrics.evaluation_report`` of the test (and validation) predictions.
        """
        if val_images is None or len(val_images) == 0:
            val_labels = val_probs = None
        else:
            val_probs = self.predict_proba(val_images)
        return metrics.evaluation_report(test_labels, self.predict_proba(test_images),
                                         self.num_classes, val_labels, val_probs)

    # -- weights at the federation boundary -------------------------------------

    def weight_spec(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor of ``get_weights``, sorted by name."""
        return list(self._spec)

    def batchnorm_names(self) -> list[str]:
        """Names of the BatchNorm tensors (scale, bias, running mean and var),
        sorted: what FedBN keeps at the site."""
        return list(self._batchnorm_names)

    def statistic_names(self) -> list[str]:
        """Names of the running statistics (BatchNorm mean and var): averaged, never trained."""
        return list(self._stat_names)

    def get_weights(self) -> dict[str, np.ndarray]:
        """Parameters and BatchNorm statistics as fresh host arrays.

        Returns:
          {name: array}, e.g. ``"conv1/kernel"``, ``"bn1/mean"``, in
          ``weight_spec`` order.
        """
        leaves = jax.tree_util.tree_leaves((self._state.params, self._state.batch_stats))
        # np.array copies: the device buffers are donated by the next epoch.
        named = dict(zip(self._param_names + self._stat_names,
                         (np.array(leaf) for leaf in leaves)))
        return {name: named[name] for name, _, _ in self._spec}

    def set_weights(self, weights: dict[str, np.ndarray], *,
                    keep: Iterable[str] = ()) -> None:
        """Replaces parameters and BatchNorm statistics; the optimizer state stays.

        Args:
          weights: the names, dtypes and shapes of ``weight_spec``; only the
            names in ``keep`` may be left out.
          keep: tensors that keep their current values when ``weights`` lacks
            them (FedBN: ``batchnorm_names()``, which never travel).

        Raises:
          ValueError: naming the first tensor that is missing, unknown, or of
            the wrong dtype or shape. Nothing is changed then.
        """
        names = [name for name, _, _ in self._spec]
        keep = frozenset(keep)
        if not keep <= set(names):
            raise ValueError(f"keep names unknown tensor {sorted(keep - set(names))[0]!r}")
        _check_names("weights", weights,
                     [name for name in names if name not in keep or name in weights])
        checked = {name: _check_array(name, weights[name], np.dtype(dtype), shape)
                   for name, dtype, shape in self._spec if name in weights}
        current = dict(zip(self._param_names + self._stat_names, jax.tree_util.tree_leaves(
            (self._state.params, self._state.batch_stats))))

        def rebuilt(tree, names):
            leaves = [jnp.array(checked[name]) if name in checked else current[name]
                      for name in names]
            return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), leaves)

        self._state = self._state._replace(
            params=rebuilt(self._state.params, self._param_names),
            batch_stats=rebuilt(self._state.batch_stats, self._stat_names))

    def reset_optimizer(self) -> None:
        """Fresh optimizer state (e.g. for a model that arrived from another
        site), keeping the current learning rate and other hyperparameters."""
        fresh = _fresh_optimizer_state(self._state.params, tx=self._tx)
        self._state = self._state._replace(
            opt_state=fresh._replace(hyperparams=dict(self._state.opt_state.hyperparams)))

    @property
    def learning_rate(self) -> float:
        """The optimizer's current learning rate."""
        return float(self._state.opt_state.hyperparams["learning_rate"])

    # -- checkpoints -------------------------------------------------------------

    def get_state(self) -> dict[str, np.ndarray]:
        """Everything needed to continue training bit-identically, as host arrays.

        Returns:
          {"weight/<name>": ..., "optimizer/<index>": ..., "rng_key": ...,
          "privacy_rounds": ..., "label_counts": ...}: the weights (FedBN's local
          BatchNorm tensors among them), the optimizer state's leaves in pytree
          order, the PRNG key's raw data, one row (noise multiplier, sample rate,
          steps) per DP-SGD epoch so far (float64, (0, 3) without DP), and the
          noisy class counts released under DP (int64, (0,) if none), so that a
          resumed learner keeps the privacy already spent and never draws again.
        """
        state = {f"weight/{name}": value for name, value in self.get_weights().items()}
        for index, leaf in enumerate(jax.tree_util.tree_leaves(self._state.opt_state)):
            state[f"optimizer/{index:04d}"] = np.array(leaf)
        state["rng_key"] = np.array(jax.random.key_data(self._state.key))
        noise = self.dp.noise_multiplier if self.dp is not None else 0.0
        state["privacy_rounds"] = np.array(
            [(noise, rate, steps) for rate, steps in self._dp_rounds],
            np.float64).reshape(-1, 3)
        state["label_counts"] = (np.zeros(0, np.int64) if self._noisy_counts is None
                                 else self._noisy_counts.astype(np.int64))
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restores what ``get_state`` returned (from a learner built alike).

        Raises:
          ValueError: naming the first entry that is missing, unknown, or of
            the wrong dtype or shape. Nothing is changed then.
        """
        opt_leaves, opt_tree = jax.tree_util.tree_flatten(self._state.opt_state)
        key_data = jax.random.key_data(self._state.key)
        expected = {f"weight/{name}": (np.dtype(dtype), shape)
                    for name, dtype, shape in self._spec}
        expected.update({f"optimizer/{index:04d}": (leaf.dtype, leaf.shape)
                         for index, leaf in enumerate(opt_leaves)})
        expected["rng_key"] = (key_data.dtype, key_data.shape)
        _check_names("state", state, [*expected, "privacy_rounds", "label_counts"])
        dp_rounds = self._checked_privacy_rounds(state["privacy_rounds"])
        noisy_counts = self._checked_label_counts(state["label_counts"])
        checked = {name: _check_array(name, state[name], dtype, shape)
                   for name, (dtype, shape) in expected.items()}
        self.set_weights({name[len("weight/"):]: value for name, value in checked.items()
                          if name.startswith("weight/")})
        opt_state = jax.tree_util.tree_unflatten(
            opt_tree, [jnp.array(checked[f"optimizer/{index:04d}"])
                       for index in range(len(opt_leaves))])
        self._state = self._state._replace(
            opt_state=opt_state, key=jax.random.wrap_key_data(jnp.array(checked["rng_key"])))
        self._dp_rounds = dp_rounds
        self._noisy_counts = noisy_counts

    def _checked_label_counts(self, counts) -> np.ndarray | None:
        counts = np.asarray(counts)
        if counts.dtype != np.int64 or counts.shape not in ((0,), (self.num_classes,)):
            raise ValueError(f"tensor 'label_counts' is {counts.dtype}{list(counts.shape)}, "
                             f"expected int64[0] or int64[{self.num_classes}]")
        if not len(counts):
            return None
        if self.dp is None or not self.logit_adjustment:
            raise ValueError("state 'label_counts' holds released class counts; this learner "
                             "trains without DP logit adjustment")
        if np.any(counts < 0):
            raise ValueError("state 'label_counts' holds a negative count")
        return counts.copy()

    def _checked_privacy_rounds(self, rows) -> list[tuple[float, int]]:
        rows = np.asarray(rows)
        if rows.dtype != np.float64 or rows.ndim != 2 or rows.shape[1] != 3:
            raise ValueError(f"tensor 'privacy_rounds' is {rows.dtype}{list(rows.shape)}, "
                             "expected float64[k, 3]")
        if len(rows) and self.dp is None:
            raise ValueError("state 'privacy_rounds' holds DP-SGD steps; this learner has no dp")
        noise = self.dp.noise_multiplier if self.dp is not None else 0.0
        if len(rows) and not np.all(rows[:, 0] == noise):
            raise ValueError(f"state 'privacy_rounds' was trained with noise multiplier "
                             f"{rows[0, 0]:g}, this learner uses {noise:g}")
        rates, steps = rows[:, 1], rows[:, 2]
        if np.any((rates <= 0) | (rates > 1)) or np.any((steps < 0) | (steps != np.round(steps))):
            raise ValueError("state 'privacy_rounds' holds a sample rate outside (0, 1] "
                             "or a step count that is not a whole number >= 0")
        return [(float(rate), int(count)) for rate, count in zip(rates, steps)]

    # -- input checks ------------------------------------------------------------

    def _checked_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3 and self.image_shape[2] == 1:
            images = images[..., None]
        if images.shape[1:] != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(f"expected images of shape (N, {expected}), got {images.shape}")
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be uint8 or float, got {images.dtype}")
        return images

    def _checked_labels(self, labels: np.ndarray, count: int) -> np.ndarray:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape != (count,):
            raise ValueError(f"expected {count} labels, got {labels.size}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), "
                             f"got [{labels.min()}, {labels.max()}]")
        return labels.astype(np.int32)


def secret_training_key(secret: bytes) -> jax.Array:
    """The PRNG key of all training randomness, derived from a site's secret.

    SHAKE-256 (SHA-3) of the secret under a fixed context string, as the raw
    data of a key of JAX's default PRNG; one-way, so the key (checkpointed)
    does not give the secret back.

    Raises:
      ValueError: a secret shorter than 16 bytes, or not bytes.
    """
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(f"training_secret must be at least {_MIN_SECRET_BYTES} bytes "
                         "(e.g. secrets.token_bytes(32))")
    template = jax.random.key_data(jax.random.key(0))  # the default PRNG's key layout
    digest = hashlib.shake_256(_SECRET_KEY_CONTEXT + bytes(secret)).digest(
        template.size * template.dtype.itemsize)
    data = np.frombuffer(digest, template.dtype).reshape(template.shape)
    return jax.random.wrap_key_data(jnp.asarray(data))


@functools.partial(jax.jit, static_argnames=("tx",))
def _fresh_optimizer_state(params, *, tx: optax.GradientTransformation):
    """``tx.init`` as one compiled call: eagerly it is dozens of small JAX operations,
    1.6 ms for small-cnn's Adam, paid by every site at every round (and at its start)."""
    return tx.init(params)


def _with_learning_rate(opt_state, learning_rate: float):
    current = opt_state.hyperparams["learning_rate"]
    hyperparams = {**opt_state.hyperparams,
                   "learning_rate": jnp.asarray(learning_rate, dtype=current.dtype)}
    return opt_state._replace(hyperparams=hyperparams)
