"""`p2p-fl predict` on a finished site: the embedded test images written out as PNG files,
read back as training reads them, scored by the site's own final model."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from processes import p2p_fl, shipped_topology, small_dataset

from p2p_fl.data import load_dataset


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(site folder, its data file) of one finished 2-site local run, for every test here."""
    tmp = tmp_path_factory.mktemp("finished")
    data_path = small_dataset(tmp / "small.npz", train=192, val=64, test=40)
    run = p2p_fl("launch", str(shipped_topology(tmp, "local-3.toml")), "--peers", "2", "--rounds", "1", "--engine", "inproc",
                 "--data", str(data_path), "--out", str(tmp / "run"), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return sorted(p.parent for p in (tmp / "run").glob("*/result.json"))[0], data_path


def test_predict_scores_png_files_as_the_site_scored_its_test_set(tmp_path, finished):
    site, data_path = finished
    result = json.loads((site / "result.json").read_text())
    test = load_dataset(str(data_path)).test
    folder = tmp_path / "new-images"
    for label in (0, 1):
        (folder / f"class{label}").mkdir(parents=True)
    for i, (image, label) in enumerate(zip(test.images, test.labels)):
        pixels = np.rint(image[..., 0] * 255).astype(np.uint8)  # exact: the npz holds uint8 pixels
        Image.fromarray(pixels).save(folder / f"class{label}" / f"x{i:03d}.png")
    (folder / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    done = p2p_fl("predict", str(site), str(folder), "--out", str(tmp_path / "p.csv"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "40 image(s) at threshold" in done.stdout and "1 unreadable file(s) skipped" in done.stdout
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and set(rows[0]) == {"file", "p_pneumonia", "predicted", "threshold"}
    # The same model on the same pixels as the site's own evaluation: its test AUC again (launch
    # --data made the shared test set that file's test split: these 40 images).
    assert result["test_set"] == str(data_path)
    from p2p_fl.learn.metrics import roc_auc

    probs = np.array([float(r["p_pneumonia"]) for r in rows])
    labels = np.array([int("class1" in r["file"]) for r in rows])
    assert abs(roc_auc(labels, probs) - result["test_auc"]) < 1e-6
    threshold = result["test_threshold"]
    assert all(r["predicted"] == ("pneumonia" if float(r["p_pneumonia"]) >= threshold else "normal") for r in rows)


def test_predict_on_a_folder_without_a_finished_run_is_one_line(tmp_path):
    done = p2p_fl("predict", str(tmp_path), str(tmp_path), timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("p2p-fl: error: ")
    assert "no finished site run here" in done.stderr and "Traceback" not in done.stderr


def test_export_gives_weights_and_a_function_that_predict_agrees_with_without_p2p_fl(tmp_path, finished):
    site, data_path = finished
    done = p2p_fl("export", str(site), "--out", str(tmp_path / "x"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Read back with safetensors and jax alone (no p2p_fl import): the same weights, the
    # same probabilities as the site's model gives.
    script = f"""
import json, numpy as np, jax
from safetensors import safe_open
from safetensors.numpy import load_file
weights = load_file("{tmp_path}/x/model.safetensors")
saved = dict(np.load("{site}/final_model.npz"))
assert set(weights) == set(saved) and all(np.array_equal(weights[k], saved[k]) for k in saved)
with safe_open("{tmp_path}/x/model.safetensors", "np") as f:
    meta = f.metadata()
assert json.loads(meta["classes"]) == ["normal", "pneumonia"] and json.loads(meta["model"]) == "small-cnn"
images = np.load("{data_path}")["test_images"][..., None].astype(np.float32) / 255
fn = jax.export.deserialize(open("{tmp_path}/x/model.jaxexport", "rb").read())
np.save("{tmp_path}/probs.npy", np.asarray(fn.call(images)))
"""
    import subprocess
    import sys

    checked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "p2p_fl" not in checked.stderr
    from p2p_fl.predict import load_site_model

    learner, _ = load_site_model(site)
    expected = learner.predict_proba(load_dataset(str(data_path)).test.images)
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), expected, atol=1e-6)
    description = json.loads((tmp_path / "x" / "model.json").read_text())
    assert description["input"]["shape"] == ["N", 28, 28, 1] and description["threshold"] is not None


def test_status_of_a_finished_site_says_so(finished):
    site, _ = finished
    shown = p2p_fl("status", str(site), timeout=120)
    assert shown.returncode == 0 and "finished (local)" in shown.stdout and "with the federation" in shown.stdout
