"""One institution's process: its site, its ZeroMQ peer, and the driver between them.

The process engine: training runs on a worker thread, so the peer keeps answering and the
heartbeats keep going while JAX computes; the driver carries out what the protocol decides.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

from p2p_fl.config import ConfigError, Topology
from p2p_fl.data import Dataset, Split
from p2p_fl.driver import Driver
from p2p_fl.net import Curve, Peer
from p2p_fl.site import Emit, Site

POLL_S = 0.05


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
    site = Site(topology, name, data, out_dir, curve=curve, common_test=common_test, emit=emit,
                now=time.monotonic())
    peer = None
    if topology.protocol != "local":
        others = {p.name: p.address for p in topology.peers if p.name != name}
        missing = [n for n, a in others.items() if not a] + ([name] if not me.address else [])
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
    finally:
        executor.shutdown(wait=True)
        if peer is not None:
            peer.close()
    return driver.result()
