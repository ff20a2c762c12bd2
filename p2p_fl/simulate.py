"""The in-process engine: every site of a federation in one process, for studies.

Each site is the same `Site` and `Driver` a node process runs, with the same protocol,
checkpoints, secure sums (real masks, real key agreement) and [[events]]; only the transport
(`net.memory`: the same encoded messages, checked the same way) and the clock differ. Time is
virtual: it stands still while sites train and messages are delivered, and jumps ahead only
when every site is idle, so timeouts fire as they would, without waiting for them.

Sites that are due to train at the same moment train together (`learn.together`): on an
accelerator in one vmapped computation over their stacked states; on a CPU one after another
through the same padded program (faster there than vmap, and one compile for every shard
size), so ten sites cost about one model's training over all their images. One process also
means one JAX runtime for all sites.

A fault schedule (`Fault`) kills sites at a chosen round or hop, mid-training or right after
they joined a secure sum, and restarts them from their checkpoint later: fault experiments
that take minutes of processes take seconds here, and always unfold the same way. Only the
sites the schedule kills write checkpoints: the others would never read one.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

from p2p_fl.config import ConfigError, Topology
from p2p_fl.data import Dataset, Split
from p2p_fl.driver import Driver
from p2p_fl.learn.runtime import keep_freed_memory
from p2p_fl.net import Curve, wire
from p2p_fl.net.memory import MemoryHub
from p2p_fl.protocols import Train
from p2p_fl.site import Site, train_together

log = logging.getLogger(__name__)

PHASES = ("train", "sum")
MAX_PASSES = 100_000  # delivery passes at one virtual instant before the run is called stuck


class SimulationError(RuntimeError):
    """The simulated federation stalled (no site can go on before run_timeout_s)."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """Kill `site` at `round` (a gossip round or a ring hop): as it starts training it
    (phase "train": the training is lost) or right after it sent its masked reply to a
    secure sum of that round (phase "sum": a dropout inside the sum). With `back_after`,
    restart it from its checkpoint once the sites still up reached round + back_after."""

    site: str
    round: int
    phase: str = "train"
    back_after: int | None = None

    @classmethod
    def parse(cls, text: str) -> Fault:
        """SITE:ROUND[:PHASE][:BACK], e.g. "hospital-b:3", "hospital-b:3:sum:2"."""
        parts = text.split(":")
        try:
            site, round_ = parts[0], int(parts[1])
            phase = parts[2] if len(parts) > 2 and parts[2] in PHASES else "train"
            rest = parts[3:] if len(parts) > 2 and parts[2] in PHASES else parts[2:]
            back = int(rest[0]) if rest else None
            if len(rest) > 1 or round_ < 0 or (back is not None and back < 1) or not site:
                raise ValueError
        except (IndexError, ValueError):
            raise ConfigError(f"--kill {text!r}: expected SITE:ROUND[:train|sum][:BACK] "
                              "(ROUND >= 0, BACK >= 1 rounds later)") from None
        return cls(site, round_, phase, back)


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class _Sim:
    """One simulated site: its data and keys stay, its site and driver go with a kill."""

    name: str
    data: Dataset
    curve: Curve | None
    out: Path
    driver: Driver | None = None
    done: bool = False
    result: dict | None = None
    killed_at: int | None = None  # the fault's round, while it is down


def run_sites(topology: Topology, out: Path, data: dict[str, Dataset], curves: dict[str, Curve | None], *,
              common_test: Split | None = None, faults: tuple[Fault, ...] = (),
              emit: Callable[[str, dict], None] = lambda name, event: None) -> dict[str, dict]:
    """Runs every site of `topology` in this process until each finished; returns the
    results (site -> result.json's content) of the sites that finished.

    `data` and `curves` hold each site's shard and CURVE keys (keys derive the secure sums'
    pair secrets); files go to out/<site>/ as a node's do. Raises SimulationError if the
    federation stalls, ConfigError for a fault naming no site.
    """
    unknown = [f.site for f in faults if f.site not in topology.names]
    if unknown:
        raise ConfigError(f"--kill: no site named {', '.join(unknown)} in the topology")
    if len(topology.names) > 1:
        keep_freed_memory()  # many short jitted calls: their temporaries stay mapped
    clock = VirtualClock()
    net = topology.network
    sims = {n: _Sim(n, data[n], curves.get(n), out / n) for n in topology.names}
    hub: MemoryHub | None = None
    pending = list(faults)
    killed = {f.site for f in faults}  # only these sites ever resume, so only they checkpoint
    due_kills: dict[str, int] = {}  # site -> the round of the sum it just replied to
    networked = topology.protocol != "local"
    tick_s = net.heartbeat_interval_s / 2

    def start(sim: _Sim) -> None:
        site = Site(topology, sim.name, sim.data, sim.out, curve=sim.curve, common_test=common_test,
                    emit=lambda event: emit(sim.name, event), durable=False,
                    checkpoints=sim.name in killed, now=clock())
        nonlocal hub
        if networked and hub is None:
            hub = MemoryHub(topology.federation, site.shared_spec(), peer_timeout_s=net.peer_timeout_s, clock=clock)
        transport = None
        if networked:
            transport = hub.transport(sim.name, [n for n in topology.names if n != sim.name])
            transport.on_send = lambda to, type_, round_: watch_send(sim.name, type_, round_)
        sim.driver = Driver(site, transport)
        sim.driver.start(clock())

    def watch_send(name: str, type_: str, round_: int) -> None:
        if type_ == wire.GOSSIP_MASKED and any(f.site == name and f.phase == "sum" and f.round == round_
                                               for f in pending):
            due_kills[name] = round_

    def kill(sim: _Sim, round_: int) -> None:
        fault = next(f for f in pending if f.site == sim.name and f.round == round_ and f.phase != "back")
        pending.remove(fault)
        log.warning("%s: killed at round %d (%s)%s", sim.name, round_, fault.phase,
                    "" if fault.back_after is None else f"; back at round {round_ + fault.back_after}")
        emit(sim.name, {"event": "state", "state": f"killed at {round_}"})
        if hub is not None:
            hub.down(sim.name)
        sim.driver = None  # what a kill -9 loses: all but the checkpoint
        sim.killed_at = round_
        if fault.back_after is not None:
            pending.append(dataclasses.replace(fault, phase="back", round=round_ + fault.back_after))

    def restarts() -> None:
        reached = max((s.driver.protocol.progress for s in sims.values() if s.driver is not None), default=0)
        for fault in [f for f in pending if f.phase == "back" and reached >= f.round]:
            pending.remove(fault)
            sim = sims[fault.site]
            sim.killed_at = None
            log.warning("%s: restarted from its checkpoint (the others at round %d)", sim.name, reached)
            start(sim)

    def running() -> list[_Sim]:
        return [s for s in sims.values() if s.driver is not None and not s.done]

    def settle(sim: _Sim) -> None:
        """After anything a site handled: a kill that became due, or its end."""
        if sim.name in due_kills:
            kill(sim, due_kills.pop(sim.name))
        elif sim.driver.final is not None:
            sim.result = sim.driver.result()
            sim.done = True
            if hub is not None:
                hub.down(sim.name)  # its sockets close, as a finished node's do

    def deliver() -> None:
        """Every site handles what reached it and the time, until nothing is in flight."""
        for _ in range(MAX_PASSES):
            for sim in running():
                sim.driver.poll(clock, 0.0)
                settle(sim)
            if hub is None or not hub.in_flight:
                return
        # Protocols answer each message with finitely many; messages that never stop while
        # no time passes are a bug, and a simulation must say so rather than hang.
        raise SimulationError(f"messages still in flight after {MAX_PASSES} delivery passes at "
                              f"virtual time {clock():g} s")

    for sim in sims.values():
        start(sim)
    while any(not s.done for s in sims.values()):
        if clock() > net.run_timeout_s:
            stuck = ", ".join(s.name for s in sims.values() if not s.done)
            raise SimulationError(f"sites {stuck} did not finish within network.run_timeout_s="
                                  f"{net.run_timeout_s:g} (virtual) seconds")
        restarts()
        deliver()
        steps = []
        for sim in running():
            step = sim.driver.next_training()
            if step is None:
                continue
            if any(f.site == sim.name and f.phase == "train" and f.round == step.round for f in pending):
                kill(sim, step.round)
                continue
            steps.append(sim)
        if steps:
            _train([(sim.driver, sim.driver.training) for sim in steps], clock)
            for sim in steps:
                settle(sim)
            continue
        if all(s.done or (s.driver is None and not _coming_back(s, pending)) for s in sims.values()):
            break  # the rest were killed for good
        clock.now += tick_s  # everyone idle: time moves on towards the next deadline
    return {s.name: s.result for s in sims.values() if s.result is not None}


def _coming_back(sim: _Sim, pending: list[Fault]) -> bool:
    return any(f.site == sim.name and f.phase == "back" for f in pending)


def _train(steps: list[tuple[Driver, Train]], clock: VirtualClock) -> None:
    """Trains every site's step (`site.train_together`); then each driver hears of its trained step."""
    outcomes = train_together([(d.site, s) for d, s in steps])
    for (d, _), (weights, record) in zip(steps, outcomes):
        d.trained(weights, record, clock())
