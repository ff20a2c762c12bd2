"""DP-SGD: clipping, the private gradient, accounting, and the Learner's budget."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from flax import nnx
from scipy import optimize, stats

from p2p_fl.data.sources import load_dataset
from p2p_fl.learn.privacy import (
    BudgetExceeded,
    DPConfig,
    batch_sampling,
    clip_per_example,
    clipped_sum,
    count_noise_sd,
    epsilon_of_rounds,
    noise_for_target,
    noisy_class_counts,
    noisy_mean,
    per_example_grads,
    per_example_norms,
    privacy_spent,
)
from p2p_fl.learn.train import Learner, class_counts, cross_entropy, example_loss_fn, label_log_prior

SHARD = 256


class TinyMLP(nnx.Module):
    """No BatchNorm: per-example and batch gradients must agree exactly."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(6, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


@pytest.fixture(scope="module")
def tiny():
    graphdef, params = nnx.split(TinyMLP(nnx.Rngs(0)), nnx.Param)
    inputs = jax.random.normal(jax.random.key(1), (8, 6))
    inputs = inputs.at[:2].multiply(1e4)  # two examples with huge gradients
    labels = jnp.arange(8) % 3

    def example_loss(params, x, label):
        return cross_entropy(nnx.merge(graphdef, params)(x[None]), label[None])

    def batch_loss(params):
        return cross_entropy(nnx.merge(graphdef, params)(inputs), labels)

    return params, inputs, labels, example_loss, batch_loss


@pytest.fixture(scope="module")
def shard():
    data = load_dataset("builtin:pneumoniamnist")
    return data.train.images[:SHARD], data.train.labels[:SHARD]


def test_clipped_norms_never_exceed_clip_norm(tiny):
    params, inputs, labels, example_loss, _ = tiny
    _, grads = per_example_grads(example_loss, params, inputs, labels)
    norms = per_example_norms(grads)
    assert norms[:2].min() > 100  # the huge examples really are huge
    for clip_norm in (0.01, 1.0, 10.0):
        clipped = per_example_norms(clip_per_example(grads, clip_norm))
        assert clipped.max() <= clip_norm * (1 + 1e-5)
        small = norms <= clip_norm  # unclipped examples pass unchanged
        np.testing.assert_allclose(clipped[small], norms[small], rtol=1e-6)


def test_clipped_norms_on_small_cnn_in_dp_mode(shard):
    learner = Learner("small-cnn", dp=DPConfig())
    images = jnp.asarray(shard[0][:4], jnp.float32).reshape(4, 28, 28, 1) / 255.0
    images = images.at[0].multiply(1e3)
    labels = jnp.asarray(shard[1][:4].reshape(-1), jnp.int32)
    state = learner._state

    def example_loss(params, image, label):
        return example_loss_fn(params, state.batch_stats, learner._graphdef, image, label)

    @jax.jit
    def clipped_norms(params):
        _, grads = per_example_grads(example_loss, params, images, labels)
        return per_example_norms(grads), per_example_norms(clip_per_example(grads, 0.5))

    norms, clipped = clipped_norms(state.params)
    assert norms.max() > 0.5
    assert clipped.max() <= 0.5 * (1 + 1e-5)


def test_without_noise_and_clipping_dp_gradient_is_batch_gradient(tiny):
    params, inputs, labels, example_loss, batch_loss = tiny
    _, grads = per_example_grads(example_loss, params, inputs, labels)
    private = noisy_mean(clipped_sum(grads, 1e12), 1e12, 0.0, jax.random.key(0), len(inputs))
    expected = jax.grad(batch_loss)(params)
    for got, want in zip(jax.tree_util.tree_leaves(private),
                         jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_noise_has_the_configured_scale(tiny):
    params, inputs, labels, example_loss, _ = tiny
    _, grads = per_example_grads(example_loss, params, inputs, labels)
    zero = jax.tree_util.tree_map(jnp.zeros_like, grads)
    noisy = noisy_mean(clipped_sum(zero, 2.0), 2.0, 3.0, jax.random.key(0), len(inputs))
    values = np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(noisy)])
    assert np.std(values) == pytest.approx(3.0 * 2.0 / len(inputs), rel=0.15)


def _gaussian_mechanism_exact_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Gaussian steps without sampling: one Gaussian mechanism of noise
    sigma / sqrt(steps), whose exact delta(epsilon) is Balle and Wang's (2018, Theorem 8)."""
    mu = np.sqrt(steps) / noise_multiplier

    def excess(eps):
        return stats.norm.cdf(mu / 2 - eps / mu) - np.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu) - delta

    return optimize.brentq(excess, 1e-6, 100.0)


@pytest.mark.parametrize(("noise", "steps"), [(1.0, 10), (2.0, 50), (4.0, 3)])
def test_epsilon_is_the_exact_one_where_it_is_known(noise, steps):
    """Without sampling the steps compose to one Gaussian mechanism with a closed form:
    the accountant's epsilon is never below it (an upper bound) and within 1% of it."""
    exact = _gaussian_mechanism_exact_epsilon(noise, steps, 1e-5)
    assert exact <= privacy_spent(noise, 1.0, steps, 1e-5) <= exact * 1.01


def test_epsilon_is_an_upper_bound_and_tighter_than_rdp():
    """Subsampled: just above the privacy loss distribution's optimistic estimate (a lower
    bound on the true epsilon, on a finer grid) and below the RDP accountant's bound."""
    noise, rate, steps, delta = 1.0, 0.1, 100, 1e-5
    optimistic = privacy_loss_distribution.from_gaussian_mechanism(
        noise, pessimistic_estimate=False, value_discretization_interval=1e-4,
        sampling_prob=rate).self_compose(steps).get_epsilon_for_delta(delta)
    rdp = rdp_privacy_accountant.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)).get_epsilon(delta)
    spent = privacy_spent(noise, rate, steps, delta)
    assert optimistic <= spent <= optimistic * 1.005
    assert spent < 0.95 * rdp
    assert privacy_spent(noise, rate, 0, delta) == 0.0
    assert privacy_spent(0.0, rate, 10, delta) == float("inf")


def test_rounds_at_different_rates_compose():
    one = epsilon_of_rounds(1.0, [(0.1, 30)], 1e-5)
    assert epsilon_of_rounds(1.0, [(0.1, 10), (0.1, 20)], 1e-5) == one  # the same steps, grouped
    assert epsilon_of_rounds(1.0, [(0.1, 30), (0.2, 10)], 1e-5) > one


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_noise_for_target_hits_the_target(target):
    noise = noise_for_target(target, 1e-5, sample_rate=0.25, steps=8)
    spent = privacy_spent(noise, 0.25, 8, 1e-5)
    assert spent <= target
    assert spent == pytest.approx(target, rel=1e-2)


def test_dp_training_lowers_loss_and_counts_privacy(shard):
    learner = Learner("small-cnn", dp=DPConfig(clip_norm=1.0, noise_multiplier=1.0))
    stats_before = {k: v for k, v in learner.get_weights().items()
                    if k.endswith(("/mean", "/var"))}
    assert learner.privacy_spent() == 0.0
    losses = learner.fit(*shard, epochs=2)
    assert losses[-1] < losses[0]
    assert learner.privacy_spent(1e-5) == pytest.approx(
        privacy_spent(1.0, 64 / SHARD, 2 * SHARD // 64, 1e-5))
    weights = learner.get_weights()
    for name, value in stats_before.items():  # private data never reaches BN stats
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


def test_dp_trains_the_groupnorm_model_whole(shard):
    """small-cnn-dp has no frozen layer under DP: every tensor moves, GroupNorm's too, and
    each example's logit is its own (the same alone as in a batch)."""
    learner = Learner("small-cnn-dp", optimizer="sgd", learning_rate=0.02,
                      dp=DPConfig(clip_norm=5.0, noise_multiplier=1.0))
    images = shard[0][:8]
    alone = np.concatenate([learner.predict_proba(images[i:i + 1]) for i in range(8)])
    np.testing.assert_allclose(learner.predict_proba(images), alone, rtol=1e-5)
    before = learner.get_weights()
    learner.fit(*shard, epochs=1)
    after = learner.get_weights()
    assert learner.batchnorm_names() == []
    assert {"gn1/scale", "gn2/bias"} <= set(after)
    unchanged = [name for name in after if np.array_equal(after[name], before[name])]
    assert unchanged == []


def test_dp_trains_the_scattering_model_s_head_alone(shard):
    """scatter-linear under DP: its only weights are the head's, each example's logit is its
    own (GroupNorm per example, no batch statistics), and DP-SGD lowers its loss."""
    learner = Learner("scatter-linear", optimizer="sgd", learning_rate=0.005,
                      dp=DPConfig(clip_norm=5.0, noise_multiplier=1.0))
    images = shard[0][:8]
    before = learner.get_weights()
    assert sorted(before) == ["head/bias", "head/kernel"]
    losses = learner.fit(*shard, epochs=6)  # momentum 0.9 overshoots in the first epochs
    alone = np.concatenate([learner.predict_proba(images[i:i + 1]) for i in range(8)])
    np.testing.assert_allclose(learner.predict_proba(images), alone, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert not np.array_equal(learner.get_weights()["head/kernel"], before["head/kernel"])


def test_fit_refuses_to_go_past_the_budget(shard):
    budget = privacy_spent(1.0, 64 / SHARD, SHARD // 64, 1e-5) * 1.01
    learner = Learner("small-cnn", dp=DPConfig(noise_multiplier=1.0,
                                               target_epsilon=budget))
    with pytest.raises(ValueError, match="privacy budget exceeded"):
        learner.fit(*shard, epochs=2)
    assert learner.privacy_spent() == 0.0  # nothing was trained
    learner.fit(*shard, epochs=1)
    with pytest.raises(ValueError, match="privacy budget exceeded"):
        learner.fit(*shard, epochs=1)


def test_privacy_spent_needs_dp():
    with pytest.raises(ValueError, match="dp=DPConfig"):
        Learner("small-cnn").privacy_spent(1e-5)


def test_budget_refusal_is_its_own_error_type(shard):
    from p2p_fl.learn.privacy import BudgetExceeded

    learner = Learner("small-cnn", dp=DPConfig(noise_multiplier=1.0, target_epsilon=1e-3))
    with pytest.raises(BudgetExceeded):
        learner.fit(*shard, epochs=1)


def test_checkpoint_keeps_the_privacy_spent(shard):
    dp = DPConfig(noise_multiplier=1.0)
    learner = Learner("small-cnn", seed=4, dp=dp)
    learner.fit(*shard, epochs=1)
    state = learner.get_state()
    assert state["privacy_rounds"].shape == (1, 3)
    resumed = Learner("small-cnn", seed=4, dp=dp)
    resumed.set_state(state)
    assert resumed.privacy_spent() == learner.privacy_spent() > 0
    with pytest.raises(ValueError, match="noise multiplier 1, this learner uses 2"):
        Learner("small-cnn", dp=DPConfig(noise_multiplier=2.0)).set_state(state)
    with pytest.raises(ValueError, match="has no dp"):
        Learner("small-cnn").set_state(state)
    assert Learner("small-cnn").get_state()["privacy_rounds"].shape == (0, 3)


def test_fedprox_under_dp_pulls_towards_the_anchor_at_no_privacy_cost(shard):
    dp = DPConfig(noise_multiplier=1.0)
    start = Learner("small-cnn", seed=6).get_weights()
    moved, spent = {}, {}
    for mu in (0.0, 10.0):
        learner = Learner("small-cnn", seed=6, dp=dp, prox_mu=mu)
        learner.fit(*shard, epochs=1)
        weights = learner.get_weights()
        moved[mu] = np.sqrt(sum(np.sum((weights[n] - start[n]) ** 2) for n in start))
        spent[mu] = learner.privacy_spent()
    assert moved[10.0] < 0.75 * moved[0.0]  # 0.37 against 0.71 here
    assert spent[10.0] == spent[0.0]  # the proximal gradient is post-processing


def test_batch_sampling_and_default_delta():
    from p2p_fl.learn.privacy import default_delta

    assert batch_sampling(100, 32) == (0.32, 3)
    assert batch_sampling(10, 64) == (1.0, 1)  # the batch is at most the shard
    assert default_delta(470) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)


def test_noisy_class_counts_are_the_geometric_mechanism():
    """Each count gets discrete Laplace noise, P(k) ~ exp(-epsilon |k|): unbiased, with its
    variance, and for two shards one example apart every output is at most e^epsilon times
    as likely under one as under the other (20,000 classes: 20,000 draws per count)."""
    epsilon, classes = 0.5, 20_000

    def released(count, key):
        return noisy_class_counts(np.repeat(np.arange(classes), count), classes, epsilon,
                                  jax.random.key(key))

    fifty, forty_nine = released(50, 1), released(49, 2)
    noise = fifty - 50
    assert abs(noise.mean()) < 0.1
    assert noise.var() == pytest.approx(count_noise_sd(epsilon) ** 2, rel=0.05)
    for value in range(47, 54):  # the outputs drawn often enough to compare (>= 1,000 times)
        ratio = np.mean(fifty == value) / np.mean(forty_nine == value)
        assert np.exp(-epsilon) / 1.15 < ratio < np.exp(epsilon) * 1.15, value
    assert released(0, 3).min() == 0  # never a negative count
    np.testing.assert_array_equal(released(50, 1), fifty)  # keyed: one key, one release


def test_a_released_count_composes_with_the_steps():
    steps_only = epsilon_of_rounds(1.0, [(0.1, 100)], 1e-5)
    both = epsilon_of_rounds(1.0, [(0.1, 100)], 1e-5, released_epsilon=0.2)
    assert steps_only < both <= steps_only + 0.2
    assert epsilon_of_rounds(1.0, [], 1e-5, released_epsilon=0.2) == 0.2
    assert noise_for_target(3.0, 1e-5, 0.1, 100, 0.15) > noise_for_target(3.0, 1e-5, 0.1, 100)


def test_dp_logit_adjustment_releases_the_counts_once_and_counts_them(shard):
    images, labels = shard
    dp = DPConfig(noise_multiplier=1.0, label_prior_epsilon=0.1)

    def learner(secret, adjusted=True, dp=dp):
        return Learner("small-cnn-dp", seed=4, dp=dp, optimizer="sgd", learning_rate=0.02,
                       logit_adjustment=adjusted, training_secret=secret * 32)

    adjusted, plain = learner(b"a"), learner(b"a", adjusted=False)
    adjusted.fit(images, labels, epochs=1)
    plain.fit(images, labels, epochs=1)
    assert plain.privacy_spent() < adjusted.privacy_spent() <= plain.privacy_spent() + 0.1
    shift = np.asarray(adjusted.logit_shift(labels))
    exact = label_log_prior(class_counts(labels, 2))
    assert not np.array_equal(shift, exact) and np.all(np.abs(shift - exact) < 1.0)  # noisy, near
    adjusted.fit(images, labels, epochs=1)
    np.testing.assert_array_equal(adjusted.logit_shift(labels), shift)  # drawn once
    state = adjusted.get_state()
    assert state["label_counts"].shape == (2,)
    # Smoothed by as many pseudo-counts as the noise's standard deviation (14 at 0.1).
    np.testing.assert_array_equal(shift, label_log_prior(state["label_counts"], count_noise_sd(0.1)))
    resumed = learner(b"b")
    resumed.set_state(state)  # a restart keeps the release: no second draw, the same epsilon
    np.testing.assert_array_equal(resumed.logit_shift(labels), shift)
    assert resumed.privacy_spent() == adjusted.privacy_spent()
    other = learner(b"c")  # another site's secret: another draw
    assert not np.array_equal(np.asarray(other.logit_shift(labels)), shift)
    with pytest.raises(ValueError, match="without DP logit adjustment"):
        learner(b"a", adjusted=False).set_state(state)


def test_the_release_is_counted_before_any_training(shard):
    images, labels = shard
    rate, steps = batch_sampling(len(images), 64)
    steps_only = epsilon_of_rounds(1.0, [(rate, steps)], 1e-5)
    dp = DPConfig(noise_multiplier=1.0, label_prior_epsilon=0.2, target_epsilon=steps_only * 1.001)
    learner = Learner("small-cnn-dp", dp=dp, optimizer="sgd", logit_adjustment=True,
                      training_secret=b"d" * 32)
    with pytest.raises(BudgetExceeded):  # the steps alone would fit; with the counts they do not
        learner.fit(images, labels, epochs=1)
    assert learner.get_state()["label_counts"].shape == (0,)  # nothing was released
