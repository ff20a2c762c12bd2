"""Ensemble protocol: the state machine driven by hand, the mean-probability evaluation with
real models, and three real node processes over ZeroMQ/CURVE swapping their final models.

The end-to-end run is bounded for CI: 128 training images a site, one round of one epoch
(about 30-60 s here, most of it starting JAX in three processes).
"""

import json

import numpy as np
import pytest
from processes import run_nodes, small_shards, write_federation

from p2p_fl.data import load_dataset
from p2p_fl.learn import Learner, evaluation_report
from p2p_fl.learn.ensemble import ensemble_proba, evaluate_ensemble, mean_probabilities
from p2p_fl.net import wire
from p2p_fl.protocols import EnsembleProtocol, Finish, Send, Train
from p2p_fl.protocols.actions import CHECKPOINT, Checkpoint


def moves(actions):
    """The actions but checkpoints (which the driver writes before the others)."""
    return [a for a in actions if not isinstance(a, Checkpoint)]


def model(value):
    return {"w": np.full(3, value, np.float32), "b": np.full(1, value, np.float32)}


def message(sender, value, round_=2, type_=wire.ENSEMBLE_MODEL):
    return wire.Message(type_, "fed", sender, round_, seq=0, tensors=model(value))


def test_trains_all_rounds_locally_then_sends_its_model_to_every_other_site():
    site = EnsembleProtocol("a", ["a", "b", "c"], 2, wait_s=10.0)
    (step,) = site.start(0.0)
    assert isinstance(step, Train) and step.round == 0 and step.weights is None
    (step,) = moves(site.on_trained(0, model(1.0), 1.0))
    assert isinstance(step, Train) and step.round == 1 and step.weights is None and step.progress == 0.5
    actions = moves(site.on_trained(1, model(1.0), 2.0))
    assert [(a.to, a.type, a.round) for a in actions] == [("b", wire.ENSEMBLE_MODEL, 2), ("c", wire.ENSEMBLE_MODEL, 2)]
    assert all(isinstance(a, Send) and a.weights["w"][0] == 1.0 for a in actions)


def test_finishes_with_every_member_once_all_arrived_even_those_that_came_early():
    site = EnsembleProtocol("b", ["a", "b", "c"], 1, wait_s=10.0)
    site.start(0.0)
    assert moves(site.on_message(message("c", 3.0, round_=1), 0.5)) == []  # c finished first: kept
    sends = moves(site.on_trained(0, model(2.0), 1.0))
    assert len(sends) == 2 and not any(isinstance(a, Finish) for a in sends)
    (final,) = moves(site.on_message(message("a", 1.0, round_=1), 2.0))
    assert isinstance(final, Finish) and final.weights["w"][0] == 2.0
    assert [m["w"][0] for m in final.members] == [2.0, 1.0, 3.0]  # own first, then by name
    assert all(list(m) == ["w", "b"] for m in final.members)  # the model's order
    assert final.meta["ensemble_members"] == 3 and final.meta["ensemble_missing"] == ""


def test_a_restarted_site_keeps_its_models_and_offers_its_own_again():
    """The ensemble used to have no checkpoint: a site restarted after its training lost
    its model and the ones it had received. Now both are in the snapshot; resumed, it
    offers its model again, and a peer that has it takes the identical copy silently."""
    site = EnsembleProtocol("a", ["a", "b", "c"], 1, wait_s=10.0)
    site.start(0.0)
    assert CHECKPOINT in site.on_message(message("b", 2.0, round_=1), 0.5)
    assert CHECKPOINT in site.on_trained(0, model(1.0), 1.0)
    state, arrays = site.snapshot()
    resumed = EnsembleProtocol("a", ["a", "b", "c"], 1, wait_s=10.0)
    resumed.restore(state, arrays, 50.0)
    sends = resumed.start(50.0)
    assert [(s.to, s.weights["w"][0]) for s in sends] == [("b", 1.0), ("c", 1.0)]
    assert resumed.on_message(message("b", 2.0, round_=1), 51.0) == []  # b offered it again
    with pytest.raises(wire.WireError, match="different"):
        resumed.on_message(message("b", 7.0, round_=1), 51.0)
    (final,) = moves(resumed.on_message(message("c", 3.0, round_=1), 52.0))
    assert [m["w"][0] for m in final.members] == [1.0, 2.0, 3.0]
    unstarted = EnsembleProtocol("a", ["a", "b", "c"], 2, wait_s=10.0)
    unstarted.on_trained(0, model(1.0), 1.0)
    again = EnsembleProtocol("a", ["a", "b", "c"], 2, wait_s=10.0)
    again.restore(*unstarted.snapshot(), 2.0)
    (step,) = again.start(2.0)
    assert isinstance(step, Train) and step.round == 1  # the learner's checkpoint holds round 0's model


def test_a_silent_site_is_left_out_at_the_deadline():
    site = EnsembleProtocol("a", ["a", "b", "c"], 1, wait_s=10.0)
    site.on_trained(0, model(1.0), 0.0)
    assert moves(site.on_message(message("b", 2.0, round_=1), 1.0)) == []
    assert site.on_tick(9.9) == []
    (final,) = site.on_tick(10.0)
    assert len(final.members) == 2 and final.meta["ensemble_missing"] == "c"
    assert site.on_tick(11.0) == []  # finished once


@pytest.mark.parametrize("msg, reason", [
    (message("b", 1.0, type_=wire.GOSSIP_MODEL), "unexpected gossip-model"),
    (message("a", 1.0), "a is not another site"),
    (message("z", 1.0), "z is not another site"),
    (message("b", 1.0, round_=1), "round 1, expected 2"),
])
def test_refusals_name_the_reason(msg, reason):
    site = EnsembleProtocol("a", ["a", "b", "c"], 2, wait_s=10.0)
    with pytest.raises(wire.WireError, match=reason):
        site.on_message(msg, 0.0)


def test_a_second_model_from_the_same_site_is_refused():
    site = EnsembleProtocol("a", ["a", "b", "c"], 2, wait_s=10.0)
    site.on_message(message("b", 1.0), 0.0)
    with pytest.raises(wire.WireError, match="second ensemble model from b"):
        site.on_message(message("b", 5.0), 0.0)


def test_an_ensemble_model_must_carry_exactly_the_models_tensors():
    spec = wire.spec_of(model(0.0))
    frames = [bytes(f) for f in wire.encode(wire.ENSEMBLE_MODEL, federation="fed", sender="b", round=1, seq=0,
                                            tensors={"w": np.full(3, np.nan, np.float32), "b": np.ones(1, np.float32)})]
    with pytest.raises(wire.WireError, match="NaN or Inf"):
        wire.decode(frames, federation="fed", senders={"b"}, tensor_spec=spec)
    frames = [bytes(f) for f in wire.encode(wire.ENSEMBLE_MODEL, federation="fed", sender="b", round=1, seq=0,
                                            tensors={"w": np.ones(3, np.float32)})]
    with pytest.raises(wire.WireError, match="1 tensors listed, expected 2"):
        wire.decode(frames, federation="fed", senders={"b"}, tensor_spec=spec)
    frames = [bytes(f) for f in wire.encode(wire.ENSEMBLE_MODEL, federation="fed", sender="b", round=1, seq=0,
                                            tensors=model(1.0))]
    with pytest.raises(wire.WireError, match="not the authenticated peer"):
        wire.decode(frames, federation="fed", senders={"b", "c"}, tensor_spec=spec, authenticated_sender="c")
    assert wire.decode(frames, federation="fed", senders={"b"}, tensor_spec=spec).tensors["w"][0] == 1.0


def test_mean_probabilities_and_its_refusals():
    np.testing.assert_allclose(mean_probabilities([np.array([0.2, 0.9]), np.array([0.4, 0.5])]), [0.3, 0.7])
    with pytest.raises(ValueError, match="at least one member"):
        mean_probabilities([])
    with pytest.raises(ValueError, match="differ in shape"):
        mean_probabilities([np.zeros(2), np.zeros(3)])


def test_the_ensembles_probabilities_are_the_mean_of_its_members():
    data = load_dataset("builtin:pneumoniamnist")
    images, labels = data.test.images[:200], data.test.labels[:200]
    members = []
    for seed in (0, 1, 2):  # three differently initialised models
        members.append(Learner("small-cnn", num_classes=2, image_shape=data.image_shape, seed=seed).get_weights())
    learner = Learner("small-cnn", num_classes=2, image_shape=data.image_shape, seed=9)
    singles = []
    for m in members:
        learner.set_weights(m)
        singles.append(learner.predict_proba(images))
    assert not np.allclose(singles[0], singles[1])  # the members do differ
    probs = ensemble_proba(learner, members, images)
    np.testing.assert_allclose(probs, np.mean(np.stack(singles).astype(np.float64), axis=0), rtol=1e-6)
    np.testing.assert_array_equal(learner.get_weights()["conv1/kernel"], members[0]["conv1/kernel"])  # the own model
    report = evaluate_ensemble(learner, members, images, labels, data.val.images[:100], data.val.labels[:100])
    expected = evaluation_report(labels, probs, 2, data.val.labels[:100], ensemble_proba(learner, members, data.val.images[:100]))
    assert report == pytest.approx(expected)


SITES = ["a", "b", "c"]


def test_three_node_processes_swap_models_and_predict_with_the_mean(tmp_path):
    shards = small_shards(tmp_path, SITES, train=384, val=96, test=96)
    config = write_federation(tmp_path, SITES, 'protocol = "ensemble"\n[training]\nrounds = 1\nlocal_epochs = 1\n'
                              'batch_size = 32\n[ensemble]\nwait_s = 120.0\n[data]\ntest = ""\n', federation="ensemble-e2e")
    out = tmp_path / "out"
    failed = run_nodes(config, shards, out)
    assert failed == {}, failed
    own = {n: dict(np.load(out / n / "final_model.npz")) for n in SITES}
    assert not np.array_equal(own["a"]["conv1/kernel"], own["b"]["conv1/kernel"])  # trained apart
    learner = Learner("small-cnn", num_classes=2, image_shape=(28, 28, 1))
    for n in SITES:
        result = json.loads((out / n / "result.json").read_text())
        assert result["final_ensemble_members"] == 3 and result["final_ensemble_missing"] == ""
        assert result["dropped"] == {}
        stored = np.load(out / n / "ensemble_models.npz")
        members = [{k.split("/", 1)[1]: stored[k] for k in stored.files if k.startswith(f"member{i}/")} for i in range(3)]
        # Its own model first, then the others' by name, each exactly as its site ended.
        order = [n] + sorted(set(SITES) - {n})
        for member, site in zip(members, order):
            assert set(member) == set(own[site])
            assert all(np.array_equal(member[k], own[site][k]) for k in member)
        # The reported figures are those of the members' mean probabilities on its own test shard.
        shard = load_dataset(str(shards[n]))
        probs = ensemble_proba(learner, members, shard.test.images)
        singles = []
        for m in members:
            learner.set_weights(m)
            singles.append(learner.predict_proba(shard.test.images))
        np.testing.assert_allclose(probs, np.mean(singles, axis=0), rtol=1e-5)
        report = evaluation_report(shard.test.labels, probs, 2, shard.val.labels,
                                   ensemble_proba(learner, members, shard.val.images))
        assert result["test_auc"] == pytest.approx(report["auc"], abs=1e-6)
        assert result["test_loss"] == pytest.approx(report["loss"], rel=1e-5)
        assert result["test_acc_at_val_threshold"] == pytest.approx(report["acc_at_val_threshold"])
