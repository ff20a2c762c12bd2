"""The in-process engine (`launch --engine inproc`) against the process engine, its fault
schedule, and the in-memory transport it runs on."""

import json

import numpy as np
import pytest
from processes import p2p_fl, shipped_topology, small_dataset

from p2p_fl.config import ConfigError
from p2p_fl.net import wire
from p2p_fl.net.memory import MemoryHub
from p2p_fl.simulate import Fault, VirtualClock

SPEC = [("w", "float32", (2,))]


def final_models(out, sites):
    return {s: dict(np.load(out / s / "final_model.npz")) for s in sites}


def launch(topology, out, *args, threads=1):
    """`p2p-fl launch` with a fixed XLA thread count (it changes float summation order)."""
    return p2p_fl("launch", str(topology), "--out", str(out), *args, env={"P2P_FL_THREADS": str(threads)})


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data") / "small.npz", train=450, val=90, test=150)


# The engines are compared on FedAvg's plain average: gossip-3's outer momentum step
# multiplies the float rounding by which vmapped training differs from a node's (up to
# 1 / (1 - momentum)); the step itself is the same pure function in both engines, and
# test_outer_optimizer.py checks that sites taking it stay identical.
AVERAGE = {'outer_optimizer = "momentum"': 'outer_optimizer = "avg"'}


@pytest.mark.parametrize("name, replace, identical, runs", [
    ("ring-3.toml", {}, True, ("process", "inproc", "grouped")),
    ("gossip-3.toml", AVERAGE, False, ("process", "inproc", "grouped")),
    ("gossip-3.toml", {"secure = true": "secure = false", **AVERAGE}, False, ("process", "inproc")),
], ids=["cwt", "secure-gossip", "plain-gossip"])
def test_every_engine_ends_with_the_models_of_one_process_per_site(tmp_path, small, name, replace, identical, runs):
    """Same topology, seed and data: the same final models from every engine: one process per
    site, every site in one process (inproc), and the sites in two processes over ZeroMQ
    (grouped: `--processes 2`). A ring trains one site at a time, the same program as a
    node's: bit-identical (at equal XLA thread counts). Gossip sites of one round train
    together (vmap), which rounds differently from one site's program: equal up to float
    rounding, the AUC to 3 decimals."""
    topology = shipped_topology(tmp_path, name, **replace)
    args = ("--data", str(small), "--rounds", "2")
    engine_args = {"process": ("--engine", "process"), "inproc": ("--engine", "inproc"),
                   "grouped": ("--engine", "process", "--processes", "2")}
    summaries = {}
    for run in runs:
        proc = launch(topology, tmp_path / run, *args, *engine_args[run])
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[run] = json.loads((tmp_path / run / "summary.json").read_text())
    assert summaries["inproc"]["engine"] == "inproc" and summaries["process"]["engine"] == "process"
    assert summaries["process"]["processes"] == 3
    sites = [n["name"] for n in summaries["process"]["nodes"]]
    process = final_models(tmp_path / "process", sites)
    for run in runs[1:]:
        assert sorted(n["name"] for n in summaries[run]["nodes"]) == sorted(sites)
        other = final_models(tmp_path / run, sites)
        largest = max(float(np.abs(process[s][k] - other[s][k]).max()) for s in sites for k in process[s])
        if identical:
            assert largest == 0.0, run
        else:
            assert largest < 0.05, (run, largest)
        assert abs(summaries["process"]["final"]["test_auc"] - summaries[run]["final"]["test_auc"]) < 1e-3
        for node in summaries[run]["nodes"]:  # every message went through the wire checks
            assert node["dropped"] == {} and node["messages_sent"] > 0
    if "grouped" in runs:  # two sites in one process, each with its own peer, files and log lines
        assert summaries["grouped"]["engine"] == "process" and summaries["grouped"]["processes"] == 2
        group_log = (tmp_path / "grouped" / "group-1" / "node.log").read_text()
        assert all(f"{s}: every peer heard" in group_log for s in sites[:2]), group_log[-2000:]
        assert not (tmp_path / "grouped" / "group-1" / "node.pid").exists()
        process = {n["name"]: n["process"] for n in summaries["grouped"]["nodes"]}  # result.json's
        assert process[sites[0]]["pid"] == process[sites[1]]["pid"] != process[sites[2]]["pid"]
        assert [process[s]["sites"] for s in sites] == [2, 2, 1]
        assert all(p["peak_rss_mb"] > 0 and p["startup_s"] > 0 for p in process.values()), process


def test_a_member_killed_inside_a_sum_is_recovered_and_comes_back(tmp_path, small):
    """The fault schedule: hospital-03 dies right after its masked replies to round 1's sums
    (before it could release its shares) and restarts from its checkpoint when the others
    reach round 3. Every other site's round-1 sum still opens with it as a survivor (its
    self-mask recovered from the others' shares), it rejoins and finishes with the others.
    Run twice, the run unfolds the same way to the last bit. Full sums (each over the whole
    model); the next test runs the same fault with chunked sums, the default."""
    # Complete graph: groups of 4 at 5 sites.
    topology = shipped_topology(tmp_path, "gossip-10.toml", **{"chunked = true": "chunked = false"})
    outs = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        proc = launch(topology, out, "--data", str(small), "--peers", "5", "--rounds", "4", "--local-epochs", "1",
                      "--engine", "inproc", "--kill", "hospital-03:1:sum:2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(out)
    summary = json.loads((outs[0] / "summary.json").read_text())
    nodes = {n["name"]: n for n in summary["nodes"]}
    assert sorted(nodes) == [f"hospital-0{i}" for i in range(1, 6)]
    assert nodes["hospital-03"]["resumes"] == 1 and nodes["hospital-03"]["rejoined"] >= 1
    for name in set(nodes) - {"hospital-03"}:
        rounds = [json.loads(line) for line in (outs[0] / name / "metrics.jsonl").read_text().splitlines()]
        mixed = next(r for r in rounds if r.get("mixed_round") == 1)
        assert (mixed["members"], mixed["survivors"], mixed["kept_own"]) == (4, 4, False), mixed
        assert "failure" not in mixed
    first, second = (final_models(out, list(nodes)) for out in outs)
    for site in nodes:
        for k in first[site]:
            np.testing.assert_array_equal(first[site][k], second[site][k])


def test_with_chunked_sums_a_site_killed_inside_a_sum_rejoins_from_the_others_published_mixes(tmp_path, small):
    """The same fault with chunked sums: while hospital-03 is down its backup sums its slice;
    back, it asks to join the round it rejoins, its members (who gave its slice to the
    backup) refuse and send it their mixes of that round instead, and it finishes with the
    others from the federation's model, not alone (exit 0)."""
    topology = shipped_topology(tmp_path, "gossip-10.toml")
    out = tmp_path / "run"
    proc = launch(topology, out, "--data", str(small), "--peers", "5", "--rounds", "4", "--local-epochs", "1",
                  "--engine", "inproc", "--kill", "hospital-03:1:sum:2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = {n["name"]: n for n in json.loads((out / "summary.json").read_text())["nodes"]}
    assert nodes["hospital-03"]["resumes"] == 1 and nodes["hospital-03"]["rejoined"] >= 1
    rounds = [json.loads(line) for line in (out / "hospital-03" / "metrics.jsonl").read_text().splitlines()]
    rejoined = next(r for r in rounds if "rejoined_from" in r)
    assert rejoined["chunks_heard"] == 4 and rejoined["chunks_missing"] == "", rejoined
    for name in set(nodes) - {"hospital-03"}:  # while it was down, its backup summed its slice
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("members") == 3 and r.get("chunks_missing") == "" for r in records), records


def test_a_kill_option_names_a_site_and_a_round():
    assert Fault.parse("hospital-b:3") == Fault("hospital-b", 3, "train", None)
    assert Fault.parse("hospital-b:3:sum:2") == Fault("hospital-b", 3, "sum", 2)
    assert Fault.parse("hospital-b:0:4") == Fault("hospital-b", 0, "train", 4)
    for bad in ("hospital-b", "b:x", "b:1:later", "b:1:sum:0", "b:-1", ":1"):
        with pytest.raises(ConfigError, match="--kill"):
            Fault.parse(bad)
    proc = p2p_fl("launch", "topologies/gossip-3.toml", "--engine", "inproc", "--kill", "b:1:later")
    assert proc.returncode == 2 and "--kill" in proc.stderr and "Traceback" not in proc.stderr
    proc = p2p_fl("launch", "topologies/gossip-3.toml", "--kill", "hospital-b:1")
    assert proc.returncode == 2 and "--engine inproc" in proc.stderr


def test_the_memory_transport_checks_what_it_carries_and_reports_deaths_in_virtual_time():
    clock = VirtualClock()
    hub = MemoryHub("fed", SPEC, peer_timeout_s=10.0, clock=clock)
    a, b = hub.transport("a", ["b"]), hub.transport("b", ["a"])
    a.send("b", wire.GOSSIP_MODEL, 0, {"w": np.ones(2, np.float32)})
    a.send("b", wire.GOSSIP_MODEL, 0, {"w": np.ones(3, np.float32)})  # not the model's shape
    (msg,) = b.receive()
    assert msg.sender == "a" and msg.tensors["w"].tolist() == [1.0, 1.0]
    assert b.dropped["malformed"] == 1 and hub.in_flight == 0
    a.pulse(4)
    assert b.peer_progress == {"a": 4}
    hub.down("a")
    b.send("a", wire.ACK, 0, meta={"of": wire.GOSSIP_MODEL})  # lost: a is down
    assert b.liveness_changes() == (set(), set())
    clock.now = 10.0
    assert b.liveness_changes() == ({"a"}, set())
    a = hub.transport("a", ["b"])  # restarted: its sequence numbers go on increasing
    assert b.liveness_changes() == (set(), {"a"})
    a.send("b", wire.GOSSIP_MODEL, 1, {"w": np.zeros(2, np.float32)})
    (msg,) = b.receive()
    assert msg.round == 1 and b.dropped["replayed-seq"] == 0
    with pytest.raises(ValueError, match="no peer"):
        a.send("c", wire.ACK, 0)


def test_a_hundred_sites_run_secure_gossip_in_one_process(tmp_path):
    """CI-bounded form of the 100-site benchmark: 100 sites on a 4-regular graph, secure
    sums with real masks, one process; every site finishes and every sum of every round
    took in all four neighbours."""
    data = small_dataset(tmp_path / "data.npz", train=1600, val=400, test=400)
    topology = shipped_topology(tmp_path, "gossip-10-k4.toml", **{'test = "builtin:pneumoniamnist"': 'test = ""'})
    proc = launch(topology, tmp_path / "run", "--data", str(data), "--peers", "100", "--rounds", "2",
                  "--local-epochs", "1", "--engine", "inproc", threads=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["nodes"]) == 100
    for node in summary["nodes"]:
        assert node["dropped"] == {} and node["final_kept_own"] is False
        rounds = [json.loads(line) for line in (tmp_path / "run" / node["name"] / "metrics.jsonl").read_text().splitlines()]
        mixes = [r for r in rounds if "mixed_round" in r]
        assert [(r["mixed_round"], r["members"], r["survivors"], r["kept_own"]) for r in mixes] == \
            [(0, 4, 4, False), (1, 4, 4, False)]


def test_a_site_without_test_images_finishes_and_says_it_has_no_score(tmp_path):
    """No common test set and a test split too small for every site to get an image: the
    site without one finishes like the others (its result has no test figures) and the
    federation's figures are the other sites'."""
    data = small_dataset(tmp_path / "data.npz", train=150, val=30, test=2)
    topology = shipped_topology(tmp_path, "gossip-3.toml", **{'test = "builtin:pneumoniamnist"': 'test = ""'})
    proc = launch(topology, tmp_path / "run", "--data", str(data), "--rounds", "1", "--local-epochs", "1",
                  "--engine", "inproc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # Two test images over three sites: at least one site holds none.
    scored = [n for n in summary["nodes"] if n.get("test_acc") is not None]
    unscored = [n for n in summary["nodes"] if n.get("test_acc") is None]
    assert len(summary["nodes"]) == 3 and unscored and scored
    for node in unscored:
        result = json.loads((tmp_path / "run" / node["name"] / "result.json").read_text())
        assert result.get("test_acc") is None
        assert (tmp_path / "run" / node["name"] / "final_model.npz").exists()
    assert summary["final"]["test_acc"] is not None
