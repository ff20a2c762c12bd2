"""What a node and launch write is private to their user (umask 077, explicit 0600), and
launch never reuses the keys of an earlier run."""

import os
import queue
import stat
import subprocess
import sys

import numpy as np
import pytest
from processes import ROOT, small_dataset, small_shards
from rich.console import Console

from p2p_fl.checkpoint import load_checkpoint, save_checkpoint
from p2p_fl.config import load_topology
from p2p_fl.launch import _NodeProcess, _start, prepare


def modes(folder):
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def open_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_checkpoint_is_0600_whatever_the_umask_and_never_written_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    path = tmp_path / "checkpoint.npz"
    (tmp_path / "checkpoint.npz.tmp").symlink_to(victim)  # a stale or planted temporary name
    old = os.umask(0)
    try:
        save_checkpoint(path, {"round": 3}, {"w": np.arange(4.0)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert victim.read_bytes() == b"untouched" and not (tmp_path / "checkpoint.npz.tmp").exists()
    state, arrays = load_checkpoint(path)
    assert state == {"round": 3} and np.array_equal(arrays["w"], np.arange(4.0))


def test_a_node_writes_only_private_files(tmp_path, open_umask):
    """A real (local, one-epoch) node run under an open umask: every file 0600, folders 0700."""
    shard = small_shards(tmp_path, ["a"], train=64, val=32, test=32)["a"]
    config = tmp_path / "t.toml"
    config.write_text('federation = "priv"\nprotocol = "local"\n[training]\nrounds = 1\nlocal_epochs = 1\n'
                      'batch_size = 32\n[data]\ntest = ""\n[network]\ninsecure = true\n[[peers]]\nname = "a"\n')
    out = tmp_path / "out" / "a"
    proc = subprocess.run([sys.executable, "-m", "p2p_fl", "node", "--config", str(config), "--name", "a",
                           "--data", str(shard), "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = modes(tmp_path / "out")
    assert {"a/final_model.npz", "a/metrics.jsonl", "a/result.json"} <= set(found)
    assert found == {name: (0o700 if (tmp_path / "out" / name).is_dir() else 0o600) for name in found}


def test_launch_starts_nodes_with_umask_077(tmp_path, open_umask):
    written = tmp_path / "written"
    script = f"import os; open({str(written)!r}, 'w').write('x'); print(oct(os.umask(0)))"
    node = _NodeProcess("a", [sys.executable, "-c", script], tmp_path, ["a"], tmp_path.parent)
    _start(node, dict(os.environ), queue.Queue())
    assert node.proc.wait(timeout=60) == 0
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def test_each_launch_makes_fresh_keys_and_removes_the_old_ones(tmp_path, open_umask):
    data = small_dataset(tmp_path / "small.npz", train=64, val=16, test=16)
    config = tmp_path / "t.toml"
    config.write_text(f'federation = "fresh"\nprotocol = "cwt"\n[data]\ndataset = "{data}"\n'
                      '[[peers]]\nname = "a"\n[[peers]]\nname = "b"\n')
    out = tmp_path / "out"
    with open(os.devnull, "w") as devnull:
        console = Console(file=devnull)
        first, _ = prepare(load_topology(config), out, console)
        (out / "keys" / "stale.key_secret").write_text("an old secret\n")
        old_secret = (out / "keys" / "a.key_secret").read_text()
        second, _ = prepare(load_topology(config), out, console)
    assert sorted(p.name for p in (out / "keys").iterdir()) == ["a.key", "a.key_secret", "b.key", "b.key_secret"]
    assert (out / "keys" / "a.key_secret").read_text() != old_secret
    for p1, p2 in zip(first.peers, second.peers):
        assert p1.public_key and p2.public_key and p1.public_key != p2.public_key
    assert load_topology(out / "topology.toml").peers == second.peers
    assert stat.S_IMODE((out / "keys" / "a.key_secret").stat().st_mode) == 0o600
