"""DP-SGD's noise and batches are secret per site, and its batches are the Poisson samples
its accountant assumes.

The threat: every site knows the topology (seed, model, optimizer) and the other sites'
shard sizes. If a site's training key came from the public seed, any of them could rebuild
its noise and subtract it from the update it releases. Every learner here trains a
small-cnn with SGD on 80 images, batch 64 (q = 0.8, one step per epoch), so one compiled
DP epoch serves the module (a second for noise multiplier 0).
"""

import dataclasses

import jax
import numpy as np
import pytest

from p2p_fl.config import parse_topology
from p2p_fl.data.sources import load_dataset
from p2p_fl.learn import Learner
from p2p_fl.learn.privacy import batch_sampling, poisson_capacity, poisson_sample
from p2p_fl.learn.train import TrainState, clipped_gradient_sum, dp_train_step, secret_training_key
from p2p_fl.site import dp_config, make_learner

SHARD, BATCH = 80, 64
IMAGE_SHAPE = (28, 28, 1)


@pytest.fixture(scope="module")
def topology():
    return parse_topology({
        "federation": "f", "protocol": "gossip", "seed": 3, "peers": [{"name": "a"}, {"name": "b"}],
        "training": {"model": "small-cnn", "optimizer": "sgd", "learning_rate": 0.1,
                     "batch_size": BATCH, "rounds": 1, "local_epochs": 1},
        "gossip": {"secure": False}, "network": {"insecure": True},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0}})


@pytest.fixture(scope="module")
def dp(topology):
    return dp_config(topology, SHARD)


@pytest.fixture(scope="module")
def shard():
    train = load_dataset("builtin:pneumoniamnist").train
    return train.images[:SHARD], train.labels[:SHARD]


def public_learner(topology, dp):
    """A learner from public knowledge alone: what every site's was before the secret
    (and what any other site can build of this one's)."""
    t = topology.training
    return Learner(t.model, num_classes=2, image_shape=IMAGE_SHAPE, optimizer=t.optimizer,
                   learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                   batch_size=t.batch_size, augment=t.augment, seed=topology.seed, dp=dp,
                   prox_mu=t.prox_mu)


def update(learner, images, labels) -> np.ndarray:
    """The change of all weights by one epoch: what the site releases, less the model it
    started from (which its neighbours sent it)."""
    before = learner.get_weights()
    learner.fit(images, labels)
    after = learner.get_weights()
    return np.concatenate([(after[name] - before[name]).ravel() for name in sorted(before)])


def twin(learner, topology, dp):
    """A learner in `learner`'s state, key included, with other DP settings."""
    other = public_learner(topology, dp)
    other.set_state(learner.get_state())
    return other


def test_sites_of_one_federation_draw_independent_noise(topology, dp, shard):
    first, second = (make_learner(topology, 2, IMAGE_SHAPE, dp=dp) for _ in range(2))
    assert not np.array_equal(update(first, *shard), update(second, *shard))
    # Without DP the seed keeps keying training: equal runs stay bit-identical.
    first, second = (make_learner(topology, 2, IMAGE_SHAPE) for _ in range(2))
    np.testing.assert_array_equal(update(first, *shard), update(second, *shard))


def attack(victim, reference, topology, dp) -> float:
    """Another site denoises `victim`'s update with everything public: it trains a learner
    of its own with and without noise on stand-in data of the victim's shard size (the
    noise does not depend on the data), takes the difference as the victim's noise and
    subtracts it. Returns the relative error of what it gets against the victim's true
    noise-free update (`reference`: the victim's twin with noise multiplier 0)."""
    images, labels = np.zeros((SHARD,) + IMAGE_SHAPE, np.uint8), np.zeros(SHARD, np.int32)
    noiseless = dataclasses.replace(dp, noise_multiplier=0.0)
    predicted_noise = (update(public_learner(topology, dp), images, labels)
                       - update(public_learner(topology, noiseless), images, labels))
    released, truth = victim
    return float(np.linalg.norm(released - predicted_noise - truth) / np.linalg.norm(truth))


def test_a_released_update_cannot_be_denoised_from_public_knowledge(topology, dp, shard):
    noiseless = dataclasses.replace(dp, noise_multiplier=0.0)
    # The attack works against a site keyed by the public seed, as every site was before...
    keyed_by_seed = public_learner(topology, dp)
    reference = twin(keyed_by_seed, topology, noiseless)
    victim = update(keyed_by_seed, *shard), update(reference, *shard)
    assert np.linalg.norm(victim[0] - victim[1]) > 3 * np.linalg.norm(victim[1])  # noise >> signal
    assert attack(victim, reference, topology, dp) < 1e-3
    # ...and leaves an error of the noise's size against the node's secret-keyed learner.
    site = make_learner(topology, 2, IMAGE_SHAPE, dp=dp)
    reference = twin(site, topology, noiseless)
    victim = update(site, *shard), update(reference, *shard)
    assert attack(victim, reference, topology, dp) > 3


def test_the_training_key_comes_from_the_secret_alone():
    secret = bytes(range(32))
    by_secret = [Learner("small-cnn", seed=seed, training_secret=secret) for seed in (0, 1)]
    states = [learner.get_state() for learner in by_secret]
    np.testing.assert_array_equal(states[0]["rng_key"], states[1]["rng_key"])
    assert not np.array_equal(states[0]["weight/conv1/kernel"], states[1]["weight/conv1/kernel"])
    for seed in (0, 1):  # the seed's key is not the secret's
        assert not np.array_equal(Learner("small-cnn", seed=seed).get_state()["rng_key"],
                                  states[0]["rng_key"])
    other = Learner("small-cnn", training_secret=bytes(31) + b"\x01").get_state()["rng_key"]
    assert not np.array_equal(other, states[0]["rng_key"])
    with pytest.raises(ValueError, match="16 bytes"):
        secret_training_key(b"short")


def test_a_resumed_learner_continues_its_secret_key_stream(topology, dp, shard):
    uninterrupted = make_learner(topology, 2, IMAGE_SHAPE, dp=dp)
    interrupted = public_learner(topology, dp)
    interrupted.set_state(uninterrupted.get_state())  # the same site, started twice
    uninterrupted.fit(*shard)
    interrupted.fit(*shard)
    checkpoint = interrupted.get_state()
    uninterrupted.fit(*shard)
    # As the node restarts: a fresh learner (with a fresh secret) restored from the checkpoint.
    resumed = make_learner(topology, 2, IMAGE_SHAPE, dp=dp)
    unrestored = make_learner(topology, 2, IMAGE_SHAPE, dp=dp)
    resumed.set_state(checkpoint)
    unrestored.set_state({**checkpoint, "rng_key": unrestored.get_state()["rng_key"]})
    resumed.fit(*shard)
    unrestored.fit(*shard)
    expected = uninterrupted.get_state()
    for name, value in resumed.get_state().items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert not np.array_equal(unrestored.get_weights()["conv1/kernel"],
                              expected["weight/conv1/kernel"])
    public = public_learner(topology, dp)  # and the stream is the secret's, not the seed's
    for _ in range(2):  # as many epochs as the site
        public.fit(*shard)
    assert not np.array_equal(public.get_state()["rng_key"], expected["rng_key"])


def test_poisson_samples_have_the_sizes_and_inclusion_rates_of_the_analysis():
    num_examples, batch = 470, 64
    rate, steps = batch_sampling(num_examples, batch)
    assert (rate, steps) == (batch / num_examples, 7)
    draws = 4000
    indices, counts = jax.jit(jax.vmap(lambda key: poisson_sample(key, num_examples, rate)))(
        jax.random.split(jax.random.key(0), draws))
    indices, counts = np.asarray(indices), np.asarray(counts)
    assert counts.mean() == pytest.approx(batch, abs=4 * np.sqrt(batch / draws))
    assert counts.var() == pytest.approx(num_examples * rate * (1 - rate), rel=0.1)
    included = np.zeros((draws, num_examples), bool)
    for row, (order, count) in enumerate(zip(indices, counts)):
        assert sorted(order) == list(range(num_examples))  # each example once
        assert np.all(np.diff(order[:count]) > 0)
        included[row, order[:count]] = True
    # Every example in with probability q, independently of the others.
    assert np.abs(included.mean(axis=0) - rate).max() < 5 * np.sqrt(rate * (1 - rate) / draws)
    pair = (included[:, 0] & included[:, 1]).mean()
    assert pair == pytest.approx(rate ** 2, abs=5 * np.sqrt(rate ** 2 / draws))


def test_batch_sampling_rounds_the_steps_per_epoch():
    assert batch_sampling(100, 40) == (0.4, 3)  # 2.5 steps: an epoch of 3 samples of 40
    assert batch_sampling(96, 64) == (64 / 96, 2)
    assert batch_sampling(83, 64) == (64 / 83, 1)
    assert batch_sampling(30, 64) == (1.0, 1)
    assert poisson_capacity(30, 1.0) == 30
    assert poisson_capacity(470, 64 / 470) == 102


def test_padded_slots_add_nothing_to_the_gradient(shard, topology, dp):
    learner = public_learner(topology, dp)
    state = learner._state
    images = np.asarray(shard[0][:4], np.float32) / 255.0
    labels = np.asarray(shard[1][:4].reshape(-1), np.int32)
    valid = np.array([True, True, True, False])

    def summed(images, valid=valid):
        return jax.jit(clipped_gradient_sum, static_argnames=("graphdef", "clip_norm"))(
            state.params, state.batch_stats, images, labels, valid,
            graphdef=learner._graphdef, clip_norm=dp.clip_norm)

    loss, grads = summed(images)
    huge = images.copy()
    huge[3] = 1e30  # a padded slot's garbage, here inf and NaN inside the model
    huge_loss, huge_grads = summed(huge)
    assert loss == huge_loss
    for got, want in zip(jax.tree_util.tree_leaves(huge_grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_array_equal(got, want)
    # The real example in that slot would have counted: the mask is what excluded it.
    _, all_grads = summed(images, np.ones(4, bool))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(all_grads),
                                                         jax.tree_util.tree_leaves(grads)))


def test_a_dp_step_is_the_clipped_mean_over_its_poisson_sample_overflow_included(shard, dp):
    """Noise 0, SGD at rate 1 without momentum: the step moves the weights by exactly minus
    (sum of the drawn examples' clipped gradients) / (q N). A capacity of 8 slots makes the
    ~64 drawn examples overflow into 8 more chunks: nothing is dropped."""
    import optax

    images, labels = shard[0].astype(np.float32) / 255.0, shard[1].reshape(-1).astype(np.int32)
    learner = Learner("small-cnn", seed=1, augment=False)
    start = learner._state
    tx = optax.sgd(1.0)
    noiseless = dataclasses.replace(dp, noise_multiplier=0.0)
    rate = BATCH / SHARD
    key = jax.random.key(5)
    indices, count = poisson_sample(jax.random.split(key, 3)[0], SHARD, rate)
    drawn = np.asarray(indices[:count])
    assert 0 < len(drawn) < SHARD

    def stepped(capacity):
        state = TrainState(start.params, start.batch_stats, tx.init(start.params), start.key)
        new, loss = jax.jit(dp_train_step, static_argnames=(
            "graphdef", "tx", "augment", "dp", "sample_rate", "capacity"))(
            state, images, labels, key, graphdef=learner._graphdef, tx=tx, augment=False,
            dp=noiseless, sample_rate=rate, capacity=capacity)
        return jax.tree_util.tree_leaves(new.params), float(loss)

    mask = np.zeros(SHARD, bool)
    mask[drawn] = True
    loss_sum, grad_sum = jax.jit(clipped_gradient_sum, static_argnames=("graphdef", "clip_norm"))(
        start.params, start.batch_stats, images, labels, mask,
        graphdef=learner._graphdef, clip_norm=dp.clip_norm)
    expected = [w - g / (rate * SHARD) for w, g in zip(jax.tree_util.tree_leaves(start.params),
                                                       jax.tree_util.tree_leaves(grad_sum))]
    for capacity in (SHARD, 8):
        params, loss = stepped(capacity)
        assert loss == pytest.approx(float(loss_sum) / len(drawn), rel=1e-5)
        for got, want in zip(params, expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
