"""`p2p-fl experiment`: sweep files checked field by field, and a tiny sweep that really runs.

The real sweep (about 30 s here) launches one 2-site CWT federation on a tiny dataset and
the centralized reference, then runs the same command again to check it resumes.
"""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import ROOT, p2p_fl, small_dataset

from p2p_fl.config import ConfigError
from p2p_fl.experiment import SweepError, aggregate, load_sweep

RING = ROOT / "topologies" / "ring-3.toml"


def tiny_dataset(path, *, train=256, val=128, test=128):
    """The first images of the embedded data as one small .npz (a run trains in seconds)."""
    return small_dataset(path, train=train, val=val, test=test)


def write(tmp_path, text):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def gossip_3_sweep(tmp_path, *, label, rounds):
    """A one-run sweep: gossip-3 on the tiny dataset for `rounds` rounds of small batches."""
    data = tiny_dataset(tmp_path / "tiny.npz")
    return write(tmp_path, f"""
seeds = [0]
topology = "{ROOT / 'topologies' / 'gossip-3.toml'}"
dataset = "{data}"
[[federations]]
label = "{label}"
rounds = {rounds}
set = {{ "data.test" = "{data}", "training.batch_size" = 32, "training.min_local_steps" = 0 }}
""")


def test_a_sweep_expands_into_runs_named_by_configuration(tmp_path):
    path = write(tmp_path, f"""
seeds = [0, 1]
peers = [3]
partitions = ["iid", "dirichlet:0.5"]
topology = "{RING}"
[centralized]
epochs = 4
[[federations]]
label = "CWT"
rounds = 2
peers = [3, 10]
[[federations]]
label = "SWT"
protocol = "swt"
rounds = 1
local_epochs = 2
partitions = ["iid"]
set = {{ "training.batch_size" = 32, "training.min_local_steps" = 0 }}
""")
    runs = load_sweep(path)
    names = [r.name for r in runs]
    assert names[:2] == ["centralized-seed0", "centralized-seed1"]
    assert "CWT-10-dirichlet0.5-seed1" in names and "SWT-3-iid-seed0" in names
    assert len(names) == 2 + 2 * 2 * 2 + 2
    swt = next(r for r in runs if r.name == "SWT-3-iid-seed1")
    assert swt.topology.protocol == "swt" and swt.topology.training.batch_size == 32
    assert swt.topology.seed == 1 and swt.topology.training.local_epochs == 2
    cwt = next(r for r in runs if r.name == "CWT-10-dirichlet0.5-seed0")
    assert len(cwt.topology.peers) == 10 and cwt.topology.data.partition == "dirichlet:0.5"
    assert runs[0].epochs == 4


def test_train_images_shrinks_every_run_of_a_sweep_the_reference_included(tmp_path):
    runs = load_sweep(write(tmp_path, f"""
seeds = [0]
topology = "{RING}"
train_images = 300
[centralized]
[[federations]]
label = "CWT"
"""))
    assert [r.topology.data.train_images for r in runs] == [300, 300]
    with pytest.raises(SweepError, match="train_images"):
        load_sweep(write(tmp_path, f'train_images = 0\ntopology = "{RING}"\n[centralized]\n'))


def test_a_sweep_wide_set_applies_to_every_federation_before_its_own(tmp_path):
    runs = load_sweep(write(tmp_path, f"""
seeds = [0]
topology = "{RING}"
set = {{ "training.min_local_steps" = 4, "training.batch_size" = 32 }}
[[federations]]
label = "a"
[[federations]]
label = "b"
set = {{ "training.batch_size" = 16 }}
"""))
    assert [(r.topology.training.min_local_steps, r.topology.training.batch_size) for r in runs] == [(4, 32), (4, 16)]


def test_the_centralized_reference_takes_its_own_set_not_the_sweep_s(tmp_path):
    runs = load_sweep(write(tmp_path, f"""
seeds = [0]
topology = "{RING}"
set = {{ "training.batch_size" = 32 }}
[centralized]
set = {{ "training.logit_adjustment" = false }}
[[federations]]
label = "a"
"""))
    assert [(r.label, r.topology.training.batch_size, r.topology.training.logit_adjustment) for r in runs] == [
        ("centralized", 64, False), ("a", 32, True)]


def test_an_entry_may_run_fewer_seeds_than_the_sweep(tmp_path):
    runs = load_sweep(write(tmp_path, f'seeds = [0, 1, 2]\ntopology = "{RING}"\n[[federations]]\nlabel = "all"\n'
                                      '[[federations]]\nlabel = "screen"\nseeds = [0]\n'))
    assert [r.name for r in runs] == ["all-3-iid-seed0", "all-3-iid-seed1", "all-3-iid-seed2", "screen-3-iid-seed0"]


def test_a_list_of_centralized_epochs_adds_references_after_the_first(tmp_path):
    runs = load_sweep(write(tmp_path, f'seeds = [0, 1]\ntopology = "{RING}"\n[centralized]\nepochs = [5, 40]\n'))
    assert [(r.name, r.label, r.epochs) for r in runs] == [
        ("centralized-seed0", "centralized", 5), ("centralized-seed1", "centralized", 5),
        ("centralized-40ep-seed0", "centralized-40ep", 40), ("centralized-40ep-seed1", "centralized-40ep", 40)]


@pytest.mark.parametrize("text, field", [
    ("seeds = [0]\nbogus = 1\n[centralized]\n", "unknown field bogus"),
    (f'topology = "{RING}"\n[centralized]\nepochs = [5, 0]\n', "centralized.epochs must be >= 1"),
    (f'set = 3\n[[federations]]\nlabel = "a"\ntopology = "{RING}"\n', "set must be a table"),
    (f'topology = "{RING}"\n[centralized]\nset = {{ "training.modle" = 1 }}\n', "training.modle"),
    ("seeds = 0\n[centralized]\n", "seeds must be a non-empty list of integers"),
    (f'[[federations]]\nlabel = "a"\ntopology = "{RING}"\npeers = ["3"]\n', "federations[0].peers"),
    (f'[[federations]]\nlabel = "a b"\ntopology = "{RING}"\n', "federations[0].label"),
    ('[[federations]]\nlabel = "a"\ntopology = "nope.toml"\n', "federations[0].topology: no such topology file"),
    (f'[[federations]]\nlabel = "a"\ntopology = "{RING}"\npartitions = ["dirichlet:x"]\n', "federations[0].partitions[0]"),
    (f'[[federations]]\nlabel = "a"\ntopology = "{RING}"\nset = {{ "training.modle" = 1 }}\n', "training.modle"),
    (f'[[federations]]\nlabel = "a"\ntopology = "{RING}"\nprotocol = "fedsgd"\n', "federations[0].protocol"),
    (f'[[federations]]\nlabel = "a"\ntopology = "{RING}"\n[[federations]]\nlabel = "a"\ntopology = "{RING}"\n',
     "federations[1]: run a-3-iid-seed0 is already in an earlier entry"),
    ("seeds = [0]\n", "nothing to run"),
])
def test_a_wrong_sweep_file_is_refused_naming_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(write(tmp_path, text))


def test_the_command_prints_one_line_for_a_wrong_sweep(tmp_path):
    proc = p2p_fl("experiment", str(write(tmp_path, "seeds = [0]\nbogus = 1\n")))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "unknown field bogus" in proc.stderr


def test_aggregate_gives_mean_spread_and_time_reduction_against_centralized():
    rows = [{"label": "centralized", "protocol": "centralized", "peers": 1, "partition": "pooled", "seed": s,
             "wall_s": w, "test_auc": 0.9} for s, w in ((0, 100.0), (1, 300.0))]
    rows += [{"label": "CWT", "protocol": "cwt", "peers": 3, "partition": "iid", "seed": s,
              "wall_s": w, "test_auc": a, "worst_site_auc": a - 0.05}
             for s, w, a in ((0, 50.0, 0.8), (1, 150.0, 0.9), (2, 100.0, 1.0))]
    table = {r["label"]: r for r in aggregate(rows)}
    assert table["CWT"]["worst_site_auc_min"] == pytest.approx(0.75)  # the least good site of the worst seed
    assert table["CWT"]["n"] == 3 and table["CWT"]["seeds"] == "0,1,2"
    assert table["CWT"]["test_auc"] == pytest.approx(0.9) and table["CWT"]["test_auc_std"] == pytest.approx(0.1)
    assert table["CWT"]["time_reduction"] == pytest.approx(0.5)  # 100 s against 200 s
    assert table["centralized"]["time_reduction"] == pytest.approx(0.0)


def test_a_tiny_sweep_runs_writes_its_tables_and_resumes(tmp_path):
    data = tiny_dataset(tmp_path / "tiny.npz")
    sweep = write(tmp_path, f"""
seeds = [0]
topology = "{RING}"
dataset = "{data}"
[centralized]
epochs = 1
[[federations]]
label = "CWT"
peers = [2]
rounds = 1
set = {{ "data.test" = "{data}", "training.batch_size" = 32, "training.min_local_steps" = 0 }}
""")
    out = tmp_path / "out"
    proc = p2p_fl("experiment", str(sweep), "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1/2] centralized-seed0: done in" in proc.stdout and "[2/2] CWT-2-iid-seed0: done in" in proc.stdout
    summary = json.loads((out / "CWT-2-iid-seed0" / "summary.json").read_text())
    assert summary["peers"] == 2 and len(summary["nodes"]) == 2
    with (out / "results.csv").open() as f:
        table = {r["label"]: r for r in csv.DictReader(f)}
    assert set(table) == {"centralized", "CWT"}
    cwt = table["CWT"]
    assert float(cwt["test_auc"]) == pytest.approx(summary["final"]["test_auc"])
    assert float(cwt["wall_s"]) == pytest.approx(summary["wall_s"])
    central = json.loads((out / "centralized-seed0" / "summary.json").read_text())
    assert float(cwt["time_reduction"]) == pytest.approx(1 - summary["wall_s"] / central["process_wall_s"])
    site_auc = sum(n["local_test_auc"] for n in summary["nodes"]) / 2
    assert float(cwt["local_test_auc"]) == pytest.approx(site_auc)
    markdown = (out / "results.md").read_text()
    assert "Runs finished: 2 of 2" in markdown and "| CWT | cwt | 2 | iid | 0 |" in markdown

    again = p2p_fl("experiment", str(sweep), "--out", str(out), timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("done before, skipped") == 2


def test_a_sweep_runs_in_process_with_engine_inproc(tmp_path):
    """`experiment --engine inproc`: every federation of the sweep runs its sites in one child
    process of its own (`launch --engine inproc`), with the same folders and tables."""
    sweep = gossip_3_sweep(tmp_path, label="FedAvg", rounds=2)
    out = tmp_path / "out"
    proc = p2p_fl("experiment", str(sweep), "--out", str(out), "--engine", "inproc", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "FedAvg-3-iid-seed0" / "summary.json").read_text())
    assert summary["engine"] == "inproc" and len(summary["nodes"]) == 3
    assert all(n["final_kept_own"] is False and n["dropped"] == {} for n in summary["nodes"])
    with (out / "results.csv").open() as f:
        assert [r["label"] for r in csv.DictReader(f)] == ["FedAvg"]


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_a_sweep_stopped_with_sigterm_stops_its_run_too(tmp_path):
    """A service manager or `kill` stops the runner with SIGTERM: it unwinds as for Ctrl-C
    (exit 130) and takes the run's child process with it, instead of leaving it training."""
    sweep = gossip_3_sweep(tmp_path, label="long", rounds=500)
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, "-m", "p2p_fl", "experiment", str(sweep), "--out", str(out),
                               "--engine", "inproc"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    children = []
    try:
        # Stopped once the child has written into its run folder: well past the fork, so the
        # runner is waiting on it, not still starting it.
        run_dir = out / "long-3-iid-seed0"
        deadline = time.monotonic() + 120

        def child_at_work():
            return (run_dir.exists() and any(p.name != "sweep-run.toml" for p in run_dir.iterdir())
                    and _children(runner.pid))

        while not child_at_work() and runner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        children = _children(runner.pid)
        assert children, "the run's child process never started"
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 130
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children), "the run's process outlived the runner"
        # Read only now: an orphaned child would hold the pipe open and the read would never end.
        assert "interrupted" in runner.stderr.read()
    finally:
        runner.kill()
        runner.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
