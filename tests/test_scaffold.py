"""SCAFFOLD (`training.scaffold`): control variates carried through gossip's sums.

Each site's control variate c_i is its mean gradient at its round's start model; it travels
beside the model as "control/<parameter>" tensors in the same (secure) sums, so every site
learns the weighted average c; the next round adds c - c_i to each local gradient. What is
checked: the learner's correction (zero changes nothing, bit for bit; batched training
applies each site's own), the control variate itself, the config's refusals, and a secure
federation that carries the control variates and ends with one model.
"""

import json

import numpy as np
import pytest
from processes import ROOT, p2p_fl, small_dataset

from p2p_fl.config import ConfigError, load_topology
from p2p_fl.data.sources import load_dataset
from p2p_fl.learn.together import fit_together
from p2p_fl.learn.train import Learner


@pytest.fixture(scope="module")
def data():
    return load_dataset("builtin:pneumoniamnist")


def learner(seed=0):
    return Learner("small-cnn", seed=seed, optimizer="sgd", learning_rate=0.05)


def test_a_zero_correction_changes_nothing_and_a_correction_moves_the_step(data):
    images, labels = data.train.images[:256], data.train.labels[:256]
    plain, zero, pushed = learner(), learner(), learner()
    names = [n for n in plain.get_weights() if n not in plain.statistic_names()]
    shapes = {n: plain.get_weights()[n].shape for n in names}
    zero.correction = {n: np.zeros(shapes[n], np.float32) for n in names}
    pushed.correction = {n: np.full(shapes[n], 0.01, np.float32) for n in names}
    for each in (plain, zero, pushed):
        each.fit(images, labels, epochs=1)
    for name, value in plain.get_weights().items():
        np.testing.assert_array_equal(value, zero.get_weights()[name])
    # Plain SGD: each step goes a further -lr x 0.01 along every parameter (the gradients
    # then differ too, so not exactly): over all parameters the model moved that way.
    moved = [pushed.get_weights()[n] - plain.get_weights()[n] for n in names]
    assert sum(float(m.sum()) for m in moved) < -0.5 * 0.05 * 0.01 * sum(m.size for m in moved)


def test_batched_training_applies_each_sites_own_correction(data):
    shards = [(data.train.images[i * 130:(i + 1) * 130], data.train.labels[i * 130:(i + 1) * 130]) for i in range(2)]
    alone, together = [learner(s) for s in range(2)], [learner(s) for s in range(2)]
    for i, (a, b) in enumerate(zip(alone, together)):
        names = [n for n in a.get_weights() if n not in a.statistic_names()]
        correction = {n: np.full(a.get_weights()[n].shape, 0.01 * (i + 1), np.float32) for n in names}
        a.correction, b.correction = correction, dict(correction)
    for a, shard in zip(alone, shards):
        a.fit(*shard, epochs=2)
    fit_together(together, shards, epochs=2, learning_rates=[None, None])
    for a, b in zip(alone, together):
        for name, value in a.get_weights().items():
            np.testing.assert_allclose(value, b.get_weights()[name], atol=1e-4)


def test_the_control_variate_is_the_shards_mean_gradient_and_changes_no_weight(data):
    model = learner()
    before = model.get_weights()
    images, labels = data.train.images[:128], data.train.labels[:128]
    full = model.mean_gradient(images, labels)
    halves = [model.mean_gradient(images[:64], labels[:64]), model.mean_gradient(images[64:], labels[64:])]
    assert set(full) == {n for n in before if n not in model.statistic_names()}
    for name in full:  # two batches of 64: the mean of the two batches' gradients
        np.testing.assert_allclose(full[name], (halves[0][name] + halves[1][name]) / 2, atol=1e-6)
    for name, value in model.get_weights().items():
        np.testing.assert_array_equal(value, before[name])
    assert any(np.abs(v).max() > 0 for v in full.values())


@pytest.mark.parametrize("settings, says", [
    ('protocol = "cwt"\n[training]\nscaffold = true\n', "training.scaffold needs protocol gossip"),
    ('protocol = "gossip"\n[training]\nscaffold = true\n[privacy]\nenabled = true\ntarget_epsilon = 3.0\n',
     "privacy off"),
])
def test_scaffold_is_refused_where_it_does_not_apply(tmp_path, settings, says):
    path = tmp_path / "t.toml"
    path.write_text('federation = "f"\n' + settings + '[[peers]]\nname = "a"\n[[peers]]\nname = "b"\n')
    with pytest.raises(ConfigError, match=says):
        load_topology(path)


def test_a_secure_federation_carries_the_control_variates_and_ends_with_one_model(tmp_path):
    data = small_dataset(tmp_path / "small.npz", train=300, val=60, test=60)
    runs = {}
    for scaffold in (False, True):
        topology = tmp_path / f"t{scaffold}.toml"
        text = (ROOT / "topologies" / "gossip-3.toml").read_text()
        assert "min_local_steps = 16" in text
        topology.write_text(text.replace("min_local_steps = 16", f"min_local_steps = 0\nscaffold = {str(scaffold).lower()}", 1))
        out = tmp_path / f"out-{scaffold}"
        proc = p2p_fl("launch", str(topology), "--data", str(data), "--rounds", "3", "--partition", "dirichlet:0.5",
                      "--engine", "inproc", "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[scaffold] = json.loads((out / "summary.json").read_text())
    assert runs[True]["scaffold"] is True and runs[False]["scaffold"] is False
    # The control variates double what each sum carries (one float per parameter, besides
    # the model's parameters and BatchNorm statistics).
    sent = {s: sum(n["bytes_sent"] for n in runs[s]["nodes"]) for s in runs}
    assert 1.7 < sent[True] / sent[False] < 2.1, sent
    for node in runs[True]["nodes"]:
        assert node["dropped"] == {} and node["shortfall"] == ""
    models = [np.load(tmp_path / "out-True" / n["name"] / "final_model.npz") for n in runs[True]["nodes"]]
    assert not any(k.startswith("control/") for k in models[0].files)  # the model alone is saved
    for other in models[1:]:
        for key in models[0].files:
            np.testing.assert_allclose(other[key], models[0][key], atol=1e-5)
