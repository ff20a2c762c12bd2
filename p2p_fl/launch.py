"""`p2p-fl launch`: a whole federation on one machine, one OS process per site.

It partitions the data into one shard file per site (each node reads only its own), makes a
CURVE key pair per site under OUT/keys/, picks free loopback ports, writes the topology it actually runs to OUT/topology.toml, starts the
nodes, shows their progress live, and collects their results into OUT/summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from p2p_fl.config import PeerConfig, Topology, dump_topology, parse_topology
from p2p_fl.data import load_dataset, partition_dataset, save_npz
from p2p_fl.net import generate_keypair, load_public_key

# Protocols after which every site holds its own final model.
SITE_MODEL_PROTOCOLS = ("local", "gossip", "ensemble")
XLA_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "p2p_fl" / "xla"


def with_overrides(topology: Topology, *, peers: int | None = None, rounds: int | None = None,
                   local_epochs: int | None = None, partition: str | None = None,
                   seed: int | None = None, dataset: str | None = None) -> Topology:
    """The topology with the command line's overrides applied (a new object)."""
    t = topology
    if peers is not None:
        if peers < 1:
            raise ValueError(f"--peers must be >= 1, got {peers}")
        names = [p.name for p in t.peers]
        if peers != len(names):
            width = len(str(peers))
            names = names[:peers] if peers < len(names) else [f"site-{i + 1:0{width}d}" for i in range(peers)]
        t = dataclasses.replace(t, peers=tuple(PeerConfig(n) for n in names))
    training = {k: v for k, v in (("rounds", rounds), ("local_epochs", local_epochs)) if v is not None}
    if training:
        t = dataclasses.replace(t, training=dataclasses.replace(t.training, **training))
    data = {k: v for k, v in (("partition", partition), ("dataset", dataset)) if v is not None}
    if data:
        t = dataclasses.replace(t, data=dataclasses.replace(t.data, **data))
    if seed is not None:
        t = dataclasses.replace(t, seed=seed)
    return t


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def prepare(topology: Topology, out: Path, console: Console) -> tuple[Topology, dict[str, Path]]:
    """Writes one data shard per site and the loopback topology; returns both."""
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(topology.data.dataset)
    shards = partition_dataset(dataset, len(topology.peers), topology.data.partition, topology.seed)
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    paths = {}
    for peer, shard in zip(topology.peers, shards):
        paths[peer.name] = shard_dir / f"{peer.name}.npz"
        save_npz(shard, paths[peer.name])
    ports = free_ports(len(topology.peers))
    public_keys = {p.name: "" for p in topology.peers}
    if not topology.network.insecure:  # fresh identities for a local simulation
        for p in topology.peers:
            public_path = out / "keys" / f"{p.name}.key"
            if not public_path.exists():  # a rerun into the same OUT keeps its keys
                public_path, _ = generate_keypair(out / "keys", p.name)
            public_keys[p.name] = load_public_key(public_path)
    peers = tuple(PeerConfig(p.name, f"tcp://127.0.0.1:{port}", public_keys[p.name])
                  for p, port in zip(topology.peers, ports))
    topology = dataclasses.replace(topology, peers=peers)
    if topology.protocol == "gossip":  # FedAvg weights: the shards' sizes, fixed in the file
        samples = {p.name: len(shard.train) for p, shard in zip(topology.peers, shards)}
        topology = dataclasses.replace(topology, gossip=dataclasses.replace(topology.gossip, samples=samples))
    text = dump_topology(topology)
    parse_topology(tomllib.loads(text), source=str(out / "topology.toml"))  # same rules as any file
    (out / "topology.toml").write_text(text)
    sizes = ", ".join(f"{p.name}:{len(s.train)}" for p, s in zip(topology.peers, shards))
    console.print(f"[bold]{topology.federation}[/]: {topology.protocol}, {len(peers)} sites, "
                  f"partition {topology.data.partition}, seed {topology.seed}; train samples {sizes}")
    return topology, paths


def node_env(num_nodes: int) -> dict[str, str]:
    """Environment for local node processes: share the cores and one compilation cache."""
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    env["P2P_FL_THREADS"] = str(max(1, cores // num_nodes))
    env.setdefault("P2P_FL_XLA_CACHE", str(XLA_CACHE_DIR))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_launch(topology: Topology, out: Path, *, console: Console | None = None) -> dict:
    """Runs the federation; returns the summary (also written to OUT/summary.json)."""
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)  # a log file has no width; keep tables readable
    topology, shard_paths = prepare(topology, out, console)
    started = time.monotonic()
    events: queue.Queue = queue.Queue()
    procs: dict[str, subprocess.Popen] = {}
    env = node_env(len(topology.peers))
    for peer in topology.peers:
        node_out = out / peer.name
        node_out.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "p2p_fl", "node", "--config", str(out / "topology.toml"),
               "--name", peer.name, "--data", str(shard_paths[peer.name]), "--out", str(node_out),
               "--key", str(out / "keys" / f"{peer.name}.key_secret"), "--events"]
        with (node_out / "node.log").open("wb") as log_file:
            procs[peer.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, env=env)
        threading.Thread(target=_pump_events, args=(peer.name, procs[peer.name], events), daemon=True).start()

    status = {p.name: {"state": "starting"} for p in topology.peers}
    failed: list[str] = []
    # A terminal gets a live table; a log (CI, a pipe) gets one line per finished round.
    live = Live(_status_table(topology, status, started), console=console, refresh_per_second=4) \
        if console.is_terminal else None
    try:
        if live:
            live.start()
        while any(p.poll() is None for p in procs.values()) or not events.empty():
            try:
                name, event = events.get(timeout=0.25)
            except queue.Empty:
                pass
            else:
                _apply_event(status[name], event)
                if live is None and event.get("event") in ("trained", "done"):
                    console.print(_event_line(name, event))
            for name, proc in procs.items():
                if proc.poll() not in (None, 0) and name not in failed:
                    failed.append(name)
                    status[name]["state"] = f"failed ({proc.returncode})"
                    console.print(f"[red]{name} exited with {proc.returncode}; see {out / name / 'node.log'}[/]")
            if live:
                live.update(_status_table(topology, status, started))
    except KeyboardInterrupt:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        raise
    finally:
        if live:
            live.stop()
    summary = collect_summary(topology, out, time.monotonic() - started)
    console.print(results_table(summary))
    if failed:
        raise RuntimeError(f"nodes {', '.join(failed)} failed; their logs are in {out}/<name>/node.log")
    return summary


def collect_summary(topology: Topology, out: Path, wall_s: float) -> dict:
    """Merges every node's result.json into OUT/summary.json."""
    nodes = []
    for peer in topology.peers:
        path = out / peer.name / "result.json"
        if path.exists():
            nodes.append(json.loads(path.read_text()))
    summary = {
        "protocol": topology.protocol,
        "federation": topology.federation,
        "peers": len(topology.peers),
        "partition": topology.data.partition,
        "seed": topology.seed,
        "model": topology.training.model,
        "rounds": topology.training.rounds,
        "local_epochs": topology.training.local_epochs,
        "wall_s": wall_s,
        "final": _final_metrics(topology, nodes),
        "nodes": nodes,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _final_metrics(topology: Topology, nodes: list[dict]) -> dict:
    """The federation's model on the common test set.

    A ring ends with one model every site holds (any node's figures serve); after local
    training or gossip every site ends with its own model, so the figures are the mean over
    sites (on a complete graph without dropouts the gossip models are equal anyway).
    """
    keys = ("test_loss", "test_acc", "test_auc", "test_sens", "test_spec", "test_threshold",
            "test_acc_at_val_threshold")
    if not nodes:
        return {}
    if topology.protocol in SITE_MODEL_PROTOCOLS:
        return {k: _mean([n.get(k) for n in nodes]) for k in keys}
    return {k: nodes[0].get(k) for k in keys}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def results_table(summary: dict) -> Table:
    table = Table(title=f"{summary['protocol']} · {summary['peers']} sites · {summary['wall_s']:.1f} s")
    for col in ("node", "samples", "test loss", "acc@0.5", "AUC", "sens", "spec", "local AUC", "wall s", "MB sent"):
        table.add_column(col, justify="right" if col != "node" else "left")
    for n in summary["nodes"]:
        table.add_row(n["name"], str(n["samples"]), _f(n.get("test_loss")), _f(n.get("test_acc")),
                      _f(n.get("test_auc")), _f(n.get("test_sens")), _f(n.get("test_spec")),
                      _f(n.get("local_test_auc")), f"{n['wall_s']:.1f}", f"{n['bytes_sent'] / 1e6:.2f}")
    f = summary["final"]
    label = "final (mean of sites)" if summary["protocol"] in SITE_MODEL_PROTOCOLS else "final model"
    table.add_row(f"[bold]{label}[/]", "", _f(f.get("test_loss")), _f(f.get("test_acc")),
                  f"[bold]{_f(f.get('test_auc'))}[/]", _f(f.get("test_sens")), _f(f.get("test_spec")), "",
                  f"{summary['wall_s']:.1f}", f"{sum(n['bytes_sent'] for n in summary['nodes']) / 1e6:.2f}")
    return table


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pump_events(name: str, proc: subprocess.Popen, events: queue.Queue) -> None:
    for line in proc.stdout:
        try:
            events.put((name, json.loads(line)))
        except json.JSONDecodeError:
            continue  # a stray print; the node's log has the details


def _apply_event(state: dict, event: dict) -> None:
    kind = event.get("event")
    if kind == "state":
        state.update({k: v for k, v in event.items() if k != "event"})
    elif kind == "epoch":
        state.update(state="training", round=event["round"], epoch=f"{event['epoch']}/{event['epochs']}",
                     loss=event["loss"], cycle=event.get("cycle"))
        if "members" in event:  # gossip: who made it into the last neighbourhood sum
            state.update(group=f"{event['survivors']}/{event['members']}" + (" kept own" if event.get("kept_own") else ""),
                         dropped=event.get("dropped") or "")
    elif kind == "trained":
        state.update(val_auc=event["val_auc"], bytes_sent=event["bytes_sent"], loss=event["train_loss"])
    elif kind == "done":
        state.update(state="done", test_auc=event["test_auc"], bytes_sent=event["bytes_sent"])


def _status_table(topology: Topology, status: dict, started: float) -> Table:
    table = Table(title=f"{topology.federation} · {topology.protocol} · {time.monotonic() - started:.0f} s")
    gossip = topology.protocol == "gossip"
    columns = ["node", "state", "round", "epoch", "loss", "val AUC", "test AUC", "MB sent"]
    columns[2:2] = ["sum (heard/members)", "dropped"] if gossip else ["cycle"]
    for col in columns:
        table.add_column(col)
    for name, s in status.items():
        mb = s.get("bytes_sent")
        where = [s.get("group", ""), s.get("dropped", "")] if gossip else [_opt(s.get("cycle"))]
        table.add_row(name, s.get("state", ""), *where, _opt(s.get("round")), s.get("epoch", ""),
                      _f(s.get("loss")), _f(s.get("val_auc")), _f(s.get("test_auc")),
                      "-" if mb is None else f"{mb / 1e6:.2f}")
    return table


def _opt(value) -> str:
    return "" if value is None else str(value)


def _event_line(name: str, event: dict) -> str:
    if event["event"] == "trained":
        return (f"{name}: round {event['round']} trained, loss {event['train_loss']:.3f}, "
                f"val AUC {_f(event['val_auc'])}, {event['train_s']:.1f} s")
    return f"{name}: done, test AUC {_f(event['test_auc'])}"
