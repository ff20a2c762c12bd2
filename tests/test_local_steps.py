"""training.min_local_steps: a site whose shard is a few batches trains more whole epochs a
round, counted from its own shard, and under DP-SGD the noise is planned for those epochs."""

import json
import math

import pytest
from processes import p2p_fl, shipped_topology, small_dataset

from p2p_fl.config import ConfigError, TrainingConfig, parse_topology
from p2p_fl.data import load_dataset
from p2p_fl.learn import Learner
from p2p_fl.learn.privacy import BudgetExceeded, batch_sampling
from p2p_fl.site import dp_config, epochs_per_round


@pytest.mark.parametrize("local_epochs, min_steps, steps, expected", [
    (1, 0, 1, 1),     # off: local_epochs as given
    (1, 16, 1, 16),   # 100 images, batch 64: one step an epoch
    (1, 16, 7, 3),    # whole epochs: 3 x 7 = 21 steps reach 16
    (2, 16, 8, 2),    # local_epochs already reach it
    (2, 16, 30, 2),   # a large shard keeps local_epochs
])
def test_epochs_per_round_reach_the_minimum_in_whole_epochs(local_epochs, min_steps, steps, expected):
    training = TrainingConfig(local_epochs=local_epochs, min_local_steps=min_steps)
    assert epochs_per_round(training, steps) == expected


def test_steps_per_epoch_counts_whole_batches_and_dp_s_poisson_steps():
    plain = Learner("small-cnn", num_classes=2, image_shape=(28, 28, 1), batch_size=64)
    assert [plain.steps_per_epoch(n) for n in (30, 100, 127, 128, 470)] == [1, 1, 1, 2, 7]
    dp = dp_config(_dp_topology(min_local_steps=0), 470)
    private = Learner("small-cnn-dp", num_classes=2, image_shape=(28, 28, 1), batch_size=64, dp=dp,
                      optimizer="sgd", training_secret=b"s" * 32)
    assert [private.steps_per_epoch(n) for n in (30, 100, 470)] == [batch_sampling(n, 64)[1] for n in (30, 100, 470)]


def test_a_negative_minimum_is_a_config_error():
    with pytest.raises(ConfigError, match="training.min_local_steps"):
        _dp_topology(min_local_steps=-1)


def _dp_topology(min_local_steps: int, rounds: int = 2):
    return parse_topology({
        "federation": "f", "protocol": "gossip", "seed": 1, "peers": [{"name": "a"}, {"name": "b"}],
        "training": {"model": "small-cnn-dp", "optimizer": "sgd", "learning_rate": 0.02, "batch_size": 64,
                     "rounds": rounds, "local_epochs": 1, "min_local_steps": min_local_steps},
        "gossip": {"secure": False}, "network": {"insecure": True},
        "privacy": {"enabled": True, "target_epsilon": 3.0, "clip_norm": 5.0}})


def test_dp_noise_is_planned_for_the_extra_epochs_and_the_run_spends_the_target():
    shard = 100  # round(100 / 64) = 2 Poisson steps an epoch; 5 steps a round need 3 epochs
    topology = _dp_topology(min_local_steps=5)
    dp, plain_plan = dp_config(topology, shard), dp_config(_dp_topology(min_local_steps=0), shard)
    assert dp.noise_multiplier > plain_plan.noise_multiplier  # 3 epochs a round cost more noise
    train = load_dataset("builtin:pneumoniamnist").train
    learner = Learner("small-cnn-dp", num_classes=2, image_shape=(28, 28, 1), batch_size=64, dp=dp,
                      optimizer="sgd", learning_rate=0.02, training_secret=b"k" * 32,
                      logit_adjustment=True)  # as a site of this topology trains
    epochs = epochs_per_round(topology.training, learner.steps_per_epoch(shard))
    assert epochs == 3
    for _ in range(topology.training.rounds):  # every round as planned, within the budget
        learner.fit(train.images[:shard], train.labels[:shard], epochs=epochs)
    assert learner.privacy_spent() == pytest.approx(3.0, abs=0.01)
    with pytest.raises(BudgetExceeded):  # and not one round more
        learner.fit(train.images[:shard], train.labels[:shard], epochs=epochs)


def test_small_sites_train_more_epochs_a_round_in_a_federation(tmp_path):
    data = small_dataset(tmp_path / "small.npz", train=400, val=60, test=120)
    topology = shipped_topology(tmp_path, "gossip-3.toml", **{"min_local_steps = 0": "min_local_steps = 6"})
    out = tmp_path / "out"
    proc = p2p_fl("launch", str(topology), "--out", str(out), "--data", str(data), "--rounds", "2",
                  "--partition", "quantity:1.0", "--engine", "inproc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["min_local_steps"] == 6
    seen = set()
    for node in summary["nodes"]:
        steps = node["samples"] // min(64, node["samples"])
        expected = max(1, math.ceil(6 / steps))
        assert node["epochs_per_round"] == expected, node
        rounds = [json.loads(line) for line in (out / node["name"] / "metrics.jsonl").read_text().splitlines()]
        trained = [r for r in rounds if "train_loss" in r]
        assert len(trained) == 2 and all(r["epochs"] == expected for r in trained), trained
        seen.add(expected)
        # The shared model each round started from, on the common test set, and its last swing.
        aucs = [r["start_test_auc"] for r in trained if "start_test_auc" in r] + [node["test_auc"]]
        assert len(aucs) == 2 and all(0.0 <= a <= 1.0 for a in aucs)
        assert node["test_auc_swing"] == pytest.approx(abs(aucs[1] - aucs[0]))
    assert len(seen) > 1, seen  # sites of different sizes trained different epochs in one round


@pytest.mark.parametrize("scored", [1, 0])
def test_data_score_last_rounds_sets_how_many_rounds_are_scored_for_the_swing(tmp_path, scored):
    """A site scores the models that start its last `data.score_last_rounds` trainings on
    the common test set; with the final model they give the swing. 0: the final model only."""
    data = small_dataset(tmp_path / "small.npz", train=300, val=60, test=90)
    topology = shipped_topology(tmp_path, "gossip-3.toml", **{'[data]': f'[data]\nscore_last_rounds = {scored}'})
    out = tmp_path / "out"
    proc = p2p_fl("launch", str(topology), "--out", str(out), "--data", str(data), "--rounds", "3",
                  "--engine", "inproc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for node in json.loads((out / "summary.json").read_text())["nodes"]:
        rounds = [json.loads(line) for line in (out / node["name"] / "metrics.jsonl").read_text().splitlines()]
        scored_rounds = [r["round"] for r in rounds if "start_test_auc" in r]
        assert scored_rounds == [2][:scored], scored_rounds
        if scored:
            start = next(r["start_test_auc"] for r in rounds if "start_test_auc" in r)
            assert node["test_auc_swing"] == pytest.approx(abs(node["test_auc"] - start))
        else:
            assert node["test_auc_swing"] is None

