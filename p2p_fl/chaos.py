"""Chaos trials: real federations under seeded random faults, each run checked afterwards
against what docs/protocols.md promises.

A trial launches a small federation (`p2p-fl launch`, one node process per site over
CurveZMQ, launch restarting a node that dies) and, at random moments drawn from the seed,
injects one to three faults into random sites, one after the other or (one time in three)
two at the same moment into two sites:

* `kill`: `kill -9`; launch restarts the node, which resumes from its checkpoint (read
  right after the kill: it must be readable);
* `freeze`: SIGSTOP for 1.5 to 4 peer timeouts, then SIGCONT: the site wakes up believing
  it still holds the ring's model or an open sum, while the others went on without it;
* `starve`: for a few seconds the site gets a tenth of a core (stopped 90% of the time);
* `cut`: the site's network link goes down for 1.5 to 4 peer timeouts and comes back
  (`launch --netns`, one network namespace per site; needs root): unlike a frozen site, the
  cut-off one keeps running and sees everyone else dead;
* `disk`: the site's disk is full for 3 to 10 s: its process cannot grow any file
  (RLIMIT_FSIZE lowered to 0 on the running process, so every write fails with EFBIG as
  with ENOSPC; a node restarted meanwhile gets the limit too), whether it is writing a
  checkpoint, a metrics line or its log.

The invariant checker (`check_run`) then reads the run's files and names every violation:
every site finished (launch exit 0, a result.json without `shortfall`, no traceback, no
`protocol-error`; a site a fault hit may end without the federation if it says so, exit 3);
ring: every hop trained only by the site the schedule gives it, no hop of a site no fault
hit skipped, at most one hop trained twice per fault, and one final model at every site,
bit for bit; gossip: the sites whose last mix took in every neighbour hold the same model
(within the secure sums' fixed-point error), and a site whose last mix no neighbour's model
reached says it ended alone. A last sum that failed with neighbours alive (the site kept its
own model: a group of 3 tolerates no dropout) is allowed and counted as degraded.

    p2p-fl chaos --protocols cwt,gossip,secure-gossip --trials 10 --faults kill,freeze,starve
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from p2p_fl.checkpoint import FILENAME as CHECKPOINT_FILE
from p2p_fl.checkpoint import load_checkpoint
from p2p_fl.config import load_topology
from p2p_fl.launch import INCOMPLETE_EXIT

FAULTS = ("kill", "freeze", "starve", "cut", "disk")
SITES = 4
# Fast liveness, so that a trial's faults play out in seconds; a frozen site is silent past
# peer_timeout_s and the others go on without it.
NETWORK = ("[network]\nheartbeat_interval_s = 0.3\npeer_timeout_s = 2.0\nack_timeout_s = 0.5\n"
           "handoff_timeout_s = 20.0\nrun_timeout_s = 300.0\nstart_window_s = 60.0\n")
PROTOCOLS = {
    "cwt": 'protocol = "cwt"\n[training]\nrounds = 3\nlocal_epochs = 1\nmin_local_steps = 0\n[ring]\nfinal = "last"\n',
    "gossip": 'protocol = "gossip"\n[training]\nrounds = 4\nlocal_epochs = 1\nmin_local_steps = 0\noptimizer = "sgd"\n'
              'learning_rate = 0.05\n[gossip]\nsecure = false\nround_timeout_s = 10.0\n',
    "secure-gossip": 'protocol = "gossip"\n[training]\nrounds = 4\nlocal_epochs = 1\nmin_local_steps = 0\noptimizer = "sgd"\n'
                     'learning_rate = 0.05\n[gossip]\nsecure = true\nround_timeout_s = 10.0\n',
}
# Sites whose last mix took in every neighbour hold one model: plain gossip up to float32
# summation order, secure gossip up to the sums' fixed-point error carried through training.
SAME_MODEL_TOLERANCE = {"cwt": 0.0, "gossip": 1e-5, "secure-gossip": 1e-4}
TRIAL_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # one of FAULTS
    site: str
    at_s: float  # after the launch started
    length_s: float = 0.0  # freeze and starve


def plan_faults(rng: random.Random, kinds: tuple[str, ...], sites: list[str], peer_timeout_s: float) -> list[Fault]:
    """One to three faults at random moments of the first half minute. Each starts after the
    previous one ended or, one time in three, at the same moment as the previous one, in
    another site (two sites hit at once)."""
    faults: list[Fault] = []
    t = end = 0.0
    for _ in range(rng.choice([1, 1, 2, 3])):
        kind = rng.choice(kinds)
        together = bool(faults) and rng.random() < 1 / 3
        if together:
            site = rng.choice([s for s in sites if s != faults[-1].site])
        else:
            t = end + rng.uniform(4.0, 12.0)
            site = rng.choice(sites)
        length = {"kill": 0.0, "freeze": rng.uniform(1.5, 4.0) * peer_timeout_s,
                  "cut": rng.uniform(1.5, 4.0) * peer_timeout_s,
                  "starve": rng.uniform(3.0, 8.0), "disk": rng.uniform(3.0, 10.0)}[kind]
        faults.append(Fault(kind, site, round(t, 2), round(length, 2)))
        end = max(end, t + length)
    return faults


def trial_topology(protocol: str, number: int) -> str:
    peers = "".join(f'[[peers]]\nname = "s{i}"\n' for i in range(SITES))
    return (f'federation = "chaos-{protocol}-{number}"\nseed = {number}\n{PROTOCOLS[protocol]}'
            f'[data]\ntest = ""\n{NETWORK}{peers}')


def run_trial(protocol: str, number: int, data: Path, folder: Path, faults: list[Fault]) -> dict:
    """Launches one federation, injects `faults` (each in a thread of its own, so that two can
    overlap), waits for the end; returns the trial's record."""
    out = folder / f"{protocol}-{number}"
    config = folder / f"{protocol}-{number}.toml"
    config.write_text(trial_topology(protocol, number))
    netns = ["--netns"] if any(f.kind == "cut" for f in faults) else []
    started = time.monotonic()
    with open(folder / f"{protocol}-{number}.launch.log", "wb") as log:
        launch = subprocess.Popen([sys.executable, "-m", "p2p_fl", "launch", str(config), "--data", str(data),
                                   "--out", str(out), "--restart-delay", "1", *netns], stdout=log, stderr=log,
                                  start_new_session=True)
    injected: list[Fault] = []
    unreadable: list[str] = []  # and harness failures
    lock = threading.Lock()

    def inject(fault: Fault) -> None:
        while time.monotonic() - started < fault.at_s and launch.poll() is None:
            time.sleep(0.05)
        try:
            if launch.poll() is not None or not _inject(fault, out, launch):
                return  # the run is over, or that node was between processes
        except Exception as err:  # noqa: BLE001 - the harness failed, not the run: say so
            with lock:
                unreadable.append(f"the harness could not inject {fault.kind} into {fault.site}: {err}")
            return
        problem = _checkpoint_problem(out / fault.site / CHECKPOINT_FILE) if fault.kind == "kill" else None
        with lock:
            injected.append(fault)
            if problem:
                unreadable.append(f"{fault.site}'s checkpoint after the kill: {problem}")

    threads = [threading.Thread(target=inject, args=(f,), daemon=True) for f in faults]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        code = launch.wait(timeout=TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
    wall_s = time.monotonic() - started
    injected.sort(key=lambda f: (f.at_s, f.site))
    checked = check_run(out, protocol, injected)
    violations = [f"launch did not end within {TRIAL_TIMEOUT_S} s"] if code is None else []
    # Exit 3: a site ended without the federation and said so; fine for a site a fault kept
    # out (check_run names any other).
    if code not in (None, 0) and not (code == INCOMPLETE_EXIT and checked["alone"]):
        violations.append(f"launch exited {code}")
    violations += unreadable
    return {"protocol": protocol, "trial": number, "faults": [dataclasses.asdict(f) for f in injected],
            "wall_s": round(wall_s, 1), "violations": violations + checked["violations"],
            "degraded": checked["degraded"], "alone": checked["alone"]}


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _inject(fault: Fault, out: Path, launch: subprocess.Popen) -> bool:
    """Carries out one fault; False if the site had no process to hit."""
    pid_file = out / fault.site / "node.pid"
    if fault.kind == "cut":
        from p2p_fl.netns import NetnsError, site_link

        hosts, index = site_link(out, fault.site)
        hosts.cut(index)
        try:
            _sleep_unless_over(fault.length_s, launch)
        finally:
            try:
                hosts.restore(index)
            except NetnsError:
                if launch.poll() is None:
                    raise
                # the run ended during the cut and launch removed its namespaces
        return True
    pid = _pid(pid_file)
    if pid is None:
        return False
    try:
        if fault.kind == "kill":
            os.kill(pid, signal.SIGKILL)
        elif fault.kind == "freeze":
            os.kill(pid, signal.SIGSTOP)
            _sleep_unless_over(fault.length_s, launch)
        elif fault.kind == "starve":  # a tenth of a core: stopped 90 ms of every 100
            until = time.monotonic() + fault.length_s
            while time.monotonic() < until and launch.poll() is None:
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.09)
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.01)
        elif fault.kind == "disk":
            _fill_disk(pid, pid_file, fault.length_s, launch)
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")
    except ProcessLookupError:
        pass  # it ended meanwhile
    finally:
        if fault.kind in ("freeze", "starve"):
            try:
                os.kill(pid, signal.SIGCONT)  # never leave a site stopped
            except ProcessLookupError:
                pass
    return True


def _fill_disk(pid: int, pid_file: Path, length_s: float, launch: subprocess.Popen) -> None:
    """For length_s, no process of the site can grow a file: its soft RLIMIT_FSIZE is 0 (the
    hard limit stays, so it can be given back). A node that dies of it and is restarted
    meanwhile finds the disk still full."""
    limited: dict[int, tuple[int, int]] = {}
    until = time.monotonic() + length_s
    try:
        while time.monotonic() < until and launch.poll() is None:
            pid = _pid(pid_file) or pid
            if pid not in limited:
                try:
                    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
                    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))
                    limited[pid] = (soft, hard)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
    finally:
        for limited_pid, limits in limited.items():
            try:
                resource.prlimit(limited_pid, resource.RLIMIT_FSIZE, limits)
            except ProcessLookupError:
                pass


def _sleep_unless_over(seconds: float, launch: subprocess.Popen) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until and launch.poll() is None:
        time.sleep(0.05)


def _checkpoint_problem(path: Path) -> str | None:
    time.sleep(0.2)  # the process is gone; nothing writes the file any more
    if not path.exists():
        return None  # killed before its first checkpoint: it starts afresh
    try:
        load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - any failure to read it is the finding
        return f"{type(err).__name__}: {err}"
    return None


def check_run(out: Path, protocol: str, faults: list[Fault]) -> dict:
    """The invariants of one finished run, from its files: {"violations": [...], "degraded":
    n, "alone": [...]}. A site a fault hit may end without the federation (down while the
    others finished) if it says so (`alone`: result.json's shortfall, exit 3); any other
    site that does is a violation."""
    topology = load_topology(out / "topology.toml")
    sites = topology.names
    faulted = {f.site for f in faults}
    violations: list[str] = []
    alone: list[str] = []
    results, metrics, models = {}, {}, {}
    for site in sites:
        folder = out / site
        log = (folder / "node.log").read_text(errors="replace") if (folder / "node.log").exists() else ""
        if "Traceback" in log:
            violations.append(f"{site}: a traceback in node.log")
        if not (folder / "result.json").exists():
            violations.append(f"{site}: no result.json (did not finish)")
            continue
        results[site] = json.loads((folder / "result.json").read_text())
        metrics[site] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        models[site] = dict(np.load(folder / "final_model.npz"))
        if results[site].get("shortfall") and site in faulted:
            alone.append(site)
        elif results[site].get("shortfall"):
            violations.append(f"{site} ended without the federation: {results[site]['shortfall']}")
        errors = results[site].get("dropped", {}).get("protocol-error", 0)
        if errors:
            violations.append(f"{site}: {errors} protocol-error(s)")
    if len(results) < len(sites):
        return {"violations": violations, "degraded": 0, "alone": alone}
    if protocol == "cwt":
        violations += _check_ring(topology, metrics, models, faults)
        return {"violations": violations, "degraded": 0, "alone": alone}
    return {**_check_gossip(sites, metrics, models, results, SAME_MODEL_TOLERANCE[protocol], violations),
            "alone": alone}


def _check_ring(topology, metrics: dict, models: dict, faults: list[Fault]) -> list[str]:
    from p2p_fl.site import make_protocol

    schedule = make_protocol(topology, topology.names[0], None).schedule
    violations = []
    trained: dict[int, list[str]] = {}
    for site, records in metrics.items():
        for record in records:
            if "train_loss" in record:
                trained.setdefault(record["round"], []).append(site)
    for hop, who in sorted(trained.items()):
        strangers = sorted(set(who) - {schedule[hop]}) if hop < len(schedule) else who
        if strangers:
            violations.append(f"hop {hop} trained by {', '.join(strangers)}, not by {schedule[hop]} alone")
    # A hop of a site that was down (killed, frozen, starved past the peer timeout) is
    # skipped by design; a live site's hop never is.
    faulted = {f.site for f in faults}
    skipped_live = [hop for hop in range(len(schedule)) if hop not in trained and schedule[hop] not in faulted]
    twice = sum(len(who) - 1 for who in trained.values())
    if skipped_live:
        violations.append(f"hops {skipped_live} never trained, though no fault hit their sites: the ring "
                          "skipped a live site")
    if twice > len(faults):
        violations.append(f"{twice} hops trained twice: more than one per fault ({len(faults)})")
    first = next(iter(models))
    for site, model in models.items():
        if model.keys() != models[first].keys() or any(not np.array_equal(model[k], models[first][k]) for k in model):
            violations.append(f"{site}'s final model differs from {first}'s: the ring forked")
    return violations


def _check_gossip(sites: list[str], metrics: dict, models: dict, results: dict, tolerance: float,
                  violations: list[str]) -> dict:
    last = {site: next((r for r in reversed(metrics[site]) if "mixed_round" in r), None) for site in sites}
    # With chunked sums a site's model also takes in the others' mixes of their slices: one
    # that missed a mix, or took a slice from a backup's mix, may hold another model.
    full = [s for s in sites if last[s] and not last[s].get("kept_own") and last[s]["survivors"] == len(sites) - 1
            and not last[s].get("chunks_missing") and not last[s].get("chunks_stood_in")]
    for site in full[1:]:
        difference = max(float(np.max(np.abs(models[site][k] - models[full[0]][k]))) for k in models[site])
        if difference > tolerance:
            violations.append(f"{site} and {full[0]} mixed every model of the last round but differ by "
                              f"{difference:.3g} (> {tolerance:g})")
    for site in sites:  # a last mix no other model reached is a site that ended alone: said so?
        if (last[site] is None or last[site]["survivors"] == 0) and not results[site].get("shortfall"):
            violations.append(f"{site}: no neighbour's model reached its last mix, yet it ended as if it "
                              "had taken part (no shortfall)")
    # A sum that failed with neighbours alive (kept_own): a degraded last round, not an end alone.
    degraded = sum(1 for s in sites if last[s] and last[s].get("kept_own") and last[s]["survivors"] > 0)
    return {"violations": violations, "degraded": degraded}


def small_data(folder: Path) -> Path:
    """The first 1,600 training images of the embedded data (400 a site), as one .npz."""
    from p2p_fl.data import Dataset, Split, load_dataset, save_npz

    full = load_dataset("builtin:pneumoniamnist")
    take = lambda split, n: Split(split.images[:n], split.labels[:n])  # noqa: E731
    return save_npz(Dataset(take(full.train, 1600), take(full.val, 400), take(full.test, 400), 2, "chaos"),
                    folder / "chaos-data.npz")


def run_chaos(protocols: list[str], trials: int, kinds: tuple[str, ...], seed: int, folder: Path,
              report=print) -> list[dict]:
    """Runs `trials` trials per protocol; writes folder/chaos.jsonl (a line per trial) and
    returns the records."""
    folder.mkdir(parents=True, exist_ok=True)
    data = small_data(folder)
    rng = random.Random(seed)
    records = []
    with open(folder / "chaos.jsonl", "a") as lines:
        for number in range(trials):
            for protocol in protocols:
                faults = plan_faults(rng, kinds, [f"s{i}" for i in range(SITES)], peer_timeout_s=2.0)
                record = run_trial(protocol, number, data, folder, faults)
                records.append(record)
                lines.write(json.dumps(record) + "\n")
                lines.flush()
                verdict = "pass" if not record["violations"] else "FAIL: " + "; ".join(record["violations"])
                faults_text = ", ".join(f"{f['kind']} {f['site']}@{f['at_s']:g}s" for f in record["faults"]) or "none"
                report(f"{protocol} #{number}: {faults_text} -> {verdict} ({record['wall_s']:.0f} s)")
    return records


def _together(faults: list[dict]) -> int:
    """How many pairs of the trial's faults started at the same moment."""
    return sum(a["at_s"] == b["at_s"] for a, b in zip(faults, faults[1:]))


def summary_rows(records: list[dict]) -> list[dict]:
    """One row per protocol: trials, faults by kind, violations, degraded last mixes, median wall."""
    rows = []
    for protocol in dict.fromkeys(r["protocol"] for r in records):
        mine = [r for r in records if r["protocol"] == protocol]
        kinds = [f["kind"] for r in mine for f in r["faults"]]
        rows.append({"protocol": protocol, "trials": len(mine),
                     **{kind: kinds.count(kind) for kind in FAULTS},
                     "two at once": sum(_together(r["faults"]) for r in mine),
                     "violating trials": sum(bool(r["violations"]) for r in mine),
                     "sites ended alone (said so)": sum(len(r.get("alone", ())) for r in mine),
                     "degraded last mixes": sum(r["degraded"] for r in mine),
                     "median wall s": round(statistics.median(r["wall_s"] for r in mine), 1)})
    return rows
