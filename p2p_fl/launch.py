"""`p2p-fl launch`: a whole federation on one machine, one OS process per site (or, with
`processes`, the sites spread over that many processes, `p2p-fl group`).

It partitions the data into one shard file per site (each node reads only its own), makes a
fresh CURVE key pair per site under OUT/keys/ (every run: old keys are deleted), picks free
loopback ports, writes the topology it actually runs to OUT/topology.toml, starts the
nodes, shows their progress live, and collects their results into OUT/summary.json.

With `netns`, each process runs alone in a network namespace (`p2p_fl.netns`), a host of
its own, instead of on loopback. Like a hospital's service manager, launch restarts a node
process that dies (see `Supervision`) with the same command and folder, and reports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
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

from p2p_fl.config import RING_PROTOCOLS, PeerConfig, Topology, data_options, dump_topology, logit_adjustment_applies, parse_topology
from p2p_fl.data import load_dataset, load_test_like, partition_dataset, save_npz, subsample
from p2p_fl.files import write_json
from p2p_fl.net import generate_keypair, load_public_key
from p2p_fl.netns import Hosts, network_hosts

# Protocols after which every site holds its own final model.
SITE_MODEL_PROTOCOLS = ("local", "gossip", "ensemble")
XLA_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "p2p_fl" / "xla"
HOST_PORT = 7700  # the first port on a host (a namespace or a cluster node); its next sites take the next ones
GROUPS_FILE = "groups.json"  # launch --hosts: each process's host and sites, for `p2p-fl group OUT --group G`
# `p2p-fl node`'s exit codes beside 0 (done) and 1 (a bug: a traceback in its log).
CONFIG_ERROR_EXIT = 2  # it refused its input: starting it again cannot help
INCOMPLETE_EXIT = 3  # it finished without the federation (result.json: shortfall); it will not run again
GAVE_UP_EXIT = 4  # it waited network.run_timeout_s in all; its checkpoint is kept


@dataclasses.dataclass(frozen=True)
class Supervision:
    """What launch does when a node process dies (a signal, or a nonzero exit but 2)."""

    restart: bool = True
    delay_s: float = 2.0  # wait before starting it again (its port, a crash loop)
    max_restarts: int = 5  # per node; then launch reports the node as failed


def after_exit(returncode: int, restarts: int, supervision: Supervision, finished: bool = False) -> str:
    """"done", "restart" or "failed" for a node process that exited with `returncode`
    (negative: killed by that signal) after `restarts` restarts; `finished`: its result.json
    is written (it died on its way out: a restart would refuse the finished --out)."""
    if returncode in (0, INCOMPLETE_EXIT) or finished:  # INCOMPLETE_EXIT: the summary says why
        return "done"
    if returncode in (CONFIG_ERROR_EXIT, GAVE_UP_EXIT) or not supervision.restart or restarts >= supervision.max_restarts:
        return "failed"
    return "restart"


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
    if dataset is not None and t.data.test == t.data.dataset:
        # The shared test set was the partitioned dataset's own test split: it stays so.
        # (Scoring a model of the new data on the old data's test set measures nothing.)
        data["test"] = dataset
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


def site_groups(names: list[str], processes: int | None) -> list[list[str]]:
    """The sites each process hosts: `processes` runs of consecutive sites, as even as can be
    (None: one site a process).

    Example:
        >>> site_groups(["a", "b", "c", "d", "e"], 2)
        [['a', 'b', 'c'], ['d', 'e']]
    """
    count = len(names) if processes is None else min(processes, len(names))
    size, extra = divmod(len(names), count)
    groups, start = [], 0
    for g in range(count):
        end = start + size + (g < extra)
        groups.append(names[start:end])
        start = end
    return groups


def host_addresses(groups: list[list[str]], group_hosts: list[str]) -> dict[str, str]:
    """Each site's address when group g runs on host group_hosts[g] ("HOST" or "HOST:PORT"):
    a host's sites take consecutive ports from PORT (default HOST_PORT), whichever group
    they are in.

    Example:
        >>> host_addresses([["a", "b"], ["c"], ["d"]], ["n1", "n2:9000", "n1"])
        {'a': 'tcp://n1:7700', 'b': 'tcp://n1:7701', 'c': 'tcp://n2:9000', 'd': 'tcp://n1:7702'}
    """
    next_port: dict[str, int] = {}
    addresses = {}
    for group, entry in zip(groups, group_hosts):
        host, _, port = entry.rpartition(":") if entry.rpartition(":")[2].isdigit() else (entry, "", "")
        next_port.setdefault(host, int(port) if port else HOST_PORT)
        for name in group:
            addresses[name] = f"tcp://{host}:{next_port[host]}"
            next_port[host] += 1
    return addresses


def prepare(topology: Topology, out: Path, console: Console,
            addresses: dict[str, str] | None = None) -> tuple[Topology, dict[str, Path]]:
    """Writes one data shard per site and the topology (free loopback ports, or `addresses`);
    returns both."""
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(topology.data.dataset, **data_options(topology.data))
    dataset = subsample(dataset, topology.data.train_images, topology.seed)
    shards = partition_dataset(dataset, len(topology.peers), topology.data.partition, topology.seed)
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    paths = {}
    for peer, shard in zip(topology.peers, shards):
        paths[peer.name] = shard_dir / f"{peer.name}.npz"
        save_npz(shard, paths[peer.name])
    if addresses is None:
        addresses = {p.name: f"tcp://127.0.0.1:{port}" for p, port in zip(topology.peers, free_ports(len(topology.peers)))}
    public_keys = {p.name: "" for p in topology.peers}
    # Fresh identities for every launch, a rerun into the same OUT too: no secret file of an
    # earlier run (which may have been copied or read meanwhile) is ever used again.
    keys = out / "keys"
    if keys.is_symlink() or keys.is_file():
        keys.unlink()
    shutil.rmtree(keys, ignore_errors=True)
    if keys.exists():
        raise RuntimeError(f"{keys}: cannot remove the keys of an earlier run")
    if not topology.network.insecure:
        for p in topology.peers:
            public_path, _ = generate_keypair(keys, p.name)
            public_keys[p.name] = load_public_key(public_path)
    peers = tuple(PeerConfig(p.name, addresses[p.name] if p.inbound else "", public_keys[p.name], p.inbound)
                  for p in topology.peers)
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


def node_env(num_processes: int) -> dict[str, str]:
    """Environment for local node processes: share the cores, one compilation cache and,
    with several processes, the GPU (JAX preallocates 75% of a GPU's memory per process by
    default, so a second node on the same GPU would fail to start)."""
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    env["P2P_FL_THREADS"] = str(max(1, cores // num_processes))
    if num_processes > 1:
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("P2P_FL_XLA_CACHE", str(XLA_CACHE_DIR))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


ENGINES = ("process", "inproc")


def run_launch(topology: Topology, out: Path, *, console: Console | None = None, netns: bool = False,
               supervision: Supervision = Supervision(), engine: str = "process", faults: tuple = (),
               processes: int | None = None) -> dict:
    """Runs the federation; returns the summary (also written to OUT/summary.json).

    `engine`: "process" (one node process per site over CurveZMQ, the default) or "inproc"
    (every site in this process, `p2p_fl.simulate`, with the fault schedule `faults`).
    `processes`: the process engine's sites spread over that many processes (`site_groups`;
    None: one per site). With `netns`, every process runs in a network namespace of its own
    (deleted at the end however the run ends); `netns.NetnsError` if they cannot be made.
    """
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)  # a log file has no width; keep tables readable
    if engine == "inproc":
        with sigterm_as_interrupt():
            return _run_inproc(topology, out, console, faults)
    groups = site_groups(list(topology.names), processes)
    with sigterm_as_interrupt(), (network_hosts(len(groups)) if netns else contextlib.nullcontext()) as hosts:
        return _run_nodes(topology, out, console, hosts, supervision, groups)


def _run_inproc(topology: Topology, out: Path, console: Console, faults: tuple) -> dict:
    """Every site in this process (`simulate.run_sites`), from the same shards, keys and
    topology file a process launch writes; the same live table, files and summary."""
    import logging

    from p2p_fl.simulate import run_sites
    from p2p_fl.site import site_curve

    topology, shard_paths = prepare(topology, out, console)
    started = time.monotonic()
    data = {name: load_dataset(str(path), **data_options(topology.data)) for name, path in shard_paths.items()}
    curves = {n: site_curve(topology, n, out / "keys" / f"{n}.key_secret", out / "topology.toml")
              for n in topology.names}
    common_test = load_test_like(topology.data.test, next(iter(data.values()))) if topology.data.test else None
    status = {p.name: {"state": "starting"} for p in topology.peers}
    live = Live(_status_table(topology, status, started), console=console, refresh_per_second=4) \
        if console.is_terminal else None

    def emit(name: str, event: dict) -> None:
        _apply_event(status[name], event)
        if live is not None:
            live.update(_status_table(topology, status, started))
        elif event.get("event") in ("trained", "done", "resumed"):
            console.print(_event_line(name, event))

    handler = logging.FileHandler(out / "simulation.log")  # every site's log lines, as node.log has one's
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.INFO)
    if live:
        live.start()
    try:
        results = run_sites(topology, out, data, curves, common_test=common_test, faults=faults, emit=emit)
    finally:
        if live:
            live.stop()
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()
    summary = collect_summary(topology, out, time.monotonic() - started,
                              restarts={n: r["resumes"] for n, r in results.items()}, engine="inproc")
    console.print(results_table(summary))
    return summary


def prepare_hosts(topology: Topology, out: Path, group_hosts: list[str], console: Console | None = None) -> list[dict]:
    """For sites spread over other machines (a cluster): writes OUT as a launch would (shards,
    keys, the topology with each site at its host's address) and OUT/groups.json, one process
    per entry of `group_hosts` (a host may repeat); starts nothing. Each process is then
    `p2p-fl group OUT --group G` on its host; the last to finish writes OUT/summary.json.
    Returns the groups ({"host", "sites"})."""
    console = console or Console()
    groups = site_groups(list(topology.names), len(group_hosts))
    topology, _ = prepare(topology, out, console, host_addresses(groups, group_hosts))
    placed = [{"host": host, "sites": group} for host, group in zip(group_hosts, groups)]
    write_json(out / GROUPS_FILE, {"groups": placed})
    return placed


def summarize_if_finished(out: Path) -> dict | None:
    """OUT/summary.json once every site of OUT's topology wrote its result.json (a run of
    `prepare_hosts`: the last group process to finish calls it); None before. Its wall_s is
    the longest site's."""
    from p2p_fl.config import load_topology

    topology = load_topology(out / "topology.toml")
    results = [out / name / "result.json" for name in topology.names]
    if not all(path.exists() for path in results):
        return None
    wall_s = max(json.loads(path.read_text())["wall_s"] for path in results)
    groups = json.loads((out / GROUPS_FILE).read_text())["groups"]
    return collect_summary(topology, out, wall_s, processes=len(groups))


@contextlib.contextmanager
def sigterm_as_interrupt():
    """A service manager stops launch (or an experiment) with SIGTERM: unwind as for Ctrl-C,
    so that the nodes and child processes are stopped and the namespaces deleted (the
    default handler would skip all three)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclasses.dataclass
class _NodeProcess:
    """One node process as launch supervises it: one site's (`p2p-fl node`), or a group's
    (`p2p-fl group`, its log and pid file in OUT/<name>/)."""

    name: str
    cmd: list[str]
    folder: Path
    sites: list[str]
    out: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    restart_at: float | None = None  # dead, and to be started again at this time
    outcome: str | None = None  # "done" or "failed" once it will not run again


def _run_nodes(topology: Topology, out: Path, console: Console, hosts: Hosts | None, supervision: Supervision,
               groups: list[list[str]]) -> dict:
    addresses = None if hosts is None else host_addresses(groups, [hosts.address(g) for g in range(len(groups))])
    topology, shard_paths = prepare(topology, out, console, addresses)
    _write_netns_layout(topology, out, hosts, groups)
    started = time.monotonic()
    events: queue.Queue = queue.Queue()
    env = node_env(len(groups))
    nodes: dict[str, _NodeProcess] = {}
    status = {p.name: {"state": "starting"} for p in topology.peers}
    failed: list[str] = []
    # A terminal gets a live table; a log (CI, a pipe) gets one line per finished round.
    live = Live(_status_table(topology, status, started), console=console, refresh_per_second=4) \
        if console.is_terminal else None
    try:
        for i, group in enumerate(groups):
            for name in group:
                (out / name).mkdir(exist_ok=True)
            if len(group) == 1:
                name = group[0]
                cmd = [sys.executable, "-m", "p2p_fl", "node", "--config", str(out / "topology.toml"),
                       "--name", name, "--data", str(shard_paths[name]), "--out", str(out / name),
                       "--key", str(out / "keys" / f"{name}.key_secret"), "--events"]
            else:
                name = f"group-{i + 1}"
                cmd = [sys.executable, "-m", "p2p_fl", "group", str(out), *(f"--name={n}" for n in group), "--events"]
            node = _NodeProcess(name, (hosts.exec_prefix(i) if hosts else []) + cmd, out / name, group, out)
            node.folder.mkdir(exist_ok=True)
            (node.folder / "node.log").write_bytes(b"")
            (node.folder / "node.pid").unlink(missing_ok=True)  # a rerun's: that process is gone
            nodes[name] = node
            _start(node, env, events)
        if live:
            live.start()
        while any(n.outcome is None for n in nodes.values()) or not events.empty():
            try:
                name, event = events.get(timeout=0.25)
            except queue.Empty:
                pass
            else:
                _apply_event(status[name], event)
                if live is None and event.get("event") in ("trained", "done", "resumed"):
                    console.print(_event_line(name, event))
            for node in nodes.values():
                line = _supervise(node, [status[s] for s in node.sites], supervision, env, events)
                if line:
                    console.print(line)
                if node.outcome == "failed" and node.name not in failed:
                    failed.append(node.name)
            if live:
                live.update(_status_table(topology, status, started))
    except BaseException:  # an interrupt, or a bug: leave no node running behind
        running = [n.proc for n in nodes.values() if n.proc is not None and n.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for node in nodes.values():
            (node.folder / "node.pid").unlink(missing_ok=True)
        raise
    finally:
        if live:
            live.stop()
    summary = collect_summary(topology, out, time.monotonic() - started,
                              restarts={site: n.restarts for n in nodes.values() for site in n.sites},
                              processes=len(groups))
    console.print(results_table(summary))
    if failed:
        raise RuntimeError(f"nodes {', '.join(failed)} failed; their logs are in {out}/<name>/node.log")
    return summary


def _start(node: _NodeProcess, env: dict, events: queue.Queue) -> None:
    """Starts (or starts again) the node's process; its pid goes to FOLDER/node.pid while it runs."""
    with (node.folder / "node.log").open("ab") as log_file:  # a restart appends to the same log
        # umask 077: the node's checkpoint, models and metrics are private (as with `p2p-fl node`).
        node.proc = subprocess.Popen(node.cmd, stdout=subprocess.PIPE, stderr=log_file, env=env, umask=0o077)
    pid_file = node.folder / "node.pid"
    pid_file.with_suffix(".pid.tmp").write_text(f"{node.proc.pid}\n")
    os.replace(pid_file.with_suffix(".pid.tmp"), pid_file)  # a reader never sees half a pid
    threading.Thread(target=_pump_events, args=(node.sites[0], node.proc, events), daemon=True).start()


def _supervise(node: _NodeProcess, states: list[dict], supervision: Supervision, env: dict,
               events: queue.Queue) -> str | None:
    """Notices an exit and restarts when due (a group's sites that finished are not run
    again); returns a line to report, if any. `states`: the live status of its sites."""
    if node.outcome is not None:
        return None
    if node.restart_at is not None:
        if time.monotonic() < node.restart_at:
            return None
        node.restart_at = None
        node.restarts += 1
        with (node.folder / "node.log").open("a") as log:
            log.write(f"--- launch: restart {node.restarts} of {node.name} ---\n")
        _start(node, env, events)
        for state in states:
            if state.get("state") != "done":
                state.update(state="restarted", restarts=node.restarts)
        return f"[yellow]{node.name}: restarted ({node.restarts} of at most {supervision.max_restarts}), pid {node.proc.pid}[/]"
    returncode = node.proc.poll()
    if returncode is None:
        return None
    (node.folder / "node.pid").unlink(missing_ok=True)  # it names a running process only
    how = _exit_words(returncode)
    finished = all((node.out / site / "result.json").exists() for site in node.sites)
    verdict = after_exit(returncode, node.restarts, supervision, finished)
    if finished and returncode != 0:
        node.outcome = verdict
        return f"[yellow]{node.name} {how} after it finished; its result stands[/]"
    if verdict != "restart":
        node.outcome = verdict
    if verdict == "done":
        return None
    if verdict == "failed":
        for state in states:
            if state.get("state") != "done":
                state["state"] = f"failed ({_exit_cause(returncode)})"
        gave_up = f" after {node.restarts} restart{'s' * (node.restarts > 1)}" if node.restarts else ""
        return f"[red]{node.name} {how}{gave_up}; see {node.folder / 'node.log'}[/]"
    node.restart_at = time.monotonic() + supervision.delay_s
    for state in states:
        if state.get("state") != "done":
            state["state"] = f"restarting ({_exit_cause(returncode)})"
    return f"[yellow]{node.name} {how}; restarting it in {supervision.delay_s:g} s[/]"


def _exit_words(returncode: int) -> str:
    cause = _exit_cause(returncode)
    return f"was killed by {cause}" if returncode < 0 else f"exited with {returncode}"


def _exit_cause(returncode: int) -> str:
    """"SIGKILL" for a process killed by a signal, "exit 1" for one that exited."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _write_netns_layout(topology: Topology, out: Path, hosts: Hosts | None, groups: list[list[str]]) -> None:
    """OUT/netns.json: each site's namespace (its group's), for `python -m p2p_fl.netns cut OUT SITE` and tests."""
    path = out / "netns.json"
    if hosts is None:
        path.unlink(missing_ok=True)
        return
    sites = {name: {"index": g, "namespace": hosts.namespace(g), "address": hosts.address(g)}
             for g, group in enumerate(groups) for name in group}
    path.write_text(json.dumps({"run": hosts.run, "bridge_namespace": hosts.bridge_namespace, "hosts": len(groups),
                                "sites": sites}, indent=2))


def collect_summary(topology: Topology, out: Path, wall_s: float, restarts: dict[str, int] | None = None,
                    engine: str = "process", processes: int | None = None) -> dict:
    """Merges every node's result.json into OUT/summary.json, with how often launch restarted
    each site's process and how many processes ran the sites (the process engine)."""
    nodes = []
    for peer in topology.peers:
        path = out / peer.name / "result.json"
        if path.exists():
            nodes.append(json.loads(path.read_text()))
    summary = {
        "protocol": topology.protocol,
        "federation": topology.federation,
        "engine": engine,
        "processes": 1 if engine == "inproc" else processes or len(topology.peers),
        "peers": len(topology.peers),
        "dataset": topology.data.dataset,
        # The headline's test set: a shared one, or each site's own test split ("own").
        "test_set": topology.data.test or "own",
        "image_shape": nodes[0].get("image_shape") if nodes else None,
        "classes": nodes[0].get("classes") if nodes else None,
        "partition": topology.data.partition,
        "seed": topology.seed,
        "model": topology.training.model,
        "rounds": topology.training.rounds,
        "local_epochs": topology.training.local_epochs,
        "min_local_steps": topology.training.min_local_steps,
        "prox_mu": topology.training.prox_mu,
        "outer_optimizer": topology.gossip.outer_optimizer if topology.protocol == "gossip" else "avg",
        # The refit's Newton steps that ran (a site skips it on too few pooled images: result.json says why).
        "head_refit_steps": max((n.get("head_refit_steps") or 0 for n in nodes), default=0),
        "fedbn": topology.training.fedbn,
        "logit_adjustment": logit_adjustment_applies(topology),
        "keep_optimizer_state": topology.training.keep_optimizer_state,
        "privacy": dataclasses.asdict(topology.privacy),
        # Each site's own (epsilon, delta) for its own shard; they do not add up across sites.
        "epsilon": {n["name"]: n.get("epsilon") for n in nodes} if topology.privacy.enabled else {},
        "wall_s": wall_s,
        "final": _final_metrics(topology, nodes),
        "restarts": {p.name: 0 for p in topology.peers} | (restarts or {}),
        # Sites that finished without the federation, and why (their node exited 3).
        "incomplete": {n["name"]: n["shortfall"] for n in nodes if n.get("shortfall")},
        "nodes": nodes,
    }
    write_json(out / "summary.json", summary)
    return summary


def _final_metrics(topology: Topology, nodes: list[dict]) -> dict:
    """The federation's model on the common test set.

    A ring ends with one model every site holds (any node's figures serve); after local
    training or gossip every site ends with its own model, so the figures are the mean over
    sites (on a complete graph without dropouts the gossip models are equal anyway). A site
    that left for good ([[events]]) keeps the model it left with: it is not the federation's.
    """
    keys = ("test_loss", "test_acc", "test_auc", "test_sens", "test_spec", "test_threshold",
            "test_acc_at_val_threshold")
    nodes = [n for n in nodes if n.get("final_left_at") is None] or nodes
    if not nodes:
        return {}
    if topology.protocol in SITE_MODEL_PROTOCOLS:
        return {k: _mean([n.get(k) for n in nodes]) for k in keys}
    return {k: nodes[0].get(k) for k in keys}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _options(summary: dict) -> str:
    """' · FedProx mu=0.01 · FedAvgM · head refit x5 · FedBN · logit adjustment · optimizer state kept · DP' for the options a run used ('' for none)."""
    options = [f"FedProx mu={summary['prox_mu']:g}"] if summary.get("prox_mu") else []
    outer = summary.get("outer_optimizer", "avg")
    options += [] if outer == "avg" else [{"momentum": "FedAvgM", "adam": "FedAdam"}[outer]]
    options += [f"head refit x{summary['head_refit_steps']}"] if summary.get("head_refit_steps") else []
    options += ["FedBN"] if summary.get("fedbn") else []
    options += ["logit adjustment"] if summary.get("logit_adjustment") else []
    options += ["optimizer state kept"] if summary.get("keep_optimizer_state") else []
    options += ["DP"] if summary.get("privacy", {}).get("enabled") else []
    return "".join(f" · {option}" for option in options)


def results_table(summary: dict) -> Table:
    table = Table(title=f"{summary['protocol']}{_options(summary)} · {summary['peers']} sites · {summary['wall_s']:.1f} s")
    private = bool(summary.get("epsilon"))  # a column of each site's epsilon spent
    for col in ("node", "samples", "test loss", "acc@0.5", "AUC", "sens", "spec", "local AUC", "wall s", "MB sent",
                *(["epsilon"] if private else [])):
        table.add_column(col, justify="right" if col != "node" else "left")
    for n in summary["nodes"]:
        table.add_row(n["name"], str(n["samples"]), _f(n.get("test_loss")), _f(n.get("test_acc")),
                      _f(n.get("test_auc")), _f(n.get("test_sens")), _f(n.get("test_spec")),
                      _f(n.get("local_test_auc")), f"{n['wall_s']:.1f}", f"{n['bytes_sent'] / 1e6:.2f}",
                      *([_f(n.get("epsilon"))] if private else []))
    f = summary["final"]
    label = "final (mean of sites)" if summary["protocol"] in SITE_MODEL_PROTOCOLS else "final model"
    table.add_row(f"[bold]{label}[/]", "", _f(f.get("test_loss")), _f(f.get("test_acc")),
                  f"[bold]{_f(f.get('test_auc'))}[/]", _f(f.get("test_sens")), _f(f.get("test_spec")), "",
                  f"{summary['wall_s']:.1f}", f"{sum(n['bytes_sent'] for n in summary['nodes']) / 1e6:.2f}",
                  *([""] if private else []))
    return table


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pump_events(name: str, proc: subprocess.Popen, events: queue.Queue) -> None:
    """A node's JSON events, by site: a group's name their site ("site"), a node's are its own."""
    for line in proc.stdout:
        try:
            event = json.loads(line)
            events.put((event.pop("site", name) if isinstance(event, dict) else name, event))
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
        state.update(val_auc=event["val_auc"], bytes_sent=event["bytes_sent"], loss=event["train_loss"],
                     trained=state.get("trained", 0) + 1)
    elif kind == "done":
        state.update(state="done", test_auc=event["test_auc"], bytes_sent=event["bytes_sent"])
    elif kind == "resumed":
        state.update(state=f"resumed from checkpoint ({event['resumes']})")


def total_trainings(topology: Topology) -> int:
    """How many trainings the whole federation runs: a ring's hops, else rounds at every site."""
    from p2p_fl.protocols.ring import ring_cycles

    if topology.protocol in RING_PROTOCOLS:
        cycles = ring_cycles(topology.names, topology.training.rounds, topology.ring.order, topology.seed,
                             topology.absences())
        return sum(len(c) for c in cycles)
    return topology.training.rounds * len(topology.peers)


def progress_line(topology: Topology, status: dict, elapsed_s: float) -> str:
    """'12/30 trainings, about 40 s left': the estimate assumes the trainings still to come
    take as long as those done took (waiting included)."""
    total = total_trainings(topology)
    done = min(total, sum(s.get("trained", 0) for s in status.values()))
    if done == 0:
        return f"0/{total} trainings"
    return f"{done}/{total} trainings, about {elapsed_s * (total - done) / done:.0f} s left"


def _status_table(topology: Topology, status: dict, started: float) -> Table:
    elapsed = time.monotonic() - started
    table = Table(title=f"{topology.federation} · {topology.protocol} · {elapsed:.0f} s · "
                        f"{progress_line(topology, status, elapsed)}")
    # Rounds count 1..N; a ring's "round" is its hop, out of every hop of every cycle.
    rounds = total_trainings(topology) if topology.protocol in RING_PROTOCOLS else topology.training.rounds
    gossip = topology.protocol == "gossip"
    columns = ["node", "state", "round", "epoch", "loss", "val AUC", "test AUC", "MB sent", "restarts"]
    columns[2:2] = ["sum (heard/members)", "dropped"] if gossip else ["cycle"]
    for col in columns:
        table.add_column(col)
    for name, s in status.items():
        mb = s.get("bytes_sent")
        where = [s.get("group", ""), s.get("dropped", "")] if gossip else [_opt(s.get("cycle"))]
        at = s.get("round")
        shown = "" if at is None else f"{at + 1}/{rounds}"
        table.add_row(name, s.get("state", ""), *where, shown, s.get("epoch", ""),
                      _f(s.get("loss")), _f(s.get("val_auc")), _f(s.get("test_auc")),
                      "-" if mb is None else f"{mb / 1e6:.2f}", _opt(s.get("restarts")))
    return table


def _opt(value) -> str:
    return "" if value is None else str(value)


def _event_line(name: str, event: dict) -> str:
    if event["event"] == "trained":
        return (f"{name}: round {event['round']} trained, loss {_f(event['train_loss'])}, "
                f"val AUC {_f(event['val_auc'])}, {event['train_s']:.1f} s")
    if event["event"] == "resumed":
        return f"{name}: resumed from its checkpoint (restart {event['resumes']})"
    return f"{name}: done, test AUC {_f(event['test_auc'])}"
