"""`p2p-fl predict`: a finished site's model on new images, as a CSV a clinician's tools read.

The model is rebuilt from what the site's result.json records (model, input shape, classes)
and its final_model.npz; images are read exactly as training read them (the same decoder,
size, channels, DICOM windowing). For two classes the decision is at the threshold the site
chose on its own validation data (result.json), else at the highest probability.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from p2p_fl.data import DataError
from p2p_fl.data.sources import image_files_under, read_images
from p2p_fl.files import write_atomic


class PredictError(ValueError):
    """A run folder or an image set `predict` cannot use; one line naming it."""


def load_site_model(run: Path):
    """(learner with the site's final model, result.json) of a node's --out folder."""
    from p2p_fl.learn import Learner

    result_path, model_path = run / "result.json", run / "final_model.npz"
    if not result_path.is_file() or not model_path.is_file():
        raise PredictError(f"{run}: no finished site run here (result.json and final_model.npz); give a node's "
                           "--out folder, or a launch folder's site folder")
    result = json.loads(result_path.read_text())
    if "model" not in result or "image_shape" not in result:
        raise PredictError(f"{result_path}: written by an older p2p-fl without the model's name and input shape")
    if (run / "ensemble_models.npz").exists():
        raise PredictError(f"{run}: an ensemble run predicts with every member's model; predict serves one model")
    learner = Learner(result["model"], num_classes=result["num_classes"], image_shape=tuple(result["image_shape"]))
    with np.load(model_path) as saved:
        learner.set_weights(dict(saved))
    return learner, result


def predict_files(run: Path, inputs: list[Path]) -> tuple[list[dict], list[Path]]:
    """One row per readable image under `inputs` (files or folders); and the files skipped."""
    learner, result = load_site_model(run)
    files = [f for path in inputs for f in _images_of(path)]
    if not files:
        raise PredictError(f"no .png/.jpg/.jpeg or DICOM images in {', '.join(map(str, inputs))}")
    h, _, c = result["image_shape"]
    images, read, skipped = read_images(files, h, c)
    probs = learner.predict_proba(images) if len(images) else np.zeros((0,))
    classes = result.get("classes") or [str(i) for i in range(result["num_classes"])]
    threshold = result.get("test_threshold")  # chosen on the site's validation data, whatever the test set
    rows = []
    for path, p in zip(read, probs):
        if result["num_classes"] == 2:
            cut = 0.5 if threshold is None else threshold
            row = {"file": str(path), f"p_{classes[1]}": float(p), "predicted": classes[int(p >= cut)],
                   "threshold": cut}
        else:
            row = {"file": str(path), **{f"p_{name}": float(q) for name, q in zip(classes, p)},
                   "predicted": classes[int(np.argmax(p))]}
        rows.append(row)
    return rows, skipped


def write_csv(rows: list[dict], path: Path) -> None:
    """Writes the rows atomically (a reader never sees half a file)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)


def _images_of(path: Path) -> list[Path]:
    if not path.exists():
        raise PredictError(f"{path}: no such file or folder")
    try:
        return image_files_under(path)
    except DataError as err:
        raise PredictError(str(err)) from None
