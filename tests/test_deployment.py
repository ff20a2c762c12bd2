"""docs/deploying.md as three hospitals run it, on this machine: real PNG folders (the
embedded X-rays written out, each hospital naming its class folders its own way), `keygen`
at each site, one hand-written topology with [data] image_size, channels and classes,
`check` at every site at once, three `node` processes, then `status`, `predict` and `export`
at one site. Every command is the CLI a hospital types; nothing is called in-process."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from processes import ROOT, epochs_as_given, finish_all, p2p_fl

from p2p_fl.data import load_dataset
from p2p_fl.launch import free_ports

SITES = {"hospital-a": ("NORMAL", "PNEUMONIA"), "hospital-b": ("normal", "pneumonia"),
         "hospital-c": ("Normal", "Pneumonia")}


def write_site_folder(root, folder_names, start, count):
    """`count` train and a quarter as many test images from the embedded data, as RGB PNGs
    (a scanner's export), under train/ and test/ with this site's folder names."""
    data = load_dataset("builtin:pneumoniamnist")
    for split, source, n in (("train", data.train, count), ("test", data.test, count // 4)):
        for i in range(start, start + n):
            label = int(source.labels[i])
            path = root / split / folder_names[label] / f"img{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            gray = np.rint(source.images[i, ..., 0] * 255).astype(np.uint8)
            Image.fromarray(gray).convert("RGB").save(path)


def run(*args, timeout=300):
    done = p2p_fl(*args, timeout=timeout)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done


def test_three_hospitals_follow_the_deployment_guide(tmp_path):
    ports = dict(zip(SITES, free_ports(len(SITES))))
    peers = ""
    for i, (site, folders) in enumerate(SITES.items()):
        write_site_folder(tmp_path / site / "xrays", folders, start=i * 160, count=160)
        printed = run("keygen", "--name", site, "--out", str(tmp_path / site / "keys")).stdout
        public_line = next(line for line in printed.splitlines() if line.startswith("public_key = "))
        peers += f'[[peers]]\nname = "{site}"\naddress = "tcp://127.0.0.1:{ports[site]}"\n{public_line}\n'
    topology = tmp_path / "federation.toml"
    topology.write_text(epochs_as_given(
        'federation = "deploy-test"\nprotocol = "cwt"\n'
        '[training]\nmodel = "small-cnn"\nrounds = 1\nlocal_epochs = 1\nbatch_size = 32\n'
        '[data]\ntest = ""\nimage_size = 32\nchannels = 1\nclasses = ["normal", "pneumonia"]\n'
        '[network]\nheartbeat_interval_s = 0.5\npeer_timeout_s = 5.0\nstart_window_s = 120\n' + peers))

    def site_args(site):
        return ("--config", str(topology), "--name", site, "--key", str(tmp_path / site / "keys" / f"{site}.key_secret"),
                "--data", str(tmp_path / site / "xrays"))

    # Preflight at every site at once.
    checks = {s: subprocess.Popen([sys.executable, "-m", "p2p_fl", "check", *site_args(s), "--wait", "60"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in SITES}
    for site, (code, stdout, stderr) in finish_all(checks).items():
        assert code == 0, (site, stdout, stderr[-2000:])
        assert stdout.count(": ready:") == 2 and "32x32x1" in stdout
    # The federation.
    nodes = {s: subprocess.Popen([sys.executable, "-m", "p2p_fl", "node", *site_args(s), "--out", str(tmp_path / s / "run")],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in SITES}
    ended = finish_all(nodes, timeout=600)
    logs = {site: stderr for site, (_, _, stderr) in ended.items()}
    for site, (code, _, _) in ended.items():
        assert code == 0, (site, logs[site][-3000:])
        assert "train images per class: 0 normal:" in logs[site]  # the class list, whatever the folder case
        result = json.loads((tmp_path / site / "run" / "result.json").read_text())
        assert result["classes"] == ["normal", "pneumonia"] and result["image_shape"] == [32, 32, 1]
        assert result["test_set"] == "own" and result["shortfall"] == ""
    # The ring's final model is one model at every site.
    finals = [dict(np.load(tmp_path / s / "run" / "final_model.npz")) for s in SITES]
    assert all(np.array_equal(finals[0][k], f[k]) for f in finals[1:] for k in finals[0])
    # At hospital-a afterwards.
    a = tmp_path / "hospital-a"
    assert "finished (cwt)" in run("status", str(a / "run")).stdout
    predicted = run("predict", str(a / "run"), str(a / "xrays" / "test"), "--out", str(a / "p.csv")).stdout
    assert "40 image(s) at threshold" in predicted
    run("export", str(a / "run"), "--out", str(a / "model"))
    assert json.loads((a / "model" / "model.json").read_text())["input"]["shape"] == ["N", 32, 32, 1]
