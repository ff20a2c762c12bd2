"""fit_together: sites trained in one vmapped program end as a fit of each would leave them.

Observed on 2 CPU cores (``adam_runs``: small-cnn, Adam, 2 epochs, shards of
320/130/70 images): losses agree to a relative 3.5e-7 and every tensor to
1.5e-6, except the biases of the convolutions that feed a BatchNorm and
that BatchNorm's running mean (up to 1e-2 at learning rate 3e-3). Those
biases lie in BatchNorm's null space: their gradient is exactly zero in
exact arithmetic, so what each program computes is its own rounding noise,
and Adam divides it by its own tiny RMS into steps of about the learning
rate. With SGD (``test_fedprox_with_sgd_every_tensor_matches``) no step
amplifies the noise and every tensor agrees to 1e-4. Test probabilities
differ by at most 7e-4 and AUCs by less than 6e-4 (on an AMD EPYC with AVX2 only:
4.6e-4 and 1.2e-3, the AUC moved by near-tied pairs).
"""

import jax
import numpy as np
import pytest

from p2p_fl.data.sources import load_dataset
from p2p_fl.learn.metrics import roc_auc
from p2p_fl.learn.privacy import DPConfig
from p2p_fl.learn.together import _plan_calls, fit_together, padded_rows
from p2p_fl.learn.train import Learner, _leaf_names, shuffled_order

EPOCHS = 2
SIZES = (320, 130, 70)  # 5, 2 and 1 batches of 64
RATES = (1e-3, 3e-3, 5e-4)
# small-cnn's conv biases feed a BatchNorm directly (see the module docstring).
BATCHNORM_NULL_SPACE = {"conv1/bias", "conv2/bias", "bn1/mean", "bn2/mean"}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def data():
    return load_dataset("builtin:pneumoniamnist")


def shards_of(data, sizes, start=0):
    shards = []
    for size in sizes:
        shards.append((data.train.images[start:start + size],
                       data.train.labels[start:start + size]))
        start += size
    return shards


def max_difference(first, second, skip=()):
    """Largest absolute difference over the tensors of two weight or state dicts."""
    assert first.keys() == second.keys()
    return max(float(np.max(np.abs(first[name].astype(np.float64) - second[name])))
               for name in first if name not in skip and first[name].size)


def copy_of(learner):
    copy = Learner("small-cnn")
    copy.set_state(learner.get_state())
    return copy


@pytest.fixture(scope="module")
def adam_runs(data):
    """Three sites (5, 2 and 1 batches), each trained alone and together."""
    shards = shards_of(data, SIZES)
    alone = [Learner("small-cnn", seed=site) for site in range(len(SIZES))]
    together = [Learner("small-cnn", seed=site) for site in range(len(SIZES))]
    alone_losses = [learner.fit(*shard, epochs=EPOCHS, learning_rate=rate)
                    for learner, shard, rate in zip(alone, shards, RATES)]
    together_losses = fit_together(together, shards, epochs=EPOCHS, learning_rates=RATES)
    return shards, alone, together, alone_losses, together_losses


def test_together_equals_sequential_fit(adam_runs, data):
    shards, alone, together, alone_losses, together_losses = adam_runs
    np.testing.assert_allclose(together_losses, alone_losses, rtol=1e-5)
    for site, (first, second) in enumerate(zip(alone, together)):
        weights, other = first.get_weights(), second.get_weights()
        # Observed: at most 1.5e-6.
        assert max_difference(weights, other, skip=BATCHNORM_NULL_SPACE) < TOLERANCE, site
        # Adam steps of rounding noise: at most a few learning rates per step.
        steps = EPOCHS * (SIZES[site] // 64)
        assert max_difference(weights, other) < 4 * RATES[site] * steps, site
        assert second.learning_rate == pytest.approx(RATES[site])
        probs, other_probs = (learner.predict_proba(data.test.images)
                              for learner in (first, second))
        gap = float(np.max(np.abs(probs - other_probs)))
        assert gap < 5e-3, site  # observed <= 7e-4
        # The AUCs differ only by the pairs that gap can reorder (a fixed tolerance failed on
        # an AVX2 machine: 1.2e-3 apart from probabilities 4.6e-4 apart, near-ties).
        difference = abs(roc_auc(data.test.labels, probs) - roc_auc(data.test.labels, other_probs))
        assert difference <= reorderable_pairs(data.test.labels, probs, 2 * gap) + 1e-12, site


def reorderable_pairs(labels, probs, gap):
    """The share of (positive, negative) pairs whose scores are within `gap`: the most by
    which the AUC can move when no score moves by more than gap / 2."""
    positives, negatives = probs[labels == 1], probs[labels == 0]
    close = np.abs(positives[:, None] - negatives[None, :]) <= gap
    return float(close.mean())


def test_keys_advance_alike_so_later_training_matches(adam_runs):
    shards, alone, together, _, _ = adam_runs
    for first, second in zip(alone, together):
        np.testing.assert_array_equal(jax.random.key_data(first._state.key),
                                      jax.random.key_data(second._state.key))
    # One more fit of each (on copies: the fixture stays as trained): the
    # same shuffles and steps follow.
    for site, shard in enumerate(shards):
        first, second = (copy_of(learners[site]) for learners in (alone, together))
        np.testing.assert_allclose(second.fit(*shard), first.fit(*shard), rtol=1e-4)
        assert max_difference(first.get_weights(), second.get_weights(),
                              skip=BATCHNORM_NULL_SPACE) < TOLERANCE, site


def adam_moments(learner):
    """Adam's first and second moments by tensor name, e.g. ``"mu/conv1/kernel"``."""
    adam = learner._state.opt_state.inner_state[1][0]  # add_decayed_weights, then adam
    return {f"{kind}/{name}": np.asarray(leaf)
            for kind, tree in (("mu", adam.mu), ("nu", adam.nu))
            for name, leaf in zip(_leaf_names(tree), jax.tree_util.tree_leaves(tree))}


def adam_count(learner):
    return int(learner._state.opt_state.inner_state[1][0].count)


def test_padded_steps_leave_the_optimizer_state_untouched(adam_runs):
    # The 70-image site runs 1 step per epoch in a call of 5 steps: its 4
    # padded steps per epoch must not move its weights, moments or counter.
    _, alone, together, _, _ = adam_runs
    for site, (first, second) in enumerate(zip(alone, together)):
        assert adam_count(second) == adam_count(first) == EPOCHS * (SIZES[site] // 64)
        skip = {f"{kind}/{name}" for kind in ("mu", "nu") for name in BATCHNORM_NULL_SPACE}
        moments, other = adam_moments(first), adam_moments(second)
        for name in moments.keys() - skip:
            # Rounding: observed 3e-4 of the tensor's largest moment.
            np.testing.assert_allclose(other[name], moments[name], rtol=0,
                                       atol=1e-3 * np.abs(moments[name]).max(),
                                       err_msg=f"site {site} {name}")


def test_fedprox_with_sgd_every_tensor_matches(data):
    """FedProx trains batched (each site's anchor its own start), and without
    Adam's normalisation every tensor, null space included, agrees."""
    shards = shards_of(data, (130, 130), start=600)

    def learners():
        return [Learner("small-cnn", seed=site, optimizer="sgd", learning_rate=0.05,
                        prox_mu=0.5) for site in range(2)]

    alone, together = learners(), learners()
    rates = [0.05, 0.02]
    alone_losses = [learner.fit(*shard, epochs=EPOCHS, learning_rate=rate)
                    for learner, shard, rate in zip(alone, shards, rates)]
    together_losses = fit_together(together, shards, epochs=EPOCHS, learning_rates=rates)
    np.testing.assert_allclose(together_losses, alone_losses, rtol=1e-5)
    for first, second in zip(alone, together):
        assert max_difference(first.get_weights(), second.get_weights()) < TOLERANCE
        assert max_difference(first.get_state(), second.get_state()) < TOLERANCE


def test_logit_adjustment_each_site_with_its_own_prior(data):
    """Logit adjustment trains batched, each site shifted by its own shard's label
    counts (one all but one class, one mixed), and lands where each fit would."""
    labels = data.train.labels
    skewed = np.concatenate([np.flatnonzero(labels == 1)[:120], np.flatnonzero(labels == 0)[:10]])
    shards = [(data.train.images[skewed], labels[skewed])] + shards_of(data, (130,), start=900)

    def learners(adjusted=True):
        return [Learner("small-cnn", seed=site, optimizer="sgd", learning_rate=0.05,
                        logit_adjustment=adjusted) for site in range(2)]

    alone, together, plain = learners(), learners(), learners(adjusted=False)
    rates = [0.05, 0.02]
    alone_losses = [learner.fit(*shard, epochs=EPOCHS, learning_rate=rate)
                    for learner, shard, rate in zip(alone, shards, rates)]
    together_losses = fit_together(together, shards, epochs=EPOCHS, learning_rates=rates)
    fit_together(plain, shards, epochs=EPOCHS, learning_rates=rates)
    np.testing.assert_allclose(together_losses, alone_losses, rtol=1e-5)
    for first, second in zip(alone, together):
        assert max_difference(first.get_weights(), second.get_weights()) < TOLERANCE
    # The skewed site's shift changed its training; without it the same call differs.
    assert max_difference(plain[0].get_weights(), together[0].get_weights()) > 100 * TOLERANCE


def test_dp_and_small_sites_mixed_in(data):
    """A DP learner trains by its own fit (bit for bit); two sites smaller
    than a batch train together, in batches of their shard size as fit does."""
    shards = shards_of(data, (150, 40, 40), start=1000)

    def learners():
        return [Learner("small-cnn", seed=0, batch_size=32, dp=DPConfig(),
                        training_secret=b"s" * 16),
                Learner("small-cnn", seed=1), Learner("small-cnn", seed=2)]

    alone, together = learners(), learners()
    rates = [1e-3, 2e-3, 1e-3]
    alone_losses = [learner.fit(*shard, epochs=EPOCHS, learning_rate=rate)
                    for learner, shard, rate in zip(alone, shards, rates)]
    together_losses = fit_together(together, shards, epochs=EPOCHS, learning_rates=rates)
    assert together_losses[0] == alone_losses[0]
    np.testing.assert_allclose(together_losses, alone_losses, rtol=1e-5)
    assert max_difference(alone[0].get_state(), together[0].get_state()) == 0
    assert together[0].privacy_spent() == alone[0].privacy_spent() > 0
    for site in (1, 2):
        assert adam_count(together[site]) == adam_count(alone[site]) == EPOCHS
        assert max_difference(alone[site].get_weights(), together[site].get_weights(),
                              skip=BATCHNORM_NULL_SPACE) < TOLERANCE


def test_calls_are_cut_to_budget_and_padding_rows_are_inert(data):
    """Seven sites in calls of at most 3: 3, 3 (shapes as in ``adam_runs``,
    so nothing compiles anew), then 1 through the same padded program; and
    one by one (``max_sites_per_call=1``, the CPU's choice), alike."""
    sizes = [320] * 7
    assert _plan_calls(list(range(7)), sizes, 64, 784, 3, 1 << 30, 4096) == [
        [0, 1, 2], [3, 4, 5], [6]]
    assert _plan_calls(list(range(7)), sizes, 64, 784, None, 383 * 784 * 2, 4096) == [
        [0, 1], [2, 3], [4, 5], [6]]  # two padded shards fit the byte budget
    assert _plan_calls(list(range(7)), sizes, 64, 784, None, 1 << 30, 64 * 5) == [
        [0, 1, 2, 3, 4], [5, 6]]  # five batches of 64 fit one step
    shards = shards_of(data, sizes, start=0)
    alone = [Learner("small-cnn", seed=site) for site in range(7)]
    together = [Learner("small-cnn", seed=site) for site in range(7)]
    alone_losses = [learner.fit(*shard) for learner, shard in zip(alone, shards)]
    together_losses = fit_together(together, shards, epochs=1, learning_rates=[None] * 7,
                                   max_sites_per_call=3)
    one_by_one = [Learner("small-cnn", seed=site) for site in range(7)]
    one_by_one_losses = fit_together(one_by_one, shards, epochs=1, learning_rates=[None] * 7,
                                     max_sites_per_call=1)
    np.testing.assert_allclose(together_losses, alone_losses, rtol=1e-5)
    np.testing.assert_allclose(one_by_one_losses, alone_losses, rtol=1e-5)
    for first, second, third in zip(alone, together, one_by_one):
        for other in (second, third):
            assert max_difference(first.get_weights(), other.get_weights(),
                                  skip=BATCHNORM_NULL_SPACE) < TOLERANCE


def test_shuffle_does_not_depend_on_padding():
    key = jax.random.key(7)
    order = np.asarray(shuffled_order(key, 50, 50))
    assert sorted(order) == list(range(50))
    for size in (51, 64, 257):
        padded = np.asarray(shuffled_order(key, 50, size))
        np.testing.assert_array_equal(padded[:50], order)
        np.testing.assert_array_equal(padded[50:], np.arange(50, size))
    assert list(np.asarray(shuffled_order(key, 0, 5))) == list(range(5))


def test_padded_rows_waste_at_most_a_quarter():
    assert [padded_rows(count) for count in range(1, 11)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10]
    for count in range(1, 2000):
        rows = padded_rows(count)
        assert count <= rows and (rows - count) * 4 < max(rows, 4), count


def test_nothing_trains_when_an_input_is_refused(data):
    shards = shards_of(data, (20, 20))
    learners = [Learner("small-cnn", seed=0), Learner("small-cnn", seed=1)]
    before = [learner.get_state() for learner in learners]
    with pytest.raises(ValueError, match="at least one"):
        fit_together(learners, [shards[0], (shards[1][0][:0], shards[1][1][:0])],
                     epochs=1, learning_rates=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="twice"):
        fit_together([learners[0]] * 2, shards, epochs=1, learning_rates=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="labels"):
        fit_together(learners, [shards[0], (shards[1][0], np.full(20, 5))],
                     epochs=1, learning_rates=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="one each"):
        fit_together(learners, shards, epochs=1, learning_rates=[1e-3])
    for learner, state in zip(learners, before):
        assert max_difference(learner.get_state(), state) == 0
