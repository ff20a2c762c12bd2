"""Centralized training: the same model on the pooled data, the reference every federated
run is compared with (the chest X-ray study's "central model")."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from p2p_fl.config import Topology, data_options
from p2p_fl.data import load_dataset, subsample
from p2p_fl.site import learning_rate_at, make_learner


def run_centralized(topology: Topology, out: Path, *, dataset: str | None = None,
                    epochs: int | None = None, seed: int | None = None) -> dict:
    """Trains on all training data with the topology's model and optimiser settings.

    The default number of epochs, rounds x local_epochs, is what every site of a CWT run
    contributes in total, so the two runs see the data the same number of times. The
    learning-rate schedule is the one the federation uses, stepped per epoch.
    """
    out.mkdir(parents=True, exist_ok=True)
    if seed is not None:
        topology = dataclasses.replace(topology, seed=seed)
    data = load_dataset(dataset or topology.data.dataset, **data_options(topology.data))
    data = subsample(data, topology.data.train_images, topology.seed)  # the federation's pooled images
    epochs = epochs or topology.training.rounds * topology.training.local_epochs
    learner = make_learner(topology, data.num_classes, data.image_shape)
    started = time.monotonic()
    with (out / "metrics.jsonl").open("w") as metrics:
        for epoch in range(epochs):
            lr = learning_rate_at(topology, epoch / epochs)
            loss = learner.fit(data.train.images, data.train.labels, epochs=1, learning_rate=lr)[-1]
            val = learner.evaluate(data.val.images, data.val.labels)
            metrics.write(json.dumps({"round": epoch, "lr": lr, "train_loss": loss, "val_loss": val["loss"],
                                      "val_auc": val["auc"], "elapsed_s": time.monotonic() - started}) + "\n")
    wall_s = time.monotonic() - started
    report = learner.evaluate(data.test.images, data.test.labels, data.val.images, data.val.labels)
    summary = {
        "protocol": "centralized", "peers": 1, "model": topology.training.model, "epochs": epochs,
        "seed": topology.seed, "samples": len(data.train), "wall_s": wall_s,
        "logit_adjustment": learner.logit_adjustment,
        "final": {f"test_{k}": float(v) for k, v in report.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    np.savez(out / "final_model.npz", **learner.get_weights())  # the reference ROC in `p2p-fl report`
    return summary
