"""FedBN, FedProx and DP-SGD end to end: real node processes, real sockets, real training.

FedBN is checked on the wire: every byte the nodes send each other passes through a TCP
relay in this test (plaintext ZeroMQ, so the message headers can be read), and no header
names a BatchNorm tensor. DP runs a 2-site ring through `launch` with a budget that covers
two of its three hops. Bounded for CI: tiny shards, one or three short rounds.
"""

import json
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from processes import ROOT, epochs_as_given, p2p_fl, shipped_topology, small_dataset, small_shards

from p2p_fl.config import parse_topology
from p2p_fl.data.sources import load_dataset
from p2p_fl.launch import free_ports, node_env
from p2p_fl.learn import Learner
from p2p_fl.learn.privacy import LABEL_PRIOR_SHARE, batch_sampling, default_delta, privacy_spent
from p2p_fl.site import adopt_model, dp_config

SITES = ["a", "b", "c"]


class Relay:
    """Accepts TCP connections on a free loopback port, forwards each to `target_port`, and
    keeps a copy of every byte it forwards (both directions)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()  # the node is not listening yet; ZeroMQ reconnects
                continue
            upstream.settimeout(None)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()


def header_entry(name: str) -> bytes:
    """How a tensor's name starts its [name, dtype, shape] entry in a msgpack header."""
    assert len(name) < 32
    return bytes([0xA0 | len(name)]) + name.encode()


def test_fedbn_never_puts_batchnorm_tensors_on_the_wire(tmp_path):
    shards = small_shards(tmp_path, SITES, train=3 * 256, val=3 * 64, test=3 * 64)
    ports = dict(zip(SITES, free_ports(len(SITES))))
    relays = {n: Relay(ports[n]) for n in SITES}
    settings = ('federation = "fedbn-wire"\nprotocol = "gossip"\n'
                '[training]\nrounds = 1\nlocal_epochs = 1\nbatch_size = 32\nfedbn = true\n'
                '[gossip]\nsecure = false\nround_timeout_s = 60.0\n[network]\ninsecure = true\n[data]\ntest = ""\n')
    procs = {}
    try:
        for n in SITES:
            # Each node binds its own port; it reaches the others only through their relays.
            peers = "".join(f'[[peers]]\nname = "{m}"\naddress = "tcp://127.0.0.1:'
                            f'{ports[m] if m == n else relays[m].port}"\n' for m in SITES)
            config = tmp_path / f"{n}.toml"
            config.write_text(epochs_as_given(settings + peers))
            (tmp_path / n).mkdir()
            procs[n] = subprocess.Popen(
                [sys.executable, "-m", "p2p_fl", "node", "--config", str(config), "--name", n,
                 "--data", str(shards[n]), "--out", str(tmp_path / n)],
                cwd=ROOT, env=node_env(len(SITES)), stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / n / "node.log", "wb"))
        codes = {n: p.wait(timeout=300) for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for relay in relays.values():
            relay.close()
    assert codes == dict.fromkeys(SITES, 0), {n: (tmp_path / n / "node.log").read_text()[-2000:] for n in SITES}

    learner = Learner("small-cnn")
    local = learner.batchnorm_names()
    shared = [name for name, _, _ in learner.weight_spec() if name not in local]
    wire = b"".join(bytes(relay.captured) for relay in relays.values())
    # The relays saw the models: every shared tensor is named in some header...
    assert all(header_entry(name) in wire for name in shared)
    # ...and no BatchNorm tensor ever is (nor its name anywhere in the stream).
    assert not [name for name in local if name.encode() in wire]

    models = {n: dict(np.load(tmp_path / n / "final_model.npz")) for n in SITES}
    for n in SITES:
        assert set(models[n]) == set(shared) | set(local)  # each site keeps its own BatchNorm
        result = json.loads((tmp_path / n / "result.json").read_text())
        assert result["fedbn"] is True and result["dropped"] == {}
    # Complete-graph plain gossip is FedAvg of the shared tensors: equal to float rounding...
    for name in shared:
        for n in SITES[1:]:
            np.testing.assert_allclose(models[n][name], models["a"][name], atol=1e-6, err_msg=name)
    # ...while each site's BatchNorm statistics stay fitted to its own shard.
    for name in ("bn1/mean", "bn2/var"):
        for i, n in enumerate(SITES):
            for m in SITES[i + 1:]:
                assert np.max(np.abs(models[n][name] - models[m][name])) > 1e-4, (name, n, m)


def test_dp_ring_reports_epsilon_and_stops_training_at_its_budget(tmp_path):
    """Noise multiplier 1 and a budget covering two of three hops: each site trains twice,
    then only hands the model on; epsilon is in every metrics line, result and the summary."""
    data = small_dataset(tmp_path / "small.npz", train=2 * 128, val=2 * 64, test=128)
    train_per_site, batch, epochs = 128, 32, 1
    rate, steps = batch_sampling(train_per_site, batch)
    delta = default_delta(train_per_site)
    two_hops = privacy_spent(1.0, rate, 2 * epochs * steps, delta)
    budget = (two_hops + privacy_spent(1.0, rate, 3 * epochs * steps, delta)) / 2
    config = tmp_path / "ring.toml"
    config.write_text(
        'federation = "dp-ring"\nprotocol = "cwt"\n'
        f'[training]\nrounds = 3\nlocal_epochs = {epochs}\nmin_local_steps = 0\nbatch_size = {batch}\nprox_mu = 0.01\n'
        'fedbn = true\n'
        '[ring]\norder = "listed"\nfinal = "last"\n'
        f'[privacy]\nenabled = true\nnoise_multiplier = 1.0\ntarget_epsilon = {budget!r}\n'
        '[data]\npartition = "iid"\n[[peers]]\nname = "a"\n[[peers]]\nname = "b"\n')
    out = tmp_path / "out"
    proc = p2p_fl("launch", str(config), "--data", str(data), "--out", str(out), "--no-restart")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fedbn"] is True and summary["prox_mu"] == 0.01 and summary["privacy"]["enabled"]
    assert "FedProx mu=0.01 · FedBN · logit adjustment · DP" in proc.stdout and "epsilon" in proc.stdout
    for node in summary["nodes"]:
        name = node["name"]
        assert node["samples"] == train_per_site
        lines = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [line["round"] for line in lines] == ([0, 2, 4] if name == "a" else [1, 3, 5])
        assert [line.get("budget_reached", False) for line in lines] == [False, False, True]
        assert lines[2]["train_loss"] is None  # the third hop was handed on untrained
        # Logit adjustment (the default) released the class counts at a share of the budget.
        released = LABEL_PRIOR_SHARE * budget
        spent = privacy_spent(1.0, rate, 2 * epochs * steps, delta, released)
        assert [line["epsilon"] for line in lines] == pytest.approx([
            privacy_spent(1.0, rate, steps, delta, released), spent, spent])
        assert all(line["delta"] == delta for line in lines)
        assert node["epsilon"] == pytest.approx(spent) and node["epsilon"] <= budget
        assert node["label_prior_epsilon"] == released
        assert node["budget_reached_round"] == lines[2]["round"]
        assert summary["epsilon"][name] == node["epsilon"]
        assert "privacy budget exceeded" in (out / name / "node.log").read_text()


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_a_target_epsilon_alone_plans_noise_spending_it_exactly(target):
    topology = parse_topology({
        "federation": "f", "protocol": "gossip", "peers": [{"name": "a"}, {"name": "b"}],
        "training": {"rounds": 5, "local_epochs": 2, "min_local_steps": 0, "batch_size": 64},
        "gossip": {"secure": False}, "network": {"insecure": True},
        "privacy": {"enabled": True, "target_epsilon": target}})
    dp = dp_config(topology, 470)
    rate, steps = batch_sampling(470, 64)
    assert dp.delta == 1e-5 and dp.target_epsilon == target
    assert dp.label_prior_epsilon == 0.05 * target  # logit adjustment's noisy counts (the default)
    spent = privacy_spent(dp.noise_multiplier, rate, 5 * 2 * steps, dp.delta, dp.label_prior_epsilon)
    assert spent <= target and spent == pytest.approx(target, rel=1e-3)


def test_an_arriving_model_restarts_the_optimizer_unless_its_state_is_kept():
    data = load_dataset("builtin:pneumoniamnist")
    site = Learner("small-cnn", optimizer="sgd", learning_rate=0.01, seed=1)
    site.fit(data.train.images[:128], data.train.labels[:128])
    momentum = {k: v for k, v in site.get_state().items() if k.startswith("optimizer/")}
    assert any(np.abs(v).max() > 0 for v in momentum.values())
    fresh = Learner("small-cnn", optimizer="sgd", learning_rate=0.01).get_state()
    for keep_optimizer_state, expected in ((True, momentum), (False, fresh)):
        arriving = Learner("small-cnn", seed=2 + keep_optimizer_state).get_weights()
        adopt_model(site, arriving, keep=frozenset(), keep_optimizer_state=keep_optimizer_state)
        for name, value in site.get_weights().items():
            np.testing.assert_array_equal(value, arriving[name], err_msg=name)
        for name in momentum:
            np.testing.assert_array_equal(site.get_state()[name], expected[name], err_msg=name)


def test_the_shipped_gossip_10_dp_trains_scattering_features_within_each_site_s_budget(tmp_path):
    """The shipped DP federation (scatter-linear, secure sums, FedAvgM, noisy-count logit
    adjustment) on 4 real sites of the embedded data for 2 rounds (in-process engine): each
    site spends its epsilon 3 and no more, all end with the same head and nothing else (the
    scattering is fixed: no weight of it is trained, sent or saved), and the shared model
    ranks the common test set far above chance."""
    topology = shipped_topology(tmp_path, "gossip-10-dp.toml")
    out = tmp_path / "out"
    proc = p2p_fl("launch", str(topology), "--out", str(out), "--peers", "4", "--rounds", "2",
                  "--engine", "inproc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {n["model"] for n in summary["nodes"]} == {"scatter-linear"}
    for spent in summary["epsilon"].values():
        assert 2.9 < spent <= 3.0
    finals = [dict(np.load(out / n["name"] / "final_model.npz")) for n in summary["nodes"]]
    assert sorted(finals[0]) == ["head/bias", "head/kernel"]
    for final in finals[1:]:
        for name in final:
            np.testing.assert_allclose(final[name], finals[0][name], atol=1e-5)
    assert summary["final"]["test_auc"] > 0.85
