"""One institution's process: its site, its ZeroMQ peer, and the driver between them.

The process engine: training runs on a worker thread, so the peer keeps answering and the
heartbeats keep going while JAX computes; the driver carries out what the protocol decides.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

from p2p_fl.config import ConfigError, Topology
from p2p_fl.data import Dataset, Split
from p2p_fl.driver import Driver
from p2p_fl.files import write_json
from p2p_fl.net import Curve, Peer
from p2p_fl.site import Emit, Site

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
    until its protocol finishes; returns the result also written to out_dir/result.json."""
    me = topology.peer(name)
    status = StatusFile(out_dir / STATUS_FILE, name, topology)

    def emit_and_note(event: dict) -> None:
        status.event(event)
        emit(event)

    site = Site(topology, name, data, out_dir, curve=curve, common_test=common_test, emit=emit_and_note,
                now=time.monotonic())
    peer = None
    if topology.protocol != "local":
        others = {p.name: p.address for p in topology.peers if p.name != name}
        missing = [p.name for p in topology.peers if p.inbound and not p.address]
        if missing:
            raise ConfigError(f"peers {', '.join(missing)} have no address in the topology; use launch or fill in "
                              "[[peers]].address")
        peer = Peer(name, me.address, others, topology.federation, site.shared_spec(), curve=curve,
                    max_message_bytes=topology.network.max_message_mb * 2**20,
                    heartbeat_interval_s=topology.network.heartbeat_interval_s,
                    peer_timeout_s=topology.network.peer_timeout_s, fingerprint=site.fingerprint)
    driver = Driver(site, peer)
    # network.run_timeout_s bounds the time spent waiting, not training: each finished
    # training moves the deadline on by its length.
    deadline = time.monotonic() + topology.network.run_timeout_s
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"train-{name}")
    running: concurrent.futures.Future | None = None
    training_since = 0.0
    try:
        driver.start(time.monotonic())
        while driver.final is None:
            if time.monotonic() > deadline and running is None:
                raise RunTimeout(f"{name}: waited {topology.network.run_timeout_s:g} s in all without the run "
                                 f"finishing (network.run_timeout_s); its checkpoint in {out_dir} is kept: "
                                 "start it again to resume")
            abandoned = driver.abandoned(time.monotonic())
            if abandoned:
                raise RunTimeout(abandoned)
            step = driver.next_training()
            if step is not None:
                running = executor.submit(site.train, step)
                training_since = time.monotonic()
            if running is not None and running.done():
                weights, record = running.result()  # a training error is a bug: let it raise
                running = None
                deadline += time.monotonic() - training_since
                driver.trained(weights, record, time.monotonic())
                continue
            if peer is not None:
                driver.poll(time.monotonic, POLL_S if running is None else POLL_S / 5)
            elif running is not None:
                time.sleep(POLL_S / 5)
            status.write(peer, time.monotonic())
        status.event({"event": "state", "state": "finishing"})
        status.write(peer, time.monotonic(), force=True)
    finally:
        executor.shutdown(wait=True)
        if peer is not None:
            peer.close()
    return driver.result()
