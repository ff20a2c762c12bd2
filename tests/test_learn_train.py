"""Learner: training on PneumoniaMNIST, weights at the federation boundary, checkpoints.

Every learner here is a small-cnn trained on 512 images with the default
optimizer, so one compiled epoch serves the whole module.
"""

import numpy as np
import optax
import pytest

from p2p_fl.data.sources import load_dataset
from p2p_fl.learn.privacy import DPConfig
from p2p_fl.learn.train import Learner, class_counts, cross_entropy, label_log_prior, make_optimizer

SHARD = 512


@pytest.fixture(scope="module")
def data():
    return load_dataset("builtin:pneumoniamnist")


@pytest.fixture(scope="module")
def shard(data):
    return data.train.images[:SHARD], data.train.labels[:SHARD]


@pytest.fixture(scope="module")
def trained(shard):
    learner = Learner("small-cnn", seed=0)
    losses = learner.fit(*shard, epochs=4)
    return learner, losses


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_training_lowers_loss_and_beats_chance(trained, data):
    learner, losses = trained
    assert losses[-1] < losses[0]
    report = learner.evaluate(data.test.images, data.test.labels,
                              data.val.images, data.val.labels)
    assert report["auc"] > 0.8
    assert 0.0 < report["threshold"] < 1.0
    assert report["acc_at_val_threshold"] > 0.7


def test_on_epoch_reports_each_epoch(shard):
    seen = []
    losses = Learner("small-cnn").fit(*shard, epochs=2,
                                      on_epoch=lambda i, loss: seen.append((i, loss)))
    assert seen == list(enumerate(losses))


def test_weights_cover_parameters_and_batch_statistics(trained):
    learner, _ = trained
    weights = learner.get_weights()
    spec = learner.weight_spec()
    assert [name for name, _, _ in spec] == list(weights) == sorted(weights)
    for name, dtype, shape in spec:
        assert (str(weights[name].dtype), weights[name].shape) == (dtype, shape)
    assert {"conv1/kernel", "conv1/bias", "bn1/scale", "bn1/mean", "bn1/var",
            "head/kernel"} <= set(weights)
    parameters = sum(w.size for name, w in weights.items()
                     if not name.endswith(("/mean", "/var")))
    assert parameters == learner.num_params == 92_993


def test_set_weights_round_trip_and_transfer(trained, data):
    learner, _ = trained
    weights = learner.get_weights()
    other = Learner("small-cnn", seed=1)
    other.set_weights(weights)
    assert_same_weights(other.get_weights(), weights)
    np.testing.assert_array_equal(other.predict_proba(data.test.images),
                                  learner.predict_proba(data.test.images))


def test_get_weights_is_a_copy(trained, shard):
    learner, _ = trained
    weights = learner.get_weights()
    snapshot = {name: value.copy() for name, value in weights.items()}
    learner.fit(*shard, epochs=1)  # donates the device buffers
    assert_same_weights(weights, snapshot)


def test_set_weights_rejects_mismatches_and_changes_nothing(trained):
    learner, _ = trained
    before = learner.get_weights()
    cases = {
        "shape": {**before, "conv1/kernel": np.zeros((3, 3, 1, 16), np.float32)},
        "dtype": {**before, "bn1/mean": before["bn1/mean"].astype(np.float64)},
        "missing": {k: v for k, v in before.items() if k != "head/bias"},
        "unknown": {**before, "conv9/kernel": np.zeros(1, np.float32)},
    }
    names = {"shape": "conv1/kernel", "dtype": "bn1/mean", "missing": "head/bias",
             "unknown": "conv9/kernel"}
    for case, weights in cases.items():
        with pytest.raises(ValueError, match=names[case]):
            learner.set_weights(weights)
    assert_same_weights(learner.get_weights(), before)


def test_same_seed_same_weights(shard):
    first, second, other = (Learner("small-cnn", seed=seed) for seed in (7, 7, 8))
    for learner in (first, second, other):
        learner.fit(*shard, epochs=1)
    assert_same_weights(first.get_weights(), second.get_weights())
    assert not np.array_equal(first.get_weights()["conv1/kernel"],
                              other.get_weights()["conv1/kernel"])


def test_resume_from_state_equals_uninterrupted_training(shard):
    uninterrupted = Learner("small-cnn", seed=3)
    uninterrupted.fit(*shard, epochs=1, learning_rate=3e-3)
    uninterrupted.fit(*shard, epochs=1)

    interrupted = Learner("small-cnn", seed=3)
    interrupted.fit(*shard, epochs=1, learning_rate=3e-3)
    checkpoint = interrupted.get_state()
    interrupted.fit(*shard, epochs=1)  # progress after the checkpoint is lost

    resumed = Learner("small-cnn", seed=99)
    resumed.set_state(checkpoint)
    assert resumed.learning_rate == pytest.approx(3e-3)
    resumed.fit(*shard, epochs=1)
    assert_same_weights(resumed.get_weights(), uninterrupted.get_weights())
    assert_same_weights(resumed.get_state(), uninterrupted.get_state())


def test_set_state_rejects_wrong_entries(trained):
    learner, _ = trained
    state = learner.get_state()
    with pytest.raises(ValueError, match="rng_key"):
        learner.set_state({**state, "rng_key": np.zeros(3, np.uint32)})
    with pytest.raises(ValueError, match="optimizer/0000"):
        learner.set_state({k: v for k, v in state.items() if k != "optimizer/0000"})


def test_learning_rate_and_reset_optimizer(shard):
    learner = Learner("small-cnn", seed=5, learning_rate=1e-3)
    before = learner.get_weights()
    learner.fit(*shard, epochs=1, learning_rate=0.0)
    after = learner.get_weights()
    assert learner.learning_rate == 0.0
    # No step: the parameters stay, while BatchNorm statistics follow the data.
    np.testing.assert_array_equal(after["conv1/kernel"], before["conv1/kernel"])
    assert not np.array_equal(after["bn1/mean"], before["bn1/mean"])
    learner.fit(*shard, epochs=1, learning_rate=2e-3)
    learner.reset_optimizer()
    assert learner.learning_rate == pytest.approx(2e-3)
    fresh = Learner("small-cnn", seed=5, learning_rate=2e-3).get_state()
    state = learner.get_state()
    for name in fresh:
        if name.startswith("optimizer/"):
            np.testing.assert_array_equal(state[name], fresh[name], err_msg=name)


def test_small_shard_and_input_checks(data):
    learner = Learner("small-cnn", batch_size=64)
    images, labels = data.train.images[:10], data.train.labels[:10]
    (loss,) = learner.fit(images[..., 0], labels[:, None])  # (N, H, W) and (N, 1) accepted
    assert np.isfinite(loss)
    assert learner.predict_proba(images).shape == (10,)
    with pytest.raises(ValueError, match="shape"):
        learner.fit(np.zeros((4, 32, 32, 1), np.float32), np.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        learner.fit(images, np.full(10, 2))
    with pytest.raises(ValueError, match="at least one"):
        learner.fit(images[:0], labels[:0])
    assert learner.predict_proba(images[:0]).shape == (0,)
    report = learner.evaluate(images, labels, images[:0], labels[:0])
    assert "threshold" not in report  # no validation data, no chosen threshold


def test_multiclass_probabilities():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    probs = Learner("small-cnn", num_classes=3).predict_proba(images)
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_cross_entropy_binary_and_multiclass():
    labels = np.array([1, 0])
    binary_logits = np.array([[2.0], [-1.0]], np.float32)
    expected = -np.mean(np.log(1 / (1 + np.exp(-np.array([2.0, 1.0])))))
    assert float(cross_entropy(binary_logits, labels)) == pytest.approx(expected, rel=1e-6)
    logits = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], np.float32)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(softmax[[0, 1], labels]))
    assert float(cross_entropy(logits, labels)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_make_optimizer_learning_rate_in_state(name):
    params = {"w": np.ones(3, np.float32)}
    optimizer = make_optimizer(name, learning_rate=0.5, weight_decay=0.0)
    state = optimizer.init(params)
    assert float(state.hyperparams["learning_rate"]) == 0.5
    updates, _ = optimizer.update({"w": np.ones(3, np.float32)}, state, params)
    assert np.all(np.asarray(optax.apply_updates(params, updates)["w"]) < 1.0)


def test_make_optimizer_unknown_name():
    with pytest.raises(ValueError, match="adam, adamw, sgd"):
        make_optimizer("rmsprop")


def distance(weights, anchor, names):
    return float(np.sqrt(sum(np.sum((weights[n] - anchor[n]) ** 2) for n in names)))


def test_fedprox_with_mu_zero_is_plain_training_bit_for_bit(shard):
    plain, prox = Learner("small-cnn", seed=7), Learner("small-cnn", seed=7, prox_mu=0.0)
    for learner in (plain, prox):
        learner.fit(*shard, epochs=1)
    assert_same_weights(prox.get_weights(), plain.get_weights())


def test_fedprox_pulls_towards_the_model_that_arrived(trained, shard):
    arrived = trained[0].get_weights()  # the anchor: another site's model
    moved = {}
    for mu in (0.0, 10.0):
        learner = Learner("small-cnn", seed=7, prox_mu=mu)
        learner.set_weights(arrived)
        learner.fit(*shard, epochs=1, learning_rate=3e-3)
        params = [n for n in arrived if n not in ("bn1/mean", "bn1/var", "bn2/mean", "bn2/var")]
        moved[mu] = distance(learner.get_weights(), arrived, params)
    assert 0 < moved[10.0] < 0.5 * moved[0.0], moved


def test_prox_gradient_is_the_gradient_of_the_proximal_term():
    import jax

    from p2p_fl.learn.train import prox_gradient

    params, anchor = {"w": np.array([1.0, -2.0], np.float32)}, {"w": np.array([0.5, 0.0], np.float32)}
    grads = {"w": np.array([0.1, 0.2], np.float32)}
    term = jax.grad(lambda p: 0.5 * 3.0 * np.sum((p["w"] - anchor["w"]) ** 2))
    expected = grads["w"] + np.asarray(term(params)["w"])
    np.testing.assert_allclose(prox_gradient(grads, params, anchor, 3.0)["w"], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="prox_mu"):
        Learner("small-cnn", prox_mu=-1.0)


def test_batchnorm_names_cover_every_batchnorm_tensor():
    assert Learner("small-cnn").batchnorm_names() == [
        f"bn{i}/{leaf}" for i in (1, 2) for leaf in ("bias", "mean", "scale", "var")]
    names = Learner("resnet8").batchnorm_names()
    assert "stem_bn/var" in names and "stage2/shortcut_bn/scale" in names
    assert not any("conv" in n or "head" in n for n in names)


def test_set_weights_keeps_the_named_local_tensors(trained):
    learner, _ = trained
    local = learner.batchnorm_names()
    incoming = Learner("small-cnn", seed=1).get_weights()
    shared = {n: v for n, v in incoming.items() if n not in local}
    other = Learner("small-cnn", seed=2)
    own = other.get_weights()
    with pytest.raises(ValueError, match="lacks tensor 'bn1/bias'"):
        other.set_weights(shared)  # a partial dict stays an error by default
    other.set_weights(shared, keep=local)
    after = other.get_weights()
    for name in incoming:
        np.testing.assert_array_equal(after[name], own[name] if name in local else incoming[name])
    other.set_weights(incoming, keep=local)  # given, the kept names are replaced too
    assert_same_weights(other.get_weights(), incoming)
    with pytest.raises(ValueError, match="keep names unknown tensor 'bn9/mean'"):
        other.set_weights(shared, keep=["bn9/mean"])
    with pytest.raises(ValueError, match="lacks tensor 'head/bias'"):
        other.set_weights({n: v for n, v in shared.items() if n != "head/bias"}, keep=local)


def test_predictions_follow_the_weights_and_equal_models_score_alike(trained, data, shard):
    """predict_proba answers a model it already scored on the same images from memory (the
    sites of one process holding one average): the answer must be that model's, never a
    stale one."""
    learner, _ = trained
    images = data.test.images[:100]
    first = learner.predict_proba(images)
    fresh = Learner("small-cnn", seed=1)
    assert not np.allclose(fresh.predict_proba(images), first)
    fresh.set_weights(learner.get_weights())  # the same model at another site
    np.testing.assert_array_equal(fresh.predict_proba(images), first)
    fresh.fit(*shard, epochs=1)  # its weights moved: a new answer
    assert not np.array_equal(fresh.predict_proba(images), learner.predict_proba(images))


def test_label_log_prior_is_the_smoothed_log_odds_of_the_shard():
    np.testing.assert_allclose(label_log_prior(class_counts(np.array([1] * 9 + [0] * 3), 2)),
                               [np.log(10 / 4)], rtol=1e-6)
    np.testing.assert_allclose(label_log_prior(class_counts(np.array([0, 0, 2]), 3)),
                               np.log(np.array([3, 1, 2]) / 6), rtol=1e-6)
    # Noisy counts take a pseudo-count as large as their noise: the shift shrinks towards none.
    np.testing.assert_allclose(label_log_prior(np.array([3, 9]), pseudo_count=5.0), [np.log(14 / 8)], rtol=1e-6)
    np.testing.assert_allclose(label_log_prior(np.array([0, 2, 1]), pseudo_count=2.0),
                               np.log(np.array([2, 4, 3]) / 9), rtol=1e-6)
    shifts = [abs(label_log_prior(np.array([20, 60]), pseudo_count=s)[0]) for s in (1.0, 3.5, 9.4, 28.0)]
    assert all(more > less for more, less in zip(shifts, shifts[1:]))


def test_logit_adjustment_keeps_a_skewed_site_s_base_rate_out_of_its_model(data):
    """A site with 9 pneumonia images to 1 normal: trained plainly, its model learns that
    base rate and calls a balanced test set mostly pneumonia; with logit adjustment the
    shard's log-odds explain the base rate and the model's own scores stay near even."""
    labels = data.train.labels
    chosen = np.concatenate([np.flatnonzero(labels == 1)[:460], np.flatnonzero(labels == 0)[:52]])
    test_labels = data.test.labels
    balanced = np.concatenate([np.flatnonzero(test_labels == 1)[:100],
                               np.flatnonzero(test_labels == 0)[:100]])
    mean_probability = {}
    for adjusted in (False, True):
        learner = Learner("small-cnn", seed=0, logit_adjustment=adjusted)
        learner.fit(data.train.images[chosen], labels[chosen], epochs=3)
        mean_probability[adjusted] = float(learner.predict_proba(data.test.images[balanced]).mean())
    assert mean_probability[False] > 0.65  # the base rate, learnt
    assert mean_probability[True] < mean_probability[False] - 0.1


def test_logit_adjustment_under_dp_needs_a_noisy_release_of_the_counts():
    with pytest.raises(ValueError, match="label_prior_epsilon > 0"):
        Learner("small-cnn", dp=DPConfig(noise_multiplier=1.0), logit_adjustment=True)
