"""The federation fingerprint: sites that do not run the same federation find out before
round 0, every one of them, with the field named; afterwards such a peer is only refused.

The end-to-end test is the issue's own case: one hospital's copy of the topology says 3
rounds where the others say 2 (before, one site ended in a traceback mid-run while the
others "finished normally")."""

import dataclasses
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from processes import ROOT, finish_all, p2p_fl, small_shards, write_federation

from p2p_fl.config import load_topology
from p2p_fl.fingerprint import FIELD_HEX, federation_fingerprint
from p2p_fl.launch import free_ports
from p2p_fl.net import Curve, Peer, wire

TOPOLOGY = ('protocol = "cwt"\n[training]\nrounds = 2\nlocal_epochs = 1\nbatch_size = 32\n'
            '[network]\nheartbeat_interval_s = 0.3\npeer_timeout_s = 3.0\nstart_window_s = 60\n')


def fingerprint_of(topology, shape=(28, 28, 1), classes=2):
    return federation_fingerprint(topology, shape, classes)


def test_a_changed_setting_is_named_and_a_sites_own_choices_are_not(tmp_path):
    t = load_topology(write_federation(tmp_path, "abc", TOPOLOGY, federation="fp"))
    mine = fingerprint_of(t)
    assert fingerprint_of(t) == mine and len(mine.digest) == 16

    def differing(changed, **kwargs):
        return mine.differing(fingerprint_of(changed, **kwargs).field_digests)

    assert differing(dataclasses.replace(t, training=dataclasses.replace(t.training, rounds=3))) == ["training.rounds"]
    assert differing(dataclasses.replace(t, privacy=dataclasses.replace(t.privacy, clip_norm=2.0))) == \
        ["privacy.clip_norm"]
    assert differing(dataclasses.replace(t, data=dataclasses.replace(t.data, classes=["b", "a"]))) == ["data.classes"]
    assert differing(t, shape=(64, 64, 1)) == ["model input"]
    rekeyed = dataclasses.replace(t.peers[1], public_key=t.peers[0].public_key[::-1])
    assert differing(dataclasses.replace(t, peers=(t.peers[0], rekeyed, t.peers[2]))) == ["peers"]
    # Each site may reach another by its own route (a VPN, a relay): addresses are its own.
    moved = dataclasses.replace(t.peers[1], address="tcp://10.0.0.7:1")
    assert fingerprint_of(dataclasses.replace(t, peers=(t.peers[0], moved, t.peers[2]))) == mine
    # Where a site's data comes from and how long it waits are its own.
    own = dataclasses.replace(t, data=dataclasses.replace(t.data, dataset="mine.npz", test="x.npz", partition="dirichlet:0.5"),
                              network=dataclasses.replace(t.network, run_timeout_s=99.0, start_window_s=5.0))
    assert fingerprint_of(own) == mine
    # Another p2p-fl version may list other fields: the version is what is named.
    assert mine.differing("00" * FIELD_HEX) == ["version"] and mine.differing(None) == ["version"]


def test_sites_whose_topology_copies_differ_all_stop_before_round_0_naming_the_field(tmp_path):
    config = write_federation(tmp_path, "abc", TOPOLOGY, federation="fp-e2e")
    other = config.with_name("topology-c.toml")  # c's copy, edited by hand: 3 rounds
    other.write_text(config.read_text().replace("rounds = 2", "rounds = 3"))
    shards = small_shards(tmp_path, "abc", train=192, val=48, test=48)
    procs = {}
    for n in "abc":
        procs[n] = subprocess.Popen(
            [sys.executable, "-m", "p2p_fl", "node", "--config", str(other if n == "c" else config), "--name", n,
             "--data", str(shards[n]), "--key", str(tmp_path / "keys" / f"{n}.key_secret"),
             "--out", str(tmp_path / n)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = finish_all(procs, timeout=240)
    for n in procs:
        code, _, stderr = outputs[n]
        assert code == 2, (n, stderr[-3000:])
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("p2p-fl: error: ") and "training.rounds" in last, (n, last)
        assert "Traceback" not in stderr
        assert not (tmp_path / n / "metrics.jsonl").read_text()  # nothing was trained
    # a and b agree: each names c; c names the others.
    assert "c runs another federation setup" in outputs["a"][2]
    assert "runs another federation setup: training.rounds" in outputs["c"][2]


def two_peers(tmp_path, federation, b_differs=False):
    """Peers a and b of a two-site federation over CurveZMQ on loopback; returns (a, b,
    ours, theirs), `theirs` being the fingerprint of the same topology with another
    local_epochs: b's from the start with `b_differs`, else `ours` like a's."""
    t = load_topology(write_federation(tmp_path, "ab", TOPOLOGY, federation=federation))
    ours = fingerprint_of(t)
    theirs = fingerprint_of(dataclasses.replace(t, training=dataclasses.replace(t.training, local_epochs=5)))
    keys = {n: tuple(k.decode() for k in zmq.curve_keypair()) for n in "ab"}
    addresses = {n: f"tcp://127.0.0.1:{p}" for n, p in zip("ab", free_ports(2))}

    def peer(me, other, fingerprint):
        curve = Curve(keys[me][0], keys[me][1], {other: keys[other][0]})
        return Peer(me, addresses[me], {other: addresses[other]}, federation, [("w", "float32", (4,))],
                    curve=curve, heartbeat_interval_s=0.2, peer_timeout_s=2.0, fingerprint=fingerprint)

    return peer("a", "b", ours), peer("b", "a", theirs if b_differs else ours), ours, theirs


def test_after_the_start_a_peer_under_another_fingerprint_is_only_refused(tmp_path):
    """A node that already runs (or resumed) keeps going: every message of the odd peer,
    protocol-valid and CURVE-authenticated, is dropped and counted, the fields named."""
    a, b, _, _ = two_peers(tmp_path, "fp-peer", b_differs=True)
    try:
        deadline = time.monotonic() + 30  # generous: a busy machine
        while "b" not in a.mismatched or a.mismatched["b"] == ["(not yet known)"]:
            assert time.monotonic() < deadline, a.dropped
            b.pulse(0)
            b.send("a", wire.MODEL, 0, {"w": np.ones(4, np.float32)})
            assert a.receive(0.1) == []  # nothing of b's gets through
        assert a.mismatched["b"] == ["training.local_epochs"]
        assert a.dropped["mismatched-setup"] >= 2 and "b" not in a.peer_progress  # not even as alive
    finally:
        a.close()
        b.close()


def test_a_peer_switching_setups_again_and_again_is_logged_a_few_times_then_only_counted(tmp_path, caplog):
    """An insider may flip its fingerprint on purpose: every flip used to be two warnings
    ("runs another setup", "now runs the same"). A few are logged, then only counted."""
    a, b, ours, theirs = two_peers(tmp_path, "fp-flip")
    caplog.set_level(logging.WARNING)
    try:
        for flip in range(8):
            b.fingerprint = theirs if flip % 2 == 0 else ours
            deadline = time.monotonic() + 30
            while ("b" in a.mismatched) != (flip % 2 == 0) or a.mismatched.get("b") == ["(not yet known)"]:
                assert time.monotonic() < deadline, (flip, a.dropped)
                b.pulse(0)  # at an honest pace: a flood would be quarantined, another matter
                b.send("a", wire.MODEL, 0, {"w": np.ones(4, np.float32)})
                a.receive(0.25)
                time.sleep(0.1)
        assert a.dropped["mismatched-setup"] >= 4  # every odd message still counted
        lines = [r.getMessage() for r in caplog.records if "federation setup" in r.getMessage()
                 and r.getMessage().startswith("a: b")]
        assert len(lines) == 4 and "further changes are counted, not logged" in lines[-1], lines
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("flag", ["--version"])
def test_the_version_is_one_line(flag):
    from p2p_fl import __version__

    done = p2p_fl(flag, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"p2p-fl {__version__}"
