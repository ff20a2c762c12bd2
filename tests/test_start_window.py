"""Sites that start apart, as hospitals start their nodes by hand: real node processes.

A fresh node waits for every peer before its first round (network.start_window_s), so a
site started seconds later is in round 0's mix; a node that never meets the others gives up
loudly after the window (exit 4, one line, its checkpoint kept), never as a quiet success.
"""

import json
import time

from processes import small_shards, start_node, write_federation

from p2p_fl.launch import GAVE_UP_EXIT

GOSSIP = ('protocol = "gossip"\n[training]\nrounds = 2\nlocal_epochs = 1\nbatch_size = 32\n'
          '[gossip]\nsecure = false\nround_timeout_s = 4.0\n[data]\ntest = ""\n'
          '[network]\nheartbeat_interval_s = 0.3\npeer_timeout_s = 3.0\nstart_window_s = {window}\n')


def finish(proc, timeout=240) -> int:
    try:
        proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def test_a_site_started_late_is_waited_for_and_mixes_from_round_0(tmp_path):
    config = write_federation(tmp_path, "ab", GOSSIP.format(window=120.0), federation="late")
    shards = small_shards(tmp_path, "ab", train=256, val=64, test=64)
    a = start_node(config, "a", shards["a"], tmp_path / "a", num_nodes=2)
    try:
        # b starts once a is well under way (a's round_timeout_s is 4 s: without the window a
        # would have trained and mixed alone by then).
        deadline = time.monotonic() + 120
        while "waiting up to 120 s for b" not in (tmp_path / "a" / "node.log").read_text():
            assert time.monotonic() < deadline and a.poll() is None, (tmp_path / "a" / "node.log").read_text()
            time.sleep(0.1)
        time.sleep(6.0)
        b = start_node(config, "b", shards["b"], tmp_path / "b", num_nodes=2)
        codes = {"b": finish(b), "a": finish(a)}
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert codes == {"a": 0, "b": 0}, [(tmp_path / n / "node.log").read_text()[-2000:] for n in "ab"]
    for n in "ab":
        mixes = [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                 if "mixed_round" in line]
        assert [m["survivors"] for m in mixes] == [1, 1], mixes  # the other site in every round
        assert json.loads((tmp_path / n / "result.json").read_text())["shortfall"] == ""


def test_a_node_that_never_meets_its_peers_gives_up_after_the_window_and_says_why(tmp_path):
    """b never starts: a waits the start window, then for b in round 0 until the deadline
    (b might be back in a moment), and, with every peer silent past the window and nothing
    to train, stops in one line: exit 4, its checkpoint kept for a restart, no result."""
    config = write_federation(tmp_path, "ab", GOSSIP.format(window=2.0), federation="alone")
    shards = small_shards(tmp_path, "ab", train=256, val=64, test=64)
    a = start_node(config, "a", shards["a"], tmp_path / "a", num_nodes=2)  # b never starts
    assert finish(a) == GAVE_UP_EXIT
    log = (tmp_path / "a" / "node.log").read_text()
    assert "starting without b" in log and "no peer heard for" in log and "Traceback" not in log
    assert (tmp_path / "a" / "checkpoint.npz").exists() and not (tmp_path / "a" / "result.json").exists()
