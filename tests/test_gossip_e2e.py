"""Gossip end to end: real node processes over ZeroMQ/CURVE on tcp loopback, real training.

Bounded for CI: tiny shards (256 images a site), one local epoch, two rounds; each test
runs under a minute here (the plain-run fixture, two runs, about a minute together).
Training is deterministic (checked first), so plain and secure gossip from the same seeds
differ only by the secure sums' fixed-point rounding, carried through the next round's
training.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from processes import ROOT, epochs_as_given, p2p_fl, small_shards

from p2p_fl.launch import free_ports, node_env
from p2p_fl.net import generate_keypair, load_public_key

SITES = ["a", "b", "c", "d"]
ROUND_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Keys, ports and tiny shards for four sites (each 256 training images)."""
    tmp = tmp_path_factory.mktemp("gossip")
    shards = small_shards(tmp, SITES, train=1024, val=256, test=256)
    for n in SITES:
        generate_keypair(tmp / "keys", n)
    return tmp, shards


def run_gossip(setup, out: Path, *, secure: bool, kill_after_round0: str | None = None,
               chunked: bool = False) -> dict:
    """Runs 4 node processes for 2 rounds; optionally kill -9 one once it trained round 0.

    Returns name -> exit code.
    """
    tmp, shards = setup
    ports = dict(zip(SITES, free_ports(len(SITES))))
    peers = "".join(f'[[peers]]\nname = "{n}"\naddress = "tcp://127.0.0.1:{ports[n]}"\n'
                    f'public_key = "{load_public_key(tmp / "keys" / f"{n}.key")}"\n' for n in SITES)
    config = out / "topology.toml"
    out.mkdir(parents=True)
    config.write_text(epochs_as_given(
        'federation = "gossip-e2e"\nprotocol = "gossip"\n[training]\nrounds = 2\nlocal_epochs = 1\nbatch_size = 32\n'
        # SGD: a smooth step, so the sums' rounding is not blown up to Adam's step size.
        'optimizer = "sgd"\nlearning_rate = 0.05\n'
        f'[gossip]\nsecure = {str(secure).lower()}\nchunked = {str(chunked).lower()}\n'
        f'round_timeout_s = {ROUND_TIMEOUT_S}\n'
        '[data]\ntest = ""\n' + peers))
    env = node_env(len(SITES))
    procs = {
        n: subprocess.Popen([sys.executable, "-m", "p2p_fl", "node", "--config", str(config), "--name", n,
                             "--data", str(shards[n]), "--key", str(tmp / "keys" / f"{n}.key_secret"),
                             "--out", str(out / n)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(out / f"{n}.log", "wb"))
        for n in SITES
    }
    try:
        if kill_after_round0:
            metrics = out / kill_after_round0 / "metrics.jsonl"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
                time.sleep(0.05)
            os.kill(procs[kill_after_round0].pid, signal.SIGKILL)  # mid-round: its sums are under way
        return {n: p.wait(timeout=300) for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def final_models(out: Path, names) -> dict:
    return {n: dict(np.load(out / n / "final_model.npz")) for n in names}


def max_difference(models_a: dict, models_b: dict) -> float:
    return max(float(np.max(np.abs(models_a[n][k] - models_b[n][k]))) for n in models_a for k in models_a[n])


def metrics(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_runs(setup, tmp_path_factory):
    outs = [tmp_path_factory.mktemp("plain") / "run" for _ in range(2)]
    for out in outs:
        assert run_gossip(setup, out, secure=False) == dict.fromkeys(SITES, 0)
    return outs


def test_training_is_deterministic_two_plain_runs_give_identical_models(plain_runs):
    first, second = (final_models(out, SITES) for out in plain_runs)
    assert max_difference(first, second) == 0.0


def test_plain_gossip_on_the_complete_graph_is_fedavg_every_site_ends_with_the_same_model(plain_runs):
    models = final_models(plain_runs[0], SITES)
    # Each site sums the same four models in its own order (in float64): equal to float32 rounding.
    assert max_difference({n: models["a"] for n in SITES}, models) < 1e-6
    for n in SITES:
        rounds = metrics(plain_runs[0], n)
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert rounds[1]["survivors"] == 3 and rounds[2]["dropped"] == ""
        result = json.loads((plain_runs[0] / n / "result.json").read_text())
        assert result["dropped"] == {} and result["test_auc"] > 0.7


def test_secure_gossip_gives_the_plain_models_within_the_fixed_point_error(setup, plain_runs, tmp_path):
    from p2p_fl.federate import complete, error_bound
    from p2p_fl.protocols.gossip import secure_fixed_point

    out = tmp_path / "secure"
    assert run_gossip(setup, out, secure=True) == dict.fromkeys(SITES, 0)
    secure, plain = final_models(out, SITES), final_models(plain_runs[0], SITES)
    for n in SITES:
        for record in metrics(out, n)[1:]:
            assert record["kept_own"] is False and record["survivors"] == 3 and record["clipped"] == 0
        assert json.loads((out / n / "result.json").read_text())["dropped"] == {}
    bound = error_bound(secure_fixed_point(complete(SITES), 16.0), num_contributions=3)
    difference = max_difference(secure, plain)
    print(f"secure vs plain after 2 rounds: max |difference| {difference:.3g}, one sum's bound {bound:.3g}")
    # Round 0's sums differ from plain averaging by at most `bound` (plus float32 rounding,
    # which plain averaging has too); round 1's training carries that through, round 1's sums
    # add it again. Both runs are deterministic (masks cancel exactly), so this is a fixed
    # number for a given shuffle and XLA thread count: 1.5e-5 here (2.9e-6 with the shuffle
    # before plain epochs shuffled per index), against 1e-3 when the sites train with Adam,
    # which scales tiny gradient differences up to its step size; masks that failed to
    # cancel, or a wrong encoding, are off by 1e-2 and more.
    assert difference < 1e-4


def test_chunked_secure_gossip_gives_every_site_one_model_for_about_twice_the_model_in_bytes(setup, plain_runs,
                                                                                             tmp_path):
    out = tmp_path / "chunked"
    assert run_gossip(setup, out, secure=True, chunked=True) == dict.fromkeys(SITES, 0)
    chunked, plain = final_models(out, SITES), final_models(plain_runs[0], SITES)
    assert max_difference({n: chunked["a"] for n in SITES}, chunked) == 0.0  # one model, to the last bit
    assert max_difference(chunked, plain) < 1e-4  # as full sums (the test above): the same integers
    model_bytes = sum(a.nbytes for a in chunked["a"].values())
    for n in SITES:
        for record in metrics(out, n)[1:]:
            assert record["kept_own"] is False and record["chunks_heard"] == 3 and record["chunks_missing"] == ""
        result = json.loads((out / n / "result.json").read_text())
        # Per round: 3/4 of the model out as masked slices, 3/4 as the mix of its slice (full
        # sums: 3 whole masked models), plus shares, headers, run keys and heartbeats.
        assert result["bytes_sent"] / 2 < 2.0 * model_bytes, result["bytes_sent"]


def test_secure_gossip_with_a_node_killed_mid_round_finishes_with_correct_sums_of_the_survivors(setup, tmp_path):
    out = tmp_path / "killed"
    codes = run_gossip(setup, out, secure=True, kill_after_round0="d")
    assert codes["d"] == -signal.SIGKILL and all(codes[n] == 0 for n in "abc"), codes
    models = final_models(out, "abc")
    # The invariants, whatever the moment d died and however loaded the machine: a sum that
    # went through is over the live sites only, once d is known dead; one that lost a member
    # (d after it died, or a live site that missed the deadline on a busy machine) failed as
    # a group of 3 must (no dropout allowed), keeping the site's own model.
    mixed = {}
    for n in "abc":
        last = metrics(out, n)[-1]
        if last["kept_own"]:
            assert last["dropped"] and "can drop safely" in last["failure"], last
        else:
            assert last["survivors"] == 2 and "d" not in last["dropped"], last
            mixed[n] = models[n]
    # Sites whose last sums went through mixed the same three round-1 models, equally weighted.
    if len(mixed) > 1:
        first = next(iter(mixed))
        assert max_difference({n: mixed[first] for n in mixed}, mixed) < 1e-5


def test_plain_gossip_through_launch_reports_the_mean_over_sites(tmp_path):
    config = tmp_path / "gossip.toml"
    config.write_text((ROOT / "topologies" / "gossip-3.toml").read_text().replace("secure = true", "secure = false"))
    proc = p2p_fl("launch", str(config), "--rounds", "1", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["protocol"] == "gossip" and "final (mean of sites)" in proc.stdout
    aucs = [n["test_auc"] for n in summary["nodes"]]
    assert summary["final"]["test_auc"] == pytest.approx(sum(aucs) / len(aucs)) and min(aucs) > 0.85
