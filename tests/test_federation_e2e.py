"""End to end: real node processes over ZeroMQ on tcp loopback, real training, real files.

The default (CI) run is bounded: one cycle of one epoch. `pytest -m slow` runs the shipped
topologies with their default settings and checks the quality targets.
"""

import json
import tomllib

import numpy as np
import pytest
from processes import ROOT, p2p_fl



@pytest.fixture(scope="module")
def cwt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cwt")
    proc = p2p_fl("launch", "topologies/ring-3.toml", "--rounds", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_cwt_on_three_processes_gives_every_site_the_same_model_that_beats_chance(cwt_run):
    out, _ = cwt_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "cwt" and summary["peers"] == 3 and summary["wall_s"] > 0
    assert summary["final"]["test_auc"] > 0.85, summary["final"]
    names = [n["name"] for n in summary["nodes"]]
    assert names == ["hospital-a", "hospital-b", "hospital-c"]
    models = [np.load(out / n / "final_model.npz") for n in names]
    for other in models[1:]:
        assert set(other.files) == set(models[0].files)
        for key in models[0].files:
            np.testing.assert_array_equal(other[key], models[0][key])
    for node in summary["nodes"]:
        assert node["test_auc"] == summary["final"]["test_auc"]
        assert node["bytes_sent"] > 0 and node["dropped"] == {}
        for key in ("test_loss", "test_acc", "test_sens", "test_spec", "local_test_auc", "test_threshold"):
            assert key in node, key


def test_each_site_trained_its_hop_and_logged_it(cwt_run):
    out, _ = cwt_run
    topology = tomllib.loads((out / "topology.toml").read_text())
    hops = []
    for peer in topology["peers"]:
        assert peer["address"].startswith("tcp://127.0.0.1:")
        lines = (out / peer["name"] / "metrics.jsonl").read_text().splitlines()
        hops += [json.loads(line)["round"] for line in lines]
        for line in lines:
            record = json.loads(line)
            assert 0 <= record["val_auc"] <= 1 and record["train_loss"] > 0
    assert sorted(hops) == [0, 1, 2]  # one cycle: every site trained exactly one hop


def test_each_site_read_only_its_own_disjoint_shard(cwt_run):
    out, _ = cwt_run
    shards = [np.load(p) for p in sorted((out / "shards").glob("*.npz"))]
    assert len(shards) == 3
    assert sum(len(s["train_labels"]) for s in shards) == 4707
    fingerprints = [{x.tobytes() for x in s["train_images"][:200]} for s in shards]
    assert not fingerprints[0] & fingerprints[1] and not fingerprints[1] & fingerprints[2]


def test_progress_and_results_table_are_shown(cwt_run):
    _, proc = cwt_run
    assert "round 0 trained" in proc.stdout and "final model" in proc.stdout
    assert "summary.json" in proc.stdout


def test_local_baseline_runs_without_network(tmp_path):
    proc = p2p_fl("launch", "topologies/local-3.toml", "--peers", "2", "--rounds", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [n["bytes_sent"] for n in summary["nodes"]] == [0, 0]
    assert all(n["test_auc"] > 0.8 for n in summary["nodes"])


@pytest.mark.parametrize("args, message", [
    (["launch", "topologies/nope.toml"], "no such topology file"),
    (["launch", "topologies/ring-3.toml", "--partition", "zipf"], "partition"),
    (["launch", "topologies/ring-3.toml", "--rounds", "0"], "training.rounds"),
    (["launch", "topologies/ring-3.toml", "--data", "/no/such/data"], "/no/such/data"),
    (["node", "--config", "topologies/ring-3.toml", "--name", "mallory"], "not a peer"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, message):
    proc = p2p_fl(*args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_fedbn_with_a_model_without_batchnorm_is_refused_in_one_line(tmp_path):
    config = tmp_path / "gn.toml"
    config.write_text((ROOT / "topologies" / "ring-3.toml").read_text().replace(
        'model = "small-cnn"', 'fedbn = true\nmodel = "small-cnn-dp"', 1))
    proc = p2p_fl("launch", str(config), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith("training.fedbn needs a model with BatchNorm; small-cnn-dp has none")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("topology, min_auc", [("ring-3.toml", 0.95), ("swt-3.toml", 0.90)])
def test_default_topologies_reach_their_quality_target(tmp_path, topology, min_auc):
    proc = p2p_fl("launch", f"topologies/{topology}", "--out", str(tmp_path), timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["test_auc"] >= min_auc
