"""Differentially private SGD (DP-SGD, Abadi et al. 2016) and its accounting.

The gradient side is pure JAX and runs inside the training epoch's
``lax.scan``: per-example gradients by ``jax.vmap``, each clipped to L2 norm
C, summed, Gaussian noise N(0, (sigma * C)^2) added per coordinate, divided
by the expected batch size. The accounting side asks Google's ``dp-accounting``
library (PLD accountant, Poisson-subsampled Gaussian mechanism).

BatchNorm: in train mode a BatchNorm layer normalizes with statistics of the
whole batch, so one example's gradient would depend on the others and
clipping it would not bound that example's influence. DP training therefore
runs the model in inference mode: BatchNorm normalizes with its running
statistics, held constant, and those statistics are neither trained nor
updated from private data (they stay as initialized or as received from the
federation). Each per-example gradient then depends on its own example only.
Inference mode also turns dropout off. A model frozen that way runs unnormalised;
``scatter-linear`` (a linear head on fixed scattering features) and ``small-cnn-dp``
(GroupNorm, per example) are the ones to train with DP-SGD.

What the reported epsilon means: the (epsilon, delta) of the Poisson-
subsampled Gaussian mechanism with sampling rate q = batch_size / N, composed
over the steps taken, for example-level add/remove neighbours within one
site's shard, and the training does what that analysis assumes: each DP-SGD
step includes every example independently with probability q
(``poisson_sample``), round(N / batch_size) steps make an epoch, and the
noisy sum is divided by the expected batch size q N. A step's sample is
processed in fixed-shape chunks of ``poisson_capacity`` slots (padded slots
masked out); the rare sample larger than one chunk is processed in full by
further chunks, never truncated, so the number is the accountant's guarantee
for the released models, with nothing added to delta. (Only the running time
of such a step, one in a million or fewer, shows that its sample was large;
timing side channels are outside this analysis, as in DP-SGD generally.)
With logit adjustment, the site also uses its class counts, released once with
discrete Laplace noise (``noisy_class_counts``, ``DPConfig.label_prior_epsilon``);
the reported epsilon composes that release with the steps.

Secrecy: the guarantee holds only if nobody else can reproduce a site's noise
or sample. ``Learner`` keys both from a per-site secret (``training_secret``,
drawn from the OS CSPRNG by the node, checkpointed, never sent); a learner
keyed from the public seed alone is for reproducible research runs, since any
site that knows the topology can regenerate and subtract its noise.

Example:
    >>> eps = privacy_spent(noise_multiplier=1.1, sample_rate=0.01,
    ...                     steps=1000, delta=1e-5)
    >>> 0 < eps < 2
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Bisection for noise_for_target stops when the bracket is this narrow (relative).
_NOISE_RELATIVE_TOLERANCE = 1e-4
# Noise multipliers searched by noise_for_target lie in this range (below 0.1 the epsilon
# is in the thousands, and the PLD accountant takes seconds per evaluation there).
_MIN_NOISE, _MAX_NOISE = 1e-1, 1e3
# The PLD accountant's grid of privacy-loss values (rounded pessimistically): 1e-4 gave
# the same epsilon to four decimals at ten times the time (0.03-0.2 s an evaluation here).
_PLD_DISCRETIZATION = 1e-3
# A budget check forgives this relative excess: composing rounds one by one and
# all at once (as noise_for_target plans) differ by float rounding only.
_BUDGET_RELATIVE_SLACK = 1e-9
# The default delta is at most this (and at most a tenth of 1/N).
_MAX_DEFAULT_DELTA = 1e-5
# A step's Poisson sample outgrows one chunk of poisson_capacity slots at most this
# often. Overflow is processed, not dropped, so this trades padding (compute) against
# how often a step runs longer, not privacy.
_OVERFLOW_PROBABILITY = 1e-6

# Under DP with logit adjustment, the share of a site's target epsilon spent on its noisy
# class counts, composed with the steps: 5% of the budget raises the DP-SGD noise by 1.4-2.2%
# (epsilon 1, 3 and 8; shards of 83 to 547 images).
LABEL_PRIOR_SHARE = 0.05

# The batch sampling the accountant assumes and the training does (reported with epsilon).
SAMPLING = "poisson"


class BudgetExceeded(ValueError):
    """Training would spend more than the privacy budget; nothing was trained."""


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings of a Learner (hashable: it is a static argument of the jit).

    Attributes:
      clip_norm: C, the L2 norm each example's full gradient is clipped to.
      noise_multiplier: sigma; the noise's standard deviation is sigma * C.
      target_epsilon: if given, ``Learner.fit`` refuses to train past this
        epsilon at ``delta``.
      delta: the delta of the budget and of reported epsilons.
      label_prior_epsilon: spent once, on the shard's class counts with
        discrete Laplace noise (``noisy_class_counts``), for logit adjustment
        under DP; 0: no counts are released and the learner trains without it.
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 1.1
    target_epsilon: float | None = None
    delta: float = 1e-5
    label_prior_epsilon: float = 0.0

    def __post_init__(self):
        if self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        if not self.label_prior_epsilon >= 0:
            raise ValueError(f"label_prior_epsilon must be >= 0, got {self.label_prior_epsilon}")


# -- gradients --------------------------------------------------------------------


def per_example_grads(example_loss: Callable, params, images: jax.Array,
                      labels: jax.Array):
    """Loss and gradient of each example separately.

    Args:
      example_loss: ``example_loss(params, image, label) -> scalar`` for ONE
        example (no batch axis); it must not look at other examples.
      params: the pytree differentiated.
      images: (B, ...) examples.
      labels: (B,) labels.

    Returns:
      (losses of shape (B,), gradients shaped like ``params`` with a leading B axis).
    """
    return jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))(
        params, images, labels)


def per_example_norms(grads) -> jax.Array:
    """(B,) L2 norms of each example's full gradient (all leaves together)."""
    squares = [jnp.sum(jnp.square(leaf).reshape(leaf.shape[0], -1), axis=1)
               for leaf in jax.tree_util.tree_leaves(grads)]
    return jnp.sqrt(sum(squares))


def clip_per_example(grads, clip_norm: float):
    """Scales each example's gradient down to L2 norm at most ``clip_norm``.

    Args:
      grads: per-example gradients (leading batch axis on every leaf).
      clip_norm: C.

    Returns:
      Gradients of the same shape; examples with norm <= C are unchanged.
    """
    norms = per_example_norms(grads)
    # g * min(1, C / ||g||); the maximum avoids 0/0 for a zero gradient.
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))
    return jax.tree_util.tree_map(
        lambda leaf: leaf * scale.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype),
        grads)


def clipped_sum(grads, clip_norm: float, valid: jax.Array | None = None):
    """Sum over the batch of the per-example gradients clipped to L2 norm C.

    Args:
      grads: per-example gradients (leading batch axis B on every leaf).
      clip_norm: C.
      valid: (B,) bool, False for padded slots, whose gradients count as
        exactly zero whatever they hold (even inf or NaN); None: all valid.

    Returns:
      A gradient shaped like one example's.
    """
    clipped = clip_per_example(grads, clip_norm)
    if valid is not None:
        # where, not a product: 0 * inf from a garbage slot would be NaN.
        clipped = jax.tree_util.tree_map(
            lambda leaf: jnp.where(valid.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf, 0),
            clipped)
    return jax.tree_util.tree_map(lambda leaf: leaf.sum(axis=0), clipped)


def noisy_mean(summed, clip_norm: float, noise_multiplier: float, noise_key: jax.Array,
               expected_batch_size: float):
    """(clipped sum + N(0, (sigma * C)^2) per coordinate) / expected batch size.

    Dividing by the expected size q N, not the size drawn, is the standard
    DP-SGD estimator under Poisson sampling: the size drawn depends on the
    data set and is not released.

    The noise comes from JAX's counter-based PRNG under ``noise_key``, which
    the Learner derives from the site's secret. A deployment facing a
    stronger adversary would also want a cryptographic noise generator and
    care for floating-point attacks on Gaussian sampling.
    """
    leaves, treedef = jax.tree_util.tree_flatten(summed)
    keys = jax.random.split(noise_key, len(leaves))
    noisy = [(leaf + noise_multiplier * clip_norm
              * jax.random.normal(key, leaf.shape, leaf.dtype)) / expected_batch_size
             for leaf, key in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


# -- Poisson sampling ---------------------------------------------------------------


def poisson_sample(key: jax.Array, num_examples: int, sample_rate: float
                   ) -> tuple[jax.Array, jax.Array]:
    """One Poisson sample: each example in independently with probability q.

    Args:
      key: PRNG key (secret: whoever has it knows the sample).
      num_examples: N.
      sample_rate: q.

    Returns:
      (indices, count): (N,) int32 indices, those of the ``count`` examples
      drawn first (ascending), then the others; ``count`` an int32 scalar.
    """
    drawn = jax.random.bernoulli(key, sample_rate, (num_examples,))
    indices = jnp.argsort(jnp.logical_not(drawn), stable=True).astype(jnp.int32)
    return indices, drawn.sum(dtype=jnp.int32)


def poisson_capacity(num_examples: int, sample_rate: float,
                     overflow_probability: float = _OVERFLOW_PROBABILITY) -> int:
    """Slots per chunk: the smallest k with P(Binomial(N, q) > k) <= the overflow
    probability, at most N (then a sample never overflows).

    E.g. N = 470, q = 64 / 470: 102 slots (batch 64 +- 7.4).
    """
    from scipy import stats  # here, not at the top: only DP runs pay its import time

    capacity = int(stats.binom.isf(overflow_probability, num_examples, sample_rate))
    while stats.binom.sf(capacity, num_examples, sample_rate) > overflow_probability:
        capacity += 1  # isf is a float inversion: make the bound hold exactly
    return max(1, min(capacity, num_examples))


# -- accounting -----------------------------------------------------------------


def batch_sampling(num_examples: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps per epoch) of DP-SGD on ``num_examples`` examples.

    The expected batch is at most the shard; an epoch is the number of steps
    whose expected batches add up closest to the shard, round(N / batch) (half
    up), at least one: each example is then drawn about once per epoch.
    """
    batch = min(batch_size, num_examples)
    return batch / num_examples, max(1, int(num_examples / batch + 0.5))


def default_delta(num_examples: int) -> float:
    """A delta well below 1/N: min(1e-5, 1 / (10 N)).

    A mechanism that publishes one random example in the clear is
    (0, 1/N)-DP, so a delta near 1/N promises nothing; 1e-5 is the customary
    value for shards of up to 10,000 examples, 1/(10 N) keeps the same margin
    for larger ones.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    return min(_MAX_DEFAULT_DELTA, 0.1 / num_examples)


def noisy_class_counts(labels: np.ndarray, num_classes: int, epsilon: float,
                       key: jax.Array) -> np.ndarray:
    """A shard's class counts, epsilon-DP: each count plus discrete Laplace noise.

    Adding or removing one example changes one count by one (the histogram's L1
    sensitivity is 1), so noise with P(k) proportional to exp(-epsilon |k|) on every
    count is epsilon-DP (the geometric mechanism, Ghosh et al. 2009). It is drawn as
    the difference of two geometric variables, on integers: no floating-point
    Laplace sample whose low bits could leak the count (Mironov 2012). Counts
    below 0 become 0 (post-processing).

    Args:
      labels: the shard's integer labels.
      num_classes: K.
      epsilon: > 0.
      key: a key no other site can derive (the learner's secret stream).

    Returns:
      int64 (K,) noisy counts.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    counts = np.bincount(np.asarray(labels).reshape(-1), minlength=num_classes)[:num_classes]
    success = -np.expm1(-epsilon)  # 1 - exp(-epsilon), exact for small epsilon
    up, down = jax.random.split(key)
    noise = (np.asarray(jax.random.geometric(up, success, (num_classes,)), np.int64)
             - np.asarray(jax.random.geometric(down, success, (num_classes,)), np.int64))
    return np.maximum(counts.astype(np.int64) + noise, 0)


def count_noise_sd(epsilon: float) -> float:
    """The standard deviation of ``noisy_class_counts``' noise at ``epsilon``.

    Discrete Laplace with p = exp(-epsilon) has variance 2p / (1 - p)^2: about 3.5
    counts at epsilon 0.4, 9.4 at 0.15, 28 at 0.05.
    """
    p = math.exp(-epsilon)
    return math.sqrt(2 * p) / -math.expm1(-epsilon)


def within_budget(epsilon: float, budget: float) -> bool:
    """Whether ``epsilon`` stays within ``budget`` (up to float rounding)."""
    return epsilon <= budget * (1 + _BUDGET_RELATIVE_SLACK)


def epsilon_of_rounds(noise_multiplier: float, rounds: list[tuple[float, int]],
                      delta: float, released_epsilon: float = 0.0) -> float:
    """Epsilon of rounds of DP-SGD steps with one noise multiplier, and of one
    pure-DP release beside them (the noisy class counts).

    Accounted by the privacy loss distribution (PLD) of ``dp-accounting``: each round's
    Poisson-subsampled Gaussian steps and the release (as the worst case of a pure
    epsilon-DP mechanism, which dominates the discrete Laplace counts) composed exactly,
    on a grid rounded pessimistically, so the result is an upper bound within about 1e-3
    of the true epsilon. The RDP accountant used before overstated it (8 where it is 7.2,
    3 where it is 2.7, for a 547-image shard's 90 steps): a target is now met with 6-8%
    less noise.

    Args:
      noise_multiplier: sigma.
      rounds: (sample_rate, steps) of each round, e.g. of each ``fit`` on a
        shard of its own size.
      delta: the delta of the (epsilon, delta) guarantee.
      released_epsilon: the epsilon of a pure epsilon-DP release of the same
        shard (0: none).

    Returns:
      epsilon of the composition (``inf`` for steps without noise, 0 for
      nothing done).
    """
    steps_at_rate: dict[float, int] = {}
    for sample_rate, steps in rounds:
        if steps > 0:
            steps_at_rate[sample_rate] = steps_at_rate.get(sample_rate, 0) + steps
    if not steps_at_rate:
        return float(released_epsilon)
    if noise_multiplier == 0:
        return float("inf")
    return _composed_epsilon(noise_multiplier, tuple(sorted(steps_at_rate.items())), delta, released_epsilon)


@functools.lru_cache(maxsize=1024)
def _composed_epsilon(noise_multiplier: float, steps_at_rate: tuple[tuple[float, int], ...], delta: float,
                      released_epsilon: float) -> float:
    """``epsilon_of_rounds`` for steps grouped by sampling rate; cached, as every budget
    check of a site composes the same rounds again."""
    from dp_accounting.pld import common, privacy_loss_distribution  # only DP runs import them

    composed = None
    for sample_rate, steps in steps_at_rate:
        rounds = privacy_loss_distribution.from_gaussian_mechanism(
            noise_multiplier, sampling_prob=sample_rate,
            value_discretization_interval=_PLD_DISCRETIZATION).self_compose(steps)
        composed = rounds if composed is None else composed.compose(rounds)
    if released_epsilon:
        composed = composed.compose(privacy_loss_distribution.from_privacy_parameters(
            common.DifferentialPrivacyParameters(released_epsilon, 0.0),
            value_discretization_interval=_PLD_DISCRETIZATION))
    return float(composed.get_epsilon_for_delta(delta))


def privacy_spent(noise_multiplier: float, sample_rate: float, steps: int,
                  delta: float, released_epsilon: float = 0.0) -> float:
    """Epsilon of DP-SGD after some steps (``epsilon_of_rounds``: PLD accountant).

    Args:
      noise_multiplier: sigma.
      sample_rate: batch size / number of examples.
      steps: optimizer steps taken.
      delta: the delta of the (epsilon, delta) guarantee.
      released_epsilon: see ``epsilon_of_rounds``.

    Returns:
      epsilon (``inf`` with no noise, 0 for nothing done).
    """
    return epsilon_of_rounds(noise_multiplier, [(sample_rate, steps)], delta, released_epsilon)


def noise_for_target(epsilon: float, delta: float, sample_rate: float,
                     steps: int, released_epsilon: float = 0.0) -> float:
    """The smallest noise multiplier whose ``privacy_spent`` is at most ``epsilon``.

    Bisection on the accountant (epsilon falls as the noise grows); the
    result errs on the private side.

    Args:
      epsilon: target epsilon.
      delta: target delta.
      sample_rate: batch size / number of examples.
      steps: optimizer steps planned.
      released_epsilon: a pure-DP release planned beside them (``epsilon_of_rounds``).

    Returns:
      sigma, within a relative 1e-4 of the exact answer.

    Raises:
      ValueError: the target needs a noise multiplier above 1000.
    """
    def spent(noise):
        return privacy_spent(noise, sample_rate, steps, delta, released_epsilon)

    high = _MAX_NOISE
    if spent(high) > epsilon:
        raise ValueError(f"epsilon={epsilon} needs a noise multiplier above {_MAX_NOISE}")
    # Halving from the top, so that the accountant never evaluates far smaller noise
    # than the answer (the PLD accountant slows as the noise shrinks).
    while high / 2 >= _MIN_NOISE and spent(high / 2) <= epsilon:
        high /= 2
    low = high / 2
    if low < _MIN_NOISE:
        return high
    while high - low > _NOISE_RELATIVE_TOLERANCE * high:
        middle = (low + high) / 2
        if spent(middle) <= epsilon:
            high = middle
        else:
            low = middle
    return high
