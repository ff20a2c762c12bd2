"""Supervision in `launch`: a node process that dies is started again and the restart reported.

End to end with real processes: a CWT ring of 3 nodes on tiny shards; the test `kill -9`s one
node (its pid from OUT/<site>/node.pid) and checks that launch restarted it, said so, counted
it in summary.json, and that the run finished with every site's result. About 40 s here.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from processes import ROOT, epochs_as_given, p2p_fl, small_dataset

from p2p_fl.launch import Supervision, after_exit

SITES = ["a", "b", "c"]


@pytest.mark.parametrize("returncode, restarts, expected", [
    (0, 0, "done"),
    (-signal.SIGKILL, 0, "restart"),
    (1, 4, "restart"),
    (-signal.SIGSEGV, 5, "failed"),  # the maximum reached
    (2, 0, "failed"),  # the node refused its input: starting it again cannot help
])
def test_which_exits_are_restarted(returncode, restarts, expected):
    assert after_exit(returncode, restarts, Supervision(max_restarts=5)) == expected


def test_a_node_killed_after_it_wrote_its_result_is_done_not_restarted():
    """Found by p2p-fl chaos: s3 was killed between writing result.json and exiting; launch
    restarted it, the restart refused the finished --out (exit 2) and launch called the run
    failed."""
    assert after_exit(-signal.SIGKILL, 0, Supervision(), finished=True) == "done"


def test_no_restart_turns_supervision_off():
    assert after_exit(-signal.SIGKILL, 0, Supervision(restart=False)) == "failed"


def ring_topology(path, *, rounds: int) -> None:
    peers = "".join(f'[[peers]]\nname = "{n}"\n' for n in SITES)
    path.write_text(epochs_as_given(
        f'federation = "supervised"\nprotocol = "cwt"\n[training]\nrounds = {rounds}\nlocal_epochs = 1\n'
        'batch_size = 32\n[ring]\norder = "listed"\n[data]\ntest = ""\n'
        '[network]\nack_timeout_s = 1.0\nhandoff_timeout_s = 60.0\nrun_timeout_s = 300.0\n' + peers))


def wait_for(path, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout_s} s")


@pytest.mark.parametrize("processes", [None, 1], ids=["node", "group"])
def test_a_killed_node_is_restarted_reported_and_the_run_finishes(tmp_path, processes):
    """One process per site (c's is killed), or all three sites in one process (`--processes
    1`: the group's process is killed, and every site in it resumes)."""
    topology, out = tmp_path / "ring.toml", tmp_path / "out"
    ring_topology(topology, rounds=2)
    data = small_dataset(tmp_path / "small.npz", train=384, val=192, test=192)
    killed = "c" if processes is None else "group-1"
    launch = subprocess.Popen(
        [sys.executable, "-m", "p2p_fl", "launch", str(topology), "--data", str(data), "--out", str(out),
         "--restart-delay", "0.5", *(["--processes", str(processes)] if processes else [])],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # c trains the third hop, so it holds no model yet when it dies: the ring loses nothing
        # even where a node comes back without its state. The group dies as it starts.
        pid = int(wait_for(out / killed / "node.pid"))
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = launch.communicate(timeout=300)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, stdout + stderr
    assert f"{killed} was killed by SIGKILL; restarting" in stdout, stdout
    assert f"{killed}: restarted (1 of at most 5)" in stdout, stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == ({"a": 0, "b": 0, "c": 1} if processes is None else {"a": 1, "b": 1, "c": 1})
    assert sorted(n["name"] for n in summary["nodes"]) == SITES
    assert not (out / killed / "node.pid").exists()  # it names a running process only
    assert f"--- launch: restart 1 of {killed} ---" in (out / killed / "node.log").read_text()
    for i, site in enumerate(SITES):  # each site trained both of its hops, once
        hops = [json.loads(line)["round"] for line in (out / site / "metrics.jsonl").read_text().splitlines()]
        assert hops == [i, i + 3], (site, hops)


def test_bad_supervision_flags_are_one_line_errors(tmp_path):
    proc = p2p_fl("launch", "topologies/ring-3.toml", "--restart-delay", "-1", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--restart-delay must be >= 0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_node_on_a_full_disk_stops_in_one_line_with_exit_1(tmp_path):
    """Found by p2p-fl chaos: a metrics line written on a full disk ended the node with a
    traceback. Here no file of the node's may grow (RLIMIT_FSIZE 0: writes fail with EFBIG,
    as ENOSPC on a full disk): whatever it writes first, it stops in one line, exit 1 (launch
    or systemd restarts it; it resumes from its last checkpoint)."""
    import resource

    from processes import small_shards, write_federation
    from p2p_fl.launch import node_env

    config = write_federation(tmp_path, "ab", 'protocol = "gossip"\n[training]\nrounds = 2\nlocal_epochs = 1\n'
                              '[gossip]\nsecure = false\nround_timeout_s = 2.0\n[data]\ntest = ""\n'
                              '[network]\nstart_window_s = 0\n', federation="full-disk")
    shards = small_shards(tmp_path, "ab", train=128, val=32, test=32)
    out = tmp_path / "a"
    out.mkdir()

    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run([sys.executable, "-m", "p2p_fl", "node", "--config", str(config), "--name", "a",
                           "--data", str(shards["a"]), "--key", str(tmp_path / "keys" / "a.key_secret"),
                           "--out", str(out)], cwd=ROOT, env=node_env(2), capture_output=True, text=True,
                          timeout=300, preexec_fn=full_disk)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("p2p-fl: error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "cannot write" in errors[0] and "start the node again" in errors[0], errors
