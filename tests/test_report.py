"""`p2p-fl report`: built from a tiny real sweep, checked in headless Chromium.

The fixture runs `p2p-fl experiment` on a tiny dataset: the centralized reference (1 epoch)
and one 2-site CWT federation (1 cycle), about 30 s here. Chromium (Debian's `chromium`)
renders each report: the page marks how many of its images decoded (naturalWidth > 0), read
back with --dump-dom, and a screenshot must not be blank. Without a chromium binary the
browser checks are skipped, saying so.
"""

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from processes import ROOT, p2p_fl
from test_experiment import tiny_dataset

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no chromium binary (apt-get install chromium)")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data = tiny_dataset(tmp / "tiny.npz")
    sweep = tmp / "sweep.toml"
    sweep.write_text(f"""
seeds = [0]
topology = "{ROOT / 'topologies' / 'ring-3.toml'}"
dataset = "{data}"
[centralized]
epochs = 1
[[federations]]
label = "CWT"
peers = [2]
rounds = 1
set = {{ "training.batch_size" = 32, "training.min_local_steps" = 0 }}
""")
    out = tmp / "out"
    proc = p2p_fl("experiment", str(sweep), "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def run_report(experiment):
    run = experiment / "CWT-2-iid-seed0"
    proc = p2p_fl("report", str(run), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run / "report.html"


def render(page, tmp_path) -> tuple[str, np.ndarray]:
    """(the DOM after load, the screenshot as an array) from headless Chromium."""
    flags = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2400"]
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    return dom.stdout, np.asarray(Image.open(shot).convert("L"))


def images_loaded(dom: str) -> tuple[int, int]:
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert match, "the page's load script did not run"
    return int(match[1]), int(match[2])


def test_a_run_report_has_every_section_and_its_plots(run_report):
    text = run_report.read_text()
    for section in ("Results on the common test set", "Learning curves", "ROC curves", "Communication",
                    "Configuration"):
        assert section in text, section
    for image in ("learning_curves.png", "roc.png", "communication.png"):
        assert f'src="{image}"' in text and (run_report.parent / image).stat().st_size > 1000
    assert "hospital-a" in text and "hospital-b" in text and "messages sent" in text
    assert "Centralized reference:" in text  # found beside the run, as experiment lays it out
    assert 'protocol = "cwt"' in text
    assert "Each site" in text and text.count("95% bootstrap interval") == 2


def test_a_sites_own_folder_gets_the_report_a_clinician_reads(experiment):
    """A deployed node's --out (here a run's site folder) on its own: data and test set,
    AUC with its interval, the confusion matrix at the operating point, ROC, calibration,
    the rounds it trained; the numbers are the site's result.json's and its predictions'."""
    import json

    from p2p_fl.learn.metrics import confusion_matrix

    site = experiment / "CWT-2-iid-seed0" / "hospital-a"
    proc = p2p_fl("report", str(site), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (site / "report.html").read_text()
    result = json.loads((site / "result.json").read_text())
    assert f"AUC {result['test_auc']:.3f} (95% bootstrap interval" in text
    assert "normal: " in text and "pneumonia: " in text  # the classes with their training counts
    saved = np.load(site / "test_predictions.npz")
    matrix = confusion_matrix(saved["labels"], saved["probs"] >= result["test_threshold"], 2)
    cells = re.findall(r"<td>(\d+)</td>", text.split("true \\ predicted")[1])[:4]
    assert [int(c) for c in cells] == matrix.ravel().tolist()
    for image in ("roc.png", "calibration.png"):
        assert f'src="{image}"' in text and (site / image).stat().st_size > 1000
    assert "Expected calibration error" in text and "Trained rounds (hops for a ring): " in text
    assert (site / "learning_curves.png").stat().st_size > 1000


@needs_browser
def test_the_run_report_renders_in_chromium_with_every_image(run_report, tmp_path):
    dom, shot = render(run_report, tmp_path)
    assert images_loaded(dom) == (3, 3)
    assert shot.std() > 20 and (shot < 200).mean() > 0.02, "the screenshot is blank"


@needs_browser
def test_the_experiment_report_renders_in_chromium(experiment, run_report, tmp_path):
    proc = p2p_fl("report", str(experiment), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = experiment / "report.html"
    text = page.read_text()
    assert "CWT" in text and "centralized" in text and 'href="CWT-2-iid-seed0/report.html"' in text
    dom, shot = render(page, tmp_path)
    assert images_loaded(dom) == (1, 1)
    assert shot.std() > 20


def test_report_on_a_folder_without_a_run_is_one_line(tmp_path):
    proc = p2p_fl("report", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "neither a run" in proc.stderr
