"""`p2p-fl node` as a hospital's engineer meets it: mistakes a person makes at a site are one
line and exit 2 (no traceback, so a service manager that stops on 2 does not restart a
misconfigured node in a loop), and nothing a running node wrote is touched by a second one."""

import socket
import subprocess
import sys
import time

from processes import ROOT, p2p_fl, small_shards, write_federation

SETTINGS = ('protocol = "cwt"\n[training]\nrounds = 1\nlocal_epochs = 1\nbatch_size = 32\n'
            '[network]\nheartbeat_interval_s = 0.3\npeer_timeout_s = 3.0\nstart_window_s = 120\n')


def node_args(config, name, out, *extra):
    return ("node", "--config", str(config), "--name", name, "--out", str(out),
            "--key", str(config.parent / "keys" / f"{name}.key_secret"), *extra)


def assert_one_line_exit_2(done, *words):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and lines[-1].startswith("p2p-fl: error: "), done.stderr[-3000:]
    for word in words:
        assert word in lines[-1], lines[-1]


def test_a_port_another_program_holds_is_one_line(tmp_path):
    config = write_federation(tmp_path, "ab", SETTINGS, federation="port")
    address = next(line for line in config.read_text().splitlines() if "address" in line and "127.0.0.1" in line)
    port = int(address.rsplit(":", 1)[1].strip('"'))
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        shards = small_shards(tmp_path, "ab", train=64, val=16, test=16)
        done = p2p_fl(*node_args(config, "a", tmp_path / "a", "--data", str(shards["a"])), timeout=300)
    finally:
        holder.close()
    assert_one_line_exit_2(done, "cannot listen on", "another program holds that port")


def test_a_public_key_given_as_the_secret_key_is_named_as_such(tmp_path):
    config = write_federation(tmp_path, "ab", SETTINGS, federation="pubkey")
    done = p2p_fl("node", "--config", str(config), "--name", "a", "--out", str(tmp_path / "a"),
                  "--key", str(tmp_path / "keys" / "a.key"), timeout=300)
    assert_one_line_exit_2(done, "it is a public key", "a.key_secret")
    assert "chmod" not in done.stderr


def test_a_peer_without_an_address_is_one_line(tmp_path):
    config = write_federation(tmp_path, "ab", SETTINGS, federation="noaddr")
    text = config.read_text()
    b_address = [line for line in text.splitlines() if line.startswith("address")][1]
    config.write_text(text.replace(b_address + "\n", ""))
    shards = small_shards(tmp_path, "ab", train=64, val=16, test=16)
    done = p2p_fl(*node_args(config, "a", tmp_path / "a", "--data", str(shards["a"])), timeout=300)
    assert_one_line_exit_2(done, "b have no address")


def test_the_same_node_started_twice_is_refused_and_the_first_keeps_its_files(tmp_path):
    """The first runs without --data (it says so: the topology's demo shard), waiting for b."""
    config = write_federation(tmp_path, "ab", SETTINGS, federation="twice")
    out = tmp_path / "a"
    out.mkdir()
    first = subprocess.Popen([sys.executable, "-m", "p2p_fl", *node_args(config, "a", out)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.log", "w"))
    try:
        deadline = time.monotonic() + 240
        while "waiting up to 120 s for b" not in (tmp_path / "first.log").read_text():
            assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        log = (tmp_path / "first.log").read_text()
        assert "no --data: training on shard 1 of 2 of builtin:pneumoniamnist" in log
        assert "test set: this site's own test split" in log  # no shared one is named
        (out / "metrics.jsonl").write_text("kept\n")  # stands for what the first wrote
        second = p2p_fl(*node_args(config, "a", out), timeout=300)
        assert_one_line_exit_2(second, "node a already runs here", f"pid {first.pid}")
        assert (out / "metrics.jsonl").read_text() == "kept\n"
        assert first.poll() is None  # the first goes on
    finally:
        first.kill()
        first.wait()


def test_launch_into_a_finished_run_is_refused_and_leaves_it_as_it_was(tmp_path):
    (tmp_path / "summary.json").write_text('{"finished": true}')
    (tmp_path / "site-1").mkdir()
    (tmp_path / "site-1" / "metrics.jsonl").write_text("kept\n")
    done = p2p_fl("launch", "topologies/ring-3.toml", "--out", str(tmp_path), timeout=300)
    assert_one_line_exit_2(done, "holds a finished run", "another --out")
    assert (tmp_path / "summary.json").read_text() == '{"finished": true}'
    assert (tmp_path / "site-1" / "metrics.jsonl").read_text() == "kept\n"
    assert not (tmp_path / "keys").exists() and not (tmp_path / "shards").exists()
    (tmp_path / "topology.toml").write_text("")  # a launch folder: --overwrite replaces it
    from processes import shipped_topology, small_dataset

    data = small_dataset(tmp_path.parent / "small-overwrite.npz", train=64, val=16, test=16)
    again = p2p_fl("launch", str(shipped_topology(tmp_path.parent / "local", "local-3.toml")), "--peers", "2",
                   "--rounds", "1", "--engine", "inproc",
                   "--data", str(data), "--out", str(tmp_path), "--overwrite", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished" not in (tmp_path / "summary.json").read_text() and not (tmp_path / "site-1").exists()


def test_the_service_script_finds_p2p_fl_without_a_path_and_passes_the_key(tmp_path):
    """A service's PATH holds no virtualenv (as shipped before, `p2p-fl: not found`): the
    script finds the checkout's p2p-fl and gives it --key (here a public key: p2p-fl's own
    one-line refusal shows the node ran with it)."""
    import os
    import shutil

    if shutil.which("p2p-fl") and not (ROOT / ".venv" / "bin" / "p2p-fl").exists():
        env = {"PATH": "/usr/bin:/bin", "P2P_FL": shutil.which("p2p-fl")}
    else:
        env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    config = write_federation(tmp_path, "ab", SETTINGS, federation="service")
    shards = small_shards(tmp_path, "ab", train=64, val=16, test=16)
    done = subprocess.run([str(ROOT / "launch" / "hospital-node.sh"), str(config), "a", str(shards["a"]),
                           str(tmp_path / "keys" / "a.key"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert_one_line_exit_2(done, "it is a public key")


def test_the_systemd_unit_verifies(tmp_path):
    import shutil

    import pytest

    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze here")
    unit = tmp_path / "p2p-fl-node@hospital-a.service"
    unit.write_text((ROOT / "launch" / "p2p-fl-node@.service").read_text().replace("/opt/p2p_fl", str(ROOT)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "p2p-fl-node" not in done.stderr, done.stderr
    text = unit.read_text()
    assert "RestartPreventExitStatus=2 3 4" in text and "LimitNOFILE=" in text and "--key" not in text


def test_status_shows_a_waiting_node_its_peers_and_then_that_it_is_gone(tmp_path):
    config = write_federation(tmp_path, "ab", SETTINGS, federation="status")
    shards = small_shards(tmp_path, "ab", train=64, val=16, test=16)
    out = tmp_path / "a"
    out.mkdir()
    node = subprocess.Popen([sys.executable, "-m", "p2p_fl", *node_args(config, "a", out, "--data", str(shards["a"]))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "status.json").exists():
            assert time.monotonic() < deadline and node.poll() is None
            time.sleep(0.2)
        shown = p2p_fl("status", str(out), timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert f"running, pid {node.pid}" in shown.stdout and "state: waiting for peers" in shown.stdout
        assert "peer b: not heard" in shown.stdout
    finally:
        node.kill()
        node.wait()
    gone = p2p_fl("status", str(out), timeout=120)
    assert gone.returncode == 1 and "NOT RUNNING" in gone.stdout


def test_a_finished_site_folder_is_replaced_only_when_told(tmp_path):
    """Refused without --overwrite (one line, files kept); with it, the run's files go and the
    new run writes its own."""
    from p2p_fl.site import clear_finished_run

    out = tmp_path / "a"
    out.mkdir()
    for name in ("result.json", "final_model.npz", "metrics.jsonl", "notes.txt"):
        (out / name).write_text("old")
    config = write_federation(tmp_path, "ab", SETTINGS, federation="overwrite")
    shards = small_shards(tmp_path, "ab", train=64, val=16, test=16)
    done = p2p_fl(*node_args(config, "a", out, "--data", str(shards["a"])), timeout=300)
    assert_one_line_exit_2(done, "holds a finished run", "--overwrite")
    assert (out / "final_model.npz").read_text() == "old"
    assert sorted(clear_finished_run(out)) == ["final_model.npz", "metrics.jsonl", "result.json"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["notes.txt"]  # only the run's
