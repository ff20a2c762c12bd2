"""Personalization as a reported figure: each site fine-tunes a copy of its final model on
its own data and reports the copy's AUC on its own test split; the shared model is what it
saves and what every other figure is about."""

import json

import numpy as np
from processes import p2p_fl, shipped_topology, small_dataset


def test_sites_report_a_fine_tuned_auc_and_keep_the_federation_s_model(tmp_path):
    data = small_dataset(tmp_path / "small.npz", train=300, val=60, test=150)
    topology = shipped_topology(tmp_path, "gossip-3.toml", **{"augment = true": "augment = true\npersonalize_epochs = 2"})
    out = tmp_path / "out"
    proc = p2p_fl("launch", str(topology), "--out", str(out), "--data", str(data), "--rounds", "2",
                  "--engine", "inproc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = json.loads((out / "summary.json").read_text())["nodes"]
    for node in nodes:
        assert node["personalize_epochs"] == 2 and 0.0 <= node["personalized_test_auc"] <= 1.0, node
        assert node["personalized_test_auc"] != node["local_test_auc"]  # the copy did train
    # Secure FedAvg on the complete graph, nobody dropped: every site saved the one shared
    # model, not its fine-tuned copy.
    finals = [dict(np.load(out / n["name"] / "final_model.npz")) for n in nodes]
    for other in finals[1:]:
        for k in finals[0]:
            np.testing.assert_allclose(other[k], finals[0][k], atol=1e-5)
