"""`p2p-fl check`: the preflight two hospitals run before their first federation, as real
processes over CurveZMQ: it reports every peer ready, silent or set up differently, and it
never trains nor opens a running node's start window."""

import subprocess
import sys

from processes import ROOT, finish_all, small_shards, wait_listening, write_federation

from p2p_fl.config import load_topology

SETTINGS = ('protocol = "cwt"\n[training]\nrounds = 2\nlocal_epochs = 1\nbatch_size = 32\n'
            '[network]\nheartbeat_interval_s = 0.3\npeer_timeout_s = 3.0\n')


def check(config, name, data, wait=60.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "p2p_fl", "check", "--config", str(config), "--name", name, "--data", str(data),
         "--key", str(config.parent / "keys" / f"{name}.key_secret"), "--wait", str(wait)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_sites_checking_at_once_see_each_other_ready(tmp_path):
    config = write_federation(tmp_path, "ab", SETTINGS, federation="preflight")
    shards = small_shards(tmp_path, "ab", train=64, val=16, test=16)
    done = finish_all({n: check(config, n, shards[n]) for n in "ab"})
    for n, other in (("a", "b"), ("b", "a")):
        code, stdout, stderr = done[n]
        assert code == 0, (stdout, stderr[-2000:])
        assert f"peer {other} (tcp://127.0.0.1:" in stdout and "ready" in stdout.splitlines()[-1]
        assert "model: small-cnn for 28x28x1 inputs, 2 classes: builds" in stdout
        assert "keys: CURVE" in stdout
    assert not any((tmp_path / n).exists() for n in "ab")  # nothing written: no run


def test_a_silent_peer_and_a_peer_set_up_differently_are_told_apart(tmp_path):
    config = write_federation(tmp_path, "abc", SETTINGS, federation="preflight2")
    other = config.with_name("c.toml")
    other.write_text(config.read_text().replace("batch_size = 32", "batch_size = 64"))
    shards = small_shards(tmp_path, "abc", train=96, val=24, test=24)
    # c's check listens before a's starts, so a needs only a short wait: c answers at once,
    # and b (never started) stays silent for the whole of it.
    c = check(other, "c", shards["c"], wait=120.0)
    try:
        wait_listening(int(load_topology(other).peer("c").address.rsplit(":", 1)[1]), [c])
        code, stdout, stderr = finish_all({"a": check(config, "a", shards["a"], wait=10.0)})["a"]
    finally:
        c.kill()
        c.communicate()
    assert code == 2, (stdout, stderr[-2000:])
    assert "peer c (" in stdout and "other setup: training.batch_size differ" in stdout
    assert "peer b (" in stdout and "no answer" in stdout
    assert stderr.strip().splitlines()[-1].startswith("p2p-fl: error: a peer runs another federation setup")
    assert "Traceback" not in stderr


def test_a_check_beside_a_waiting_node_sees_it_ready_and_does_not_start_it(tmp_path):
    import time

    from processes import start_node

    config = write_federation(tmp_path, "ab", SETTINGS + "start_window_s = 120\n", federation="preflight3")
    shards = small_shards(tmp_path, "ab", train=64, val=16, test=16)
    node = start_node(config, "a", shards["a"], tmp_path / "a", num_nodes=2)
    log = tmp_path / "a" / "node.log"
    try:
        deadline = time.monotonic() + 240
        while "waiting up to 120 s for b" not in log.read_text():
            assert time.monotonic() < deadline and node.poll() is None, log.read_text()
            time.sleep(0.2)
        code, stdout, stderr = finish_all({"b": check(config, "b", shards["b"])})["b"]
        assert code == 0 and "peer a (" in stdout and ": ready:" in stdout, (stdout, stderr[-2000:])
        time.sleep(1.0)
        assert node.poll() is None and "starting" not in log.read_text().split("waiting up to")[-1]
        assert not (tmp_path / "a" / "metrics.jsonl").read_text()  # a still waits for b's node
    finally:
        node.kill()
        node.wait()
