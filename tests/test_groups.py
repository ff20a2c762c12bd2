"""Sites grouped in processes beyond `launch --processes` (tests/test_engines.py,
test_supervision.py, test_netns.py): how sites are split and placed, and a run prepared for
other machines (`launch --hosts`) whose group processes are started by hand, as a cluster's
scheduler would start them."""

import doctest
import json
import socket
import subprocess
import sys

import numpy as np
from processes import ROOT, p2p_fl, shipped_topology, small_dataset

from p2p_fl import launch as launch_module
from p2p_fl.launch import free_ports, host_addresses, node_env, site_groups


def free_run_of_ports(count: int) -> int:
    """A first port from which `count` consecutive ports are free on 127.0.0.1 now (a host's
    sites take consecutive ports; a busy machine may hold one of them)."""
    for _ in range(50):
        base = free_ports(1)[0]
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError(f"no {count} consecutive free ports found")


def test_the_placement_examples_hold():
    assert doctest.testmod(launch_module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_sites_are_split_into_even_runs_and_a_host_never_gives_two_sites_one_port():
    names = [f"s{i}" for i in range(10)]
    for processes in (1, 3, 4, 10, 25):
        groups = site_groups(names, processes)
        assert [n for g in groups for n in g] == names  # every site once, in order
        assert len(groups) == min(processes, 10) and max(map(len, groups)) - min(map(len, groups)) <= 1
    groups = site_groups(names, 4)
    addresses = host_addresses(groups, ["n1", "n2", "n1", "n3:9000"])
    assert len(set(addresses.values())) == 10 and set(addresses) == set(names)
    assert sorted(addresses[n] for g in (groups[0], groups[2]) for n in g) == \
        [f"tcp://n1:{7700 + i}" for i in range(len(groups[0]) + len(groups[2]))]
    assert addresses[groups[3][0]] == "tcp://n3:9000"


def test_a_run_prepared_for_hosts_finishes_with_each_group_started_by_hand(tmp_path):
    """`launch --hosts` writes the folder and one command per process and starts nothing;
    the two group processes (both on this machine here, ports from a free one) run the
    secure gossip to one model, and the last to finish writes summary.json."""
    data = small_dataset(tmp_path / "small.npz", train=300, val=60, test=60)
    out = tmp_path / "out"
    base = free_run_of_ports(3)
    hosts = f"127.0.0.1:{base},127.0.0.1:{base}"
    proc = p2p_fl("launch", str(shipped_topology(tmp_path, "gossip-3.toml")), "--data", str(data), "--rounds", "2",
                  "--out", str(out), "--hosts", hosts)
    assert proc.returncode == 0, proc.stderr
    assert f"p2p-fl group {out} --group 1" in proc.stdout and not (out / "summary.json").exists()
    groups = json.loads((out / "groups.json").read_text())["groups"]
    assert [g["sites"] for g in groups] == [["hospital-a", "hospital-b"], ["hospital-c"]]
    ran = (out / "topology.toml").read_text()
    assert all(f'"tcp://127.0.0.1:{base + i}"' in ran for i in range(3)), ran
    procs = [subprocess.Popen([sys.executable, "-m", "p2p_fl", "group", str(out), "--group", str(g)], cwd=ROOT,
                              env=node_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for g in range(2)]
    try:
        ended = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [e[1][-2000:] for e in ended]
    assert sum("every site finished" in e[1] for e in ended) >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and sorted(n["name"] for n in summary["nodes"]) == [
        "hospital-a", "hospital-b", "hospital-c"]
    models = [np.load(out / n / "final_model.npz") for n in ("hospital-a", "hospital-b", "hospital-c")]
    for other in models[1:]:
        for key in models[0].files:
            np.testing.assert_allclose(other[key], models[0][key], atol=1e-6)  # the same average, mixed in float
    # Started again, a finished group runs nothing and says so.
    again = p2p_fl("group", str(out), "--group", "0")
    assert again.returncode == 0 and "not run again" in again.stderr, again.stderr


def test_bad_placements_are_one_line_errors(tmp_path):
    refused = [
        ("launch", "topologies/gossip-3.toml", "--hosts", "a,b", "--netns", "--out", str(tmp_path / "o1")),
        ("launch", "topologies/gossip-3.toml", "--hosts", "a,,b", "--out", str(tmp_path / "o2")),
        ("launch", "topologies/gossip-3.toml", "--processes", "0", "--out", str(tmp_path / "o3")),
        ("launch", "topologies/gossip-3.toml", "--processes", "2", "--engine", "inproc", "--out", str(tmp_path / "o4")),
        ("group", str(tmp_path), "--group", "0"),
    ]
    for args in refused:
        proc = p2p_fl(*args)
        assert proc.returncode == 2 and proc.stderr.startswith("p2p-fl: error:"), (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)


def test_local_nodes_sharing_a_gpu_do_not_each_preallocate_most_of_it(monkeypatch):
    """JAX takes 75% of a GPU's memory per process by default: the second of N local nodes
    on one GPU would fail to start. A user's own setting wins; one process keeps JAX's."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    assert node_env(3)["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in node_env(1)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    assert node_env(3)["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
