"""`p2p-fl experiment SWEEP`: a sweep of federations run one after another, and its tables.

A sweep file (TOML) names the federations to compare and crosses each with peer counts,
partitions and seeds; an optional centralized reference is trained once per seed:

    seeds = [0, 1, 2]                # every run below, once per seed
    peers = [3]                      # defaults for every [[federations]] entry
    partitions = ["iid", "dirichlet:0.5"]
    topology = "../../topologies/ring-3.toml"   # default base topology (paths: from this file)
    dataset = "builtin:pneumoniamnist"          # optional, for every run
    train_images = 300               # optional, for every run: a small-data study (data.train_images)
    set = { "training.min_local_steps" = 0 }    # optional, for every federation (before its own set)

    [centralized]                    # optional: the reference, model and optimiser from topology
    topology = "../../topologies/ring-3.toml"
    epochs = 5                       # or a list, [5, 40]: after the first, centralized-40ep
    set = { "training.logit_adjustment" = false }  # optional, the reference's own (not the sweep's set)

    [[federations]]
    label = "CWT"                    # names the rows and the run folders
    topology = "../../topologies/ring-3.toml"   # or `protocol = "cwt"` on the default base
    rounds = 5
    local_epochs = 1
    peers = [3, 10]                  # overrides the default lists (seeds, peers, partitions)
    set = { "gossip.secure" = false }           # any other topology field, dotted

Each federation runs through `launch` (one process per site, or with `--engine inproc` all
sites in one child process of its own per run) into OUT/<label>-<peers>-
<partition>-seed<S>/, the centralized reference into OUT/centralized-seed<S>/. A run whose
summary.json exists is skipped, so rerunning the command resumes an interrupted sweep. After
every run OUT/runs.csv (one row per run), OUT/results.csv and OUT/results.md (one row per
configuration: mean and spread over seeds) are rewritten.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from rich.console import Console

from p2p_fl.config import PROTOCOLS, ConfigError, Topology, dump_topology, load_topology, parse_topology, read_toml
from p2p_fl.data import parse_partition
from p2p_fl.launch import INCOMPLETE_EXIT, run_launch, sigterm_as_interrupt, with_overrides

_TOP_FIELDS = {"seeds", "peers", "partitions", "topology", "dataset", "train_images", "rounds", "local_epochs",
               "set", "centralized", "federations"}
_FEDERATION_FIELDS = {"label", "topology", "protocol", "seeds", "peers", "partitions", "rounds", "local_epochs", "set"}
_CENTRALIZED_FIELDS = {"topology", "epochs", "set"}
# Figures averaged over seeds, in the tables' order: (column, key in a run's row).
METRICS = (("test loss", "test_loss"), ("accuracy", "test_acc"), ("AUC", "test_auc"),
           ("worst site AUC", "worst_site_auc"), ("worst site AUC, worst seed", "worst_site_auc_min"),
           ("AUC swing, last 3 rounds, worst", "test_auc_swing_max"),
           ("rounds", "rounds"), ("epochs/site", "epochs_per_site"), ("wall s", "wall_s"),
           ("time reduction", "time_reduction"), ("site test loss", "local_test_loss"),
           ("site test acc", "local_test_acc"), ("site test AUC", "local_test_auc"),
           ("site test AUC, fine-tuned", "personalized_test_auc"))


class SweepError(ConfigError):
    """A sweep file that cannot run; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the sweep: a federation (topology set) or the centralized reference."""

    name: str  # its folder under OUT
    label: str
    peers: int  # 1 for centralized
    partition: str
    seed: int
    topology: Topology
    epochs: int | None = None  # centralized only

    @property
    def centralized(self) -> bool:
        return self.epochs is not None


def load_sweep(path: str | Path) -> list[Run]:
    """Reads a sweep file and expands it into runs (centralized first); SweepError names the field."""
    path = Path(path)
    return parse_sweep(read_toml(path, "sweep", SweepError), path)


def parse_sweep(raw: dict, path: Path) -> list[Run]:
    def fail(message: str):
        raise SweepError(f"{path}: {message}")

    _known(raw, _TOP_FIELDS, "", fail)
    seeds = _int_list(raw, "seeds", "seeds", fail, default=[0])
    default_peers = _int_list(raw, "peers", "peers", fail, default=None)
    default_partitions = _str_list(raw, "partitions", "partitions", fail, default=["iid"])
    dataset = _get(raw, "dataset", str, "dataset", fail)
    train_images = _get(raw, "train_images", int, "train_images", fail)
    if train_images is not None and train_images < 1:
        fail(f"train_images must be >= 1, got {train_images}")

    def with_data(topology: Topology) -> Topology:  # the sweep's dataset and training images, every run alike
        if dataset:
            topology = with_overrides(topology, dataset=dataset)
        if train_images:
            topology = dataclasses.replace(topology, data=dataclasses.replace(topology.data, train_images=train_images))
        return topology
    default_base = _get(raw, "topology", str, "topology", fail)
    default_training = {k: _get(raw, k, int, k, fail) for k in ("rounds", "local_epochs")}
    default_set = raw.get("set", {})
    if not isinstance(default_set, dict):
        fail("set must be a table of dotted topology fields, like { \"training.min_local_steps\" = 0 }")
    runs: list[Run] = []

    central = raw.get("centralized")
    if central is not None:
        if not isinstance(central, dict):
            fail("[centralized] must be a table")
        _known(central, _CENTRALIZED_FIELDS, "centralized.", fail)
        base = _get(central, "topology", str, "centralized.topology", fail) or default_base
        if base is None:
            fail("centralized.topology is missing (and there is no top-level topology)")
        topology = _load_base(path, base, "centralized.topology", fail)
        central_set = central.get("set", {})  # its own only: the sweep's `set` is the federations'
        if not isinstance(central_set, dict):
            fail("centralized.set must be a table of dotted topology fields, like { \"training.batch_size\" = 32 }")
        if central_set:
            raw_topology = tomllib.loads(dump_topology(topology))
            for key, value in central_set.items():
                _set_dotted(raw_topology, key, value, "centralized.set", fail)
            topology = parse_topology(raw_topology, source=f"{path}: centralized")
        if isinstance(central.get("epochs"), list):  # more references: centralized-<E>ep after the first
            epochs_list = _int_list(central, "epochs", "centralized.epochs", fail, default=None)
        else:
            epochs = _get(central, "epochs", int, "centralized.epochs", fail)
            epochs_list = [epochs or topology.training.rounds * topology.training.local_epochs]
        if any(e < 1 for e in epochs_list):
            fail(f"centralized.epochs must be >= 1, got {epochs_list}")
        topology = with_data(topology)
        for i, epochs in enumerate(epochs_list):
            label = "centralized" if i == 0 else f"centralized-{epochs}ep"
            for seed in seeds:
                runs.append(Run(f"{label}-seed{seed}", label, 1, "pooled", seed,
                                dataclasses.replace(topology, seed=seed), epochs))

    federations = raw.get("federations", [])
    if not isinstance(federations, list) or not all(isinstance(f, dict) for f in federations):
        fail("federations must be a list of tables ([[federations]])")
    if not federations and central is None:
        fail("nothing to run: add [[federations]] entries or a [centralized] table")
    for i, fed in enumerate(federations):
        where = f"federations[{i}]"
        _known(fed, _FEDERATION_FIELDS, where + ".", fail)
        label = _get(fed, "label", str, f"{where}.label", fail)
        if not label:
            fail(f"{where}.label is missing")
        if not label.replace("-", "").replace("_", "").isalnum():
            fail(f"{where}.label {label!r} must be letters, digits, '-' or '_' (it names folders)")
        if label == "centralized":
            fail(f"{where}.label 'centralized' names the reference; choose another")
        base = _get(fed, "topology", str, f"{where}.topology", fail) or default_base
        if base is None:
            fail(f"{where}.topology is missing (and there is no top-level topology)")
        raw_topology = tomllib.loads(dump_topology(_load_base(path, base, f"{where}.topology", fail)))
        protocol = _get(fed, "protocol", str, f"{where}.protocol", fail)
        if protocol is not None:
            if protocol not in PROTOCOLS:
                fail(f"{where}.protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
            raw_topology["protocol"] = protocol
        overrides = fed.get("set", {})
        if not isinstance(overrides, dict):
            fail(f"{where}.set must be a table of dotted topology fields, like {{ \"gossip.secure\" = false }}")
        for key, value in default_set.items():  # the sweep's, then the entry's own
            _set_dotted(raw_topology, key, value, "set", fail)
        for key, value in overrides.items():
            _set_dotted(raw_topology, key, value, f"{where}.set", fail)
        training = {k: _get(fed, k, int, f"{where}.{k}", fail) for k in ("rounds", "local_epochs")}
        for key, value in training.items():  # before checking: a protocol and its rounds change together
            value = value if value is not None else default_training[key]
            if value is not None:
                raw_topology["training"][key] = value
        topology = parse_topology(raw_topology, source=f"{path}: {where}")
        peers_list = _int_list(fed, "peers", f"{where}.peers", fail, default=default_peers) or [len(topology.peers)]
        partitions = _str_list(fed, "partitions", f"{where}.partitions", fail, default=default_partitions)
        fed_seeds = _int_list(fed, "seeds", f"{where}.seeds", fail, default=seeds)
        for j, partition in enumerate(partitions):
            try:
                parse_partition(partition)
            except ValueError as err:
                fail(f"{where}.partitions[{j}]: {err}")
        for peers in peers_list:
            for partition in partitions:
                for seed in fed_seeds:
                    try:
                        t = with_data(with_overrides(topology, peers=peers, partition=partition, seed=seed))
                    except ValueError as err:
                        fail(f"{where}: {err}")
                    t = parse_topology(tomllib.loads(dump_topology(t)), source=f"{path}: {where} with {peers} peers")
                    name = f"{label}-{peers}-{partition.replace(':', '')}-seed{seed}"
                    if any(r.name == name for r in runs):  # one label may span entries, not repeat a run
                        fail(f"{where}: run {name} is already in an earlier entry with label {label!r}")
                    runs.append(Run(name, label, peers, partition, seed, t))
    return runs


def _load_base(sweep: Path, relative: str, field: str, fail) -> Topology:
    """A topology file named in the sweep, relative to the sweep file's folder."""
    path = (sweep.parent / relative) if not Path(relative).is_absolute() else Path(relative)
    if not path.exists():
        fail(f"{field}: no such topology file {path}")
    from p2p_fl.learn.catalog import model_names  # checked here so a typo fails before hours of runs

    topology = load_topology(path)
    models = model_names()
    if topology.training.model not in models:
        fail(f"{field}: training.model {topology.training.model!r} is not one of {', '.join(models)}")
    return topology


def _set_dotted(raw: dict, key: str, value, where: str, fail) -> None:
    section, _, field = key.partition(".")
    if not field:
        if key in ("peers", "seed"):
            fail(f"{where}.{key}: set peers and seeds with the sweep's lists, not here")
        raw[key] = value
        return
    if "." in field or section not in raw or not isinstance(raw[section], dict):
        fail(f"{where}: {key!r} is not a topology field like \"training.model\"")
    raw[section][field] = value


def _known(table: dict, known: set, prefix: str, fail) -> None:
    for key in table:
        if key not in known:
            fail(f"unknown field {prefix}{key} (known: {', '.join(sorted(known))})")


def _get(table: dict, key: str, kind: type, field: str, fail):
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        fail(f"{field} must be {kind.__name__}, got {value!r}")
    return value


def _int_list(table, key, field, fail, *, default):
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        fail(f"{field} must be a non-empty list of integers, got {value!r}")
    return value


def _str_list(table, key, field, fail, *, default):
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        fail(f"{field} must be a non-empty list of strings, got {value!r}")
    return value


# Running.

def select(runs: list[Run], patterns: list[str] | None) -> list[Run]:
    """The runs whose names match any of the glob patterns (all without patterns)."""
    if not patterns:
        return runs
    return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]


def run_sweep(runs: list[Run], out: Path, *, only: list[str] | None = None,
              console: Console | None = None, engine: str = "process") -> list[str]:
    """Runs every run (of those matching `only`) not done yet, rewriting the tables after each.

    `engine`: how each federation runs (`launch --engine`): "process" or "inproc".

    The tables cover every run of the sweep that has a summary. Returns the names of the
    selected runs that failed.
    """
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    # Stopped with SIGTERM, the runner unwinds as for Ctrl-C: subprocess.run kills the run's
    # child process instead of leaving it to train on as an orphan.
    with sigterm_as_interrupt():
        return _run_selected(runs, select(runs, only), out, console, engine)


def _run_selected(runs: list[Run], chosen: list[Run], out: Path, console: Console, engine: str) -> list[str]:
    failed = []
    for i, run in enumerate(chosen, 1):
        run_dir = out / run.name
        done = (run_dir / "summary.json").exists()
        head = f"[{i}/{len(chosen)}] {run.name}"
        if done:
            console.print(f"{head}: done before, skipped")
            continue
        if run_dir.exists():  # an interrupted run: start it clean, not on top of stale metrics
            shutil.rmtree(run_dir)
        console.rule(head)
        started = time.monotonic()
        ok = (_run_centralized(run, run_dir, console) if run.centralized
              else _run_federation(run, run_dir, console, engine))
        took = time.monotonic() - started
        if ok:
            summary = json.loads((run_dir / "summary.json").read_text())
            console.print(f"{head}: done in {took:.0f} s, test AUC {_fmt(summary['final'].get('test_auc'), 4)}")
        else:
            failed.append(run.name)
            console.print(f"[red]{head}: failed after {took:.0f} s; see {run_dir}[/]")
        write_tables(runs, out)
    write_tables(runs, out)
    console.print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'runs.csv'}")
    if failed:
        console.print(f"[red]{len(failed)} runs failed: {', '.join(failed)}; rerun the command to retry them[/]")
    return failed


def _run_federation(run: Run, run_dir: Path, console: Console, engine: str) -> bool:
    if engine == "inproc":
        return _run_inproc(run, run_dir)
    try:
        run_launch(run.topology, run_dir, console=console, engine=engine)
        return True
    except RuntimeError:
        # collect_summary wrote what the surviving nodes reported; keep it aside so a
        # rerun retries this run instead of counting it as done.
        if (run_dir / "summary.json").exists():
            (run_dir / "summary.json").rename(run_dir / "summary.failed.json")
        return False


def _run_inproc(run: Run, run_dir: Path) -> bool:
    """`launch --engine inproc` in a child process of its own: each run starts with a fresh
    JAX runtime (an epsilon sweep with every run in one process ran out of memory in its
    14th run, most likely from what each run's compiled programs and sites left behind), and
    a run that crashes costs only itself."""
    run_dir.mkdir(parents=True)
    config = run_dir / "sweep-run.toml"
    config.write_text(dump_topology(run.topology))
    proc = subprocess.run([sys.executable, "-m", "p2p_fl", "launch", str(config), "--engine", "inproc",
                           "--out", str(run_dir)])
    summary_path = run_dir / "summary.json"
    if proc.returncode not in (0, INCOMPLETE_EXIT) or not summary_path.exists():
        if summary_path.exists():
            summary_path.rename(run_dir / "summary.failed.json")
        return False
    return True


def _run_centralized(run: Run, run_dir: Path, console: Console) -> bool:
    """The reference in its own process, like a node, timed end to end as launch times nodes."""
    run_dir.mkdir(parents=True)
    (run_dir / "topology.toml").write_text(dump_topology(run.topology))
    cmd = [sys.executable, "-m", "p2p_fl", "centralized", "--config", str(run_dir / "topology.toml"),
           "--epochs", str(run.epochs), "--seed", str(run.seed), "--out", str(run_dir)]
    started = time.monotonic()
    with (run_dir / "centralized.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    process_wall_s = time.monotonic() - started
    summary_path = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        if summary_path.exists():
            summary_path.rename(run_dir / "summary.failed.json")
        return False
    summary = json.loads(summary_path.read_text())
    summary["process_wall_s"] = process_wall_s
    summary_path.write_text(json.dumps(summary, indent=2))
    return True


# Tables.

def run_row(run: Run, summary: dict) -> dict:
    """One run's figures, flat (a row of runs.csv)."""
    final = summary.get("final", {})
    nodes = summary.get("nodes", [])
    local = {k: _mean([n.get(k) for n in nodes]) for k in ("local_test_loss", "local_test_acc", "local_test_auc",
                                                            "personalized_test_auc")}
    if run.centralized:
        rounds, epochs_per_site = summary.get("epochs"), summary.get("epochs")
        wall = summary.get("process_wall_s", summary.get("wall_s"))
    else:
        rounds = summary.get("rounds")
        # Sites below training.min_local_steps train more epochs a round than local_epochs.
        per_round = _mean([n.get("epochs_per_round") for n in nodes]) or summary.get("local_epochs") or 0
        epochs_per_site = (summary.get("rounds") or 0) * per_round
        wall = summary.get("wall_s")
    return {"run": run.name, "label": run.label, "protocol": summary.get("protocol"), "peers": run.peers,
            "partition": run.partition, "seed": run.seed, "test_loss": final.get("test_loss"),
            "test_acc": final.get("test_acc"), "test_auc": final.get("test_auc"),
            # Gossip and local runs end with a model per site: the least good one (centralized
            # and the ring: the one model).
            "worst_site_auc": min((n["test_auc"] for n in nodes if n.get("test_auc") is not None),
                                  default=final.get("test_auc")), "rounds": rounds,
            "epochs_per_site": epochs_per_site, "wall_s": wall,
            # The largest move of a site's common-test AUC between consecutive rounds, last three.
            "test_auc_swing": max((n["test_auc_swing"] for n in nodes if n.get("test_auc_swing") is not None),
                                  default=None),
            "bytes_sent": sum(n.get("bytes_sent", 0) for n in nodes), **local}


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per configuration (label, peers, partition): mean and sample std over seeds.

    Time reduction is 1 - wall / centralized wall, against the mean of the centralized runs
    (so positive means faster than centralized).
    """
    central_walls = [r["wall_s"] for r in rows if r["label"] == "centralized" and r["wall_s"]]
    central_wall = statistics.mean(central_walls) if central_walls else None
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        r = dict(r, time_reduction=1 - r["wall_s"] / central_wall if central_wall and r["wall_s"] else None)
        groups.setdefault((r["label"], r["peers"], r["partition"]), []).append(r)
    table = []
    for (label, peers, partition), members in groups.items():
        row = {"label": label, "protocol": members[0]["protocol"], "peers": peers, "partition": partition,
               "seeds": ",".join(str(m["seed"]) for m in members), "n": len(members)}
        for _, key in METRICS:
            if key == "worst_site_auc_min":  # the issue's bar: over sites and seeds, the least good
                values = [m["worst_site_auc"] for m in members if m.get("worst_site_auc") is not None]
                row[key] = min(values) if values else None
                continue
            if key == "test_auc_swing_max":  # the largest over sites and seeds
                values = [m["test_auc_swing"] for m in members if m.get("test_auc_swing") is not None]
                row[key] = max(values) if values else None
                continue
            values = [m[key] for m in members if m.get(key) is not None]
            row[key] = statistics.mean(values) if values else None
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        table.append(row)
    return table


def write_tables(runs: list[Run], out: Path) -> list[dict]:
    """Rewrites runs.csv, results.csv and results.md from the summaries present; returns the per-run rows."""
    rows = []
    for run in runs:
        path = out / run.name / "summary.json"
        if path.exists():
            rows.append(run_row(run, json.loads(path.read_text())))
    if not rows:
        return rows
    _write_csv(out / "runs.csv", rows)
    table = aggregate(rows)
    _write_csv(out / "results.csv", table)
    (out / "results.md").write_text(markdown_table(table, len(rows), len(runs)))
    return rows


def markdown_table(table: list[dict], done: int, total: int) -> str:
    lines = [f"Runs finished: {done} of {total}. Each cell: mean ± sample standard deviation over the seeds.",
             "Time reduction: 1 - wall time / centralized wall time (positive: faster than centralized).",
             "Site test: each site's own test shard, averaged over sites.", "",
             "| configuration | protocol | sites | partition | seeds | " + " | ".join(c for c, _ in METRICS) + " |",
             "| --- " * (5 + len(METRICS)) + "|"]
    for row in table:
        cells = [_cell(row, key) for _, key in METRICS]
        lines.append(f"| {row['label']} | {row['protocol']} | {row['peers']} | {row['partition']} | "
                     f"{row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict, key: str) -> str:
    digits = {"wall_s": 0, "rounds": 0, "epochs_per_site": 0, "time_reduction": 2}.get(key, 3)
    value, spread = row.get(key), row.get(key + "_std")
    if value is None:
        return "-"
    return _fmt(value, digits) + ("" if spread is None else f" ± {_fmt(spread, digits)}")


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
