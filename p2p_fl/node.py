"""The process engine: sites over ZeroMQ, each with its own peer, site and driver.

`run_node` is one institution's process (`p2p-fl node`). `run_group` hosts several sites of
a launch in one process (`p2p-fl launch --processes P`): each keeps its own CURVE identity,
port, files and driver, and talks to every other site over ZeroMQ as a node does (the ones
in the same process too), but they share one JAX runtime (one process's memory, not one per
site) and train together when due at once (`site.train_together`). Training runs on a
worker thread, so the peers keep answering and the heartbeats keep going while JAX
computes; each driver carries out what its protocol decides.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import resource
import time
from pathlib import Path

import zmq

from p2p_fl.config import ConfigError, Topology
from p2p_fl.data import Dataset, Split
from p2p_fl.driver import Driver
from p2p_fl.files import write_json
from p2p_fl.learn.runtime import keep_freed_memory
from p2p_fl.net import Curve, Peer
from p2p_fl.site import Emit, Site, train_together

POLL_S = 0.05
STATUS_EVERY_S = 2.0
STATUS_FILE = "status.json"


class StatusFile:
    """OUT/status.json, rewritten atomically every STATUS_EVERY_S while the node runs: its
    state, round, what it trained, and each peer as its heartbeats show it; what
    `p2p-fl status OUT` prints. Only this site's own view: nothing is asked of the peers."""

    def __init__(self, path: Path, name: str, topology: Topology):
        self.path = path
        self.status = {"name": name, "pid": os.getpid(), "federation": topology.federation,
                       "protocol": topology.protocol, "rounds": topology.training.rounds, "state": "starting",
                       "round": None, "trained": [], "last_val_auc": None, "peers": {}}
        self._written = float("-inf")

    def event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "state":
            self.status["state"] = event["state"]
            if "round" in event:
                self.status["round"] = event["round"]
        elif kind == "trained":
            self.status["trained"].append(event["round"])
            self.status["last_val_auc"] = event.get("val_auc")

    def write(self, peer: Peer | None, now: float, *, force: bool = False) -> None:
        if not force and now - self._written < STATUS_EVERY_S:
            return
        self._written = now
        if peer is not None and peer.health is not None:
            health = peer.health
            self.status["peers"] = {
                other: {"state": "other setup" if other in peer.mismatched else
                        health.state(other, now) if other in health.progress else "not heard",
                        "silent_s": round(now - health.last_heard[other], 1) if other in health.progress else None,
                        "progress": health.progress.get(other),
                        "differs": peer.mismatched.get(other)}
                for other in sorted(health.last_heard)}
        self.status["updated"] = time.time()
        try:
            write_json(self.path, self.status)
        except OSError:  # a full disk: the status is a view, never a reason to stop
            pass


class RunTimeout(Exception):
    """The node gave up waiting: network.run_timeout_s in all, or every peer silent for
    network.start_window_s (`Driver.abandoned`); its checkpoint is kept."""


@dataclasses.dataclass
class Member:
    """One site a process hosts: `site.Site`'s inputs."""

    name: str
    data: Dataset
    out_dir: Path
    curve: Curve | None


@dataclasses.dataclass
class _Hosted:
    name: str
    site: Site
    peer: Peer | None
    driver: Driver
    status: StatusFile


def run_node(
    topology: Topology,
    name: str,
    data: Dataset,
    out_dir: Path,
    *,
    curve: Curve | None,
    common_test: Split | None = None,
    emit: Emit = lambda event: None,
) -> dict:
    """Runs one site (the arguments are `site.Site`'s) in this process over its ZeroMQ peer
    until its protocol finishes; returns the result also written to out_dir/result.json.
    Raises RunTimeout if it gave up waiting."""
    outcome = run_group(topology, [Member(name, data, out_dir, curve)], common_test=common_test,
                        emit=lambda _, event: emit(event))[name]
    if isinstance(outcome, RunTimeout):
        raise outcome
    return outcome


def run_group(topology: Topology, members: list[Member], *, common_test: Split | None = None,
              emit=lambda name, event: None) -> dict[str, dict | RunTimeout]:
    """Runs the member sites in this process, each over its own ZeroMQ peer, until each
    finished or gave up; returns site -> its result (result.json's content) or the
    RunTimeout it gave up with. Any other error stops them all (their checkpoints stay)."""
    if len(members) > 1:
        keep_freed_memory()  # many short jitted calls: their temporaries stay mapped
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
    hosted: list[_Hosted] = []
    outcomes: dict[str, dict | RunTimeout] = {}
    try:
        for member in members:
            hosted.append(_host(topology, member, common_test, emit))
        startup_s = process_age_s()  # imports, JAX, data, keys, sockets: until the sites start
        for h in hosted:
            h.driver.start(time.monotonic())
        _drive(topology, hosted, executor, outcomes, {"pid": os.getpid(), "sites": len(hosted), "startup_s": startup_s})
    finally:
        executor.shutdown(wait=True)
        for h in hosted:
            if h.peer is not None:
                h.peer.close()
    return outcomes


def _host(topology: Topology, member: Member, common_test: Split | None, emit) -> _Hosted:
    name = member.name
    status = StatusFile(member.out_dir / STATUS_FILE, name, topology)

    def emit_and_note(event: dict) -> None:
        status.event(event)
        emit(name, event)

    site = Site(topology, name, member.data, member.out_dir, curve=member.curve, common_test=common_test,
                emit=emit_and_note, now=time.monotonic())
    peer = None
    if topology.protocol != "local":
        others = {p.name: p.address for p in topology.peers if p.name != name}
        missing = [p.name for p in topology.peers if p.inbound and not p.address]
        if missing:
            raise ConfigError(f"peers {', '.join(missing)} have no address in the topology; use launch or fill in "
                              "[[peers]].address")
        try:
            peer = Peer(name, topology.peer(name).address, others, topology.federation, site.shared_spec(),
                        curve=member.curve, max_message_bytes=topology.network.max_message_mb * 2**20,
                        heartbeat_interval_s=topology.network.heartbeat_interval_s,
                        peer_timeout_s=topology.network.peer_timeout_s, fingerprint=site.fingerprint)
        except zmq.ZMQError as err:
            err.site = name  # which site's address failed, for the one-line error
            raise
    return _Hosted(name, site, peer, Driver(site, peer), status)


def _drive(topology: Topology, hosted: list[_Hosted], executor, outcomes: dict, process: dict) -> None:
    """The event loop: each site's messages and time, and the trainings as they fall due.
    `process`: what each site's result.json says of this process (its peak RSS added as it ends)."""
    # network.run_timeout_s bounds the time spent waiting, not training: each finished
    # training moves the deadline on by its length.
    deadline = time.monotonic() + topology.network.run_timeout_s
    running: concurrent.futures.Future | None = None
    batch: list[_Hosted] = []  # the sites whose steps the running training trains
    due: list[_Hosted] = []  # steps handed out while a training ran: the next batch
    training_since = 0.0
    active = list(hosted)

    def leave(h: _Hosted, outcome: dict | RunTimeout) -> None:
        active.remove(h)
        if h.peer is not None:
            h.peer.close()  # its sockets close, as a finished node's do
            h.peer = None
        outcomes[h.name] = outcome

    while active:
        now = time.monotonic()
        if now > deadline and running is None:
            for h in list(active):
                leave(h, RunTimeout(
                    f"{h.name}: waited {topology.network.run_timeout_s:g} s in all without the run finishing "
                    f"(network.run_timeout_s); its checkpoint in {h.site.out_dir} is kept: start it again to resume"))
            return
        for h in list(active):
            abandoned = None if h in batch or h in due else h.driver.abandoned(now)
            if abandoned:
                leave(h, RunTimeout(abandoned))
        for h in active:
            if h.driver.next_training() is not None:
                due.append(h)
        if running is None and due:
            batch, due = due, []
            running = executor.submit(train_together, [(h.site, h.driver.training) for h in batch])
            training_since = time.monotonic()
        if running is not None and running.done():
            trained = running.result()  # a training error is a bug: let it raise
            running = None
            deadline += time.monotonic() - training_since
            for h, (weights, record) in zip(batch, trained):
                h.driver.trained(weights, record, time.monotonic())
            batch = []
            for h in [h for h in active if h.driver.final is not None]:
                _finish(h)
                leave(h, h.driver.result({**process, "peak_rss_mb": peak_rss_mb()}))
            continue
        networked = [h for h in active if h.peer is not None]
        wait_s = POLL_S if running is None else POLL_S / 5
        for h in networked:
            h.driver.poll(time.monotonic, wait_s / len(networked))
        if not networked and running is not None:
            time.sleep(wait_s)
        for h in list(active):
            if h.driver.final is not None and h not in batch and h not in due:
                _finish(h)
                leave(h, h.driver.result({**process, "peak_rss_mb": peak_rss_mb()}))
            else:
                h.status.write(h.peer, time.monotonic())


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None where that cannot be read."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _finish(h: _Hosted) -> None:
    h.status.event({"event": "state", "state": "finishing"})
    h.status.write(h.peer, time.monotonic(), force=True)
