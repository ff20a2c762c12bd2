"""The `p2p-fl` command: node, launch, keygen, centralized.

Only this module reads flags. Errors a user can fix print one line and exit 2; a stack
trace means a bug.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

import tomllib

import zmq

from p2p_fl.config import (ConfigError, PeerConfig, Topology, data_options, dump_topology, load_topology,
                            parse_topology)
from p2p_fl.checkpoint import CheckpointError, CheckpointWriteError
from p2p_fl.data import DataError
from p2p_fl.net import KeyFileError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Every file p2p-fl writes is its user's alone: checkpoints and final models (a site's
    # own, unmasked model), metrics, data shards, logs. (keygen's public key is 0644 on purpose.)
    os.umask(0o077)
    try:
        return args.func(args)
    except (ConfigError, DataError, KeyFileError, CheckpointError) as err:
        print(f"p2p-fl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("p2p-fl: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    from p2p_fl import __version__

    parser = argparse.ArgumentParser(prog="p2p-fl", description="Serverless peer-to-peer federated learning.")
    parser.add_argument("--version", action="version", version=f"p2p-fl {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    node = sub.add_parser("node", help="run one institution's node")
    node.add_argument("--config", required=True, type=Path, help="topology file (TOML)")
    node.add_argument("--name", required=True, help="this node's name in the topology")
    node.add_argument("--data", help="this site's data: a MedMNIST-style .npz or an image folder "
                      "(default: this site's shard of the topology's dataset)")
    node.add_argument("--key", type=Path, help="this node's secret key file from `p2p-fl keygen` "
                      "(default: keys/<name>.key_secret)")
    node.add_argument("--out", type=Path, help="output folder (default: runs/<name>)")
    node.add_argument("--events", action="store_true", help="print progress as JSON lines on stdout (for launch)")
    node.add_argument("--overwrite", action="store_true", help="replace the finished run in --out (it is refused "
                      "otherwise: a site takes part in a run once)")
    node.set_defaults(func=cmd_node)

    launch = sub.add_parser("launch", help="run a whole federation on this machine, one process per site")
    launch.add_argument("topology", type=Path, help="topology file, e.g. topologies/ring-3.toml")
    launch.add_argument("--out", type=Path, help="output folder (default: runs/<federation>-<time>)")
    launch.add_argument("--data", help="dataset to partition: builtin:pneumoniamnist, an .npz or an image folder")
    launch.add_argument("--peers", type=int, help="number of sites (renames them site-1..N)")
    launch.add_argument("--rounds", type=int, help="cycles (cwt) or rounds")
    launch.add_argument("--local-epochs", type=int, help="epochs per visit/round at each site")
    launch.add_argument("--partition", help="iid | dirichlet:ALPHA | quantity:ALPHA")
    launch.add_argument("--seed", type=int, help="seed for partition, ring order and model init")
    launch.add_argument("--netns", action="store_true",
                        help="run each node in its own network namespace at 10.77.0.N (needs root)")
    launch.add_argument("--restart-delay", type=float, default=2.0, metavar="S",
                        help="restart a node process that dies after S seconds (default: 2)")
    launch.add_argument("--max-restarts", type=int, default=5, metavar="N",
                        help="restarts per node before launch reports it failed (default: 5)")
    launch.add_argument("--no-restart", action="store_true", help="do not restart node processes that die")
    launch.add_argument("--overwrite", action="store_true", help="replace the finished run in --out (refused otherwise)")
    launch.add_argument("--engine", choices=("process", "inproc"), default="process",
                        help="process: one node process per site over CurveZMQ (default); inproc: every site in "
                             "this process, sites training together, virtual time (for studies)")
    launch.add_argument("--processes", type=int, metavar="P",
                        help="process engine: spread the sites over P processes, each hosting its group of "
                             "sites (own ports and keys, one JAX runtime); default: one process per site")
    launch.add_argument("--hosts", metavar="H1,H2,...",
                        help="sites on other machines: one process per host listed (a host may repeat), the sites "
                             "spread over them; writes --out and the command for each host, starts nothing")
    launch.add_argument("--kill", action="append", default=[], metavar="SITE:ROUND[:PHASE][:BACK]",
                        help="inproc only, repeatable: kill SITE at ROUND (hop for rings) as it starts training "
                             "(PHASE train) or after its masked reply to a sum (sum); restart it from its "
                             "checkpoint BACK rounds later")
    launch.set_defaults(func=cmd_launch)

    group = sub.add_parser("group", help="run several sites of a launch folder in one process (what "
                           "`launch --processes` starts)")
    group.add_argument("launch_dir", type=Path, help="the launch's --out: topology.toml, shards/, keys/")
    hosted = group.add_mutually_exclusive_group(required=True)
    hosted.add_argument("--name", action="append", help="a site to host (repeatable)")
    hosted.add_argument("--group", type=int, metavar="G", help="the sites of process G in OUT/groups.json "
                        "(`launch --hosts`); the last group to finish writes OUT/summary.json")
    group.add_argument("--events", action="store_true", help="print progress as JSON lines on stdout, each "
                       "naming its site (for launch)")
    group.set_defaults(func=cmd_group)

    check = sub.add_parser("check", help="preflight at one site: topology, key, data, model, port, and a "
                           "CURVE handshake with every peer (no training)")
    check.add_argument("--config", required=True, type=Path, help="topology file (TOML)")
    check.add_argument("--name", required=True, help="this site's name in the topology")
    check.add_argument("--data", help="this site's data, as for `node` (default: the topology's demo shard)")
    check.add_argument("--key", type=Path, help="this site's secret key file (default: keys/<name>.key_secret)")
    check.add_argument("--wait", type=float, default=30.0, metavar="S",
                       help="how long to wait for the peers to answer (default: 30)")
    check.set_defaults(func=cmd_check)

    predict = sub.add_parser("predict", help="a finished site's model on new images: a CSV of probabilities and "
                             "the decision at the site's threshold")
    predict.add_argument("run", type=Path, help="the site's --out folder (result.json, final_model.npz)")
    predict.add_argument("images", type=Path, nargs="+", help="image files or folders (PNG, JPEG, DICOM)")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV file (default: predictions.csv)")
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser("export", help="a finished site's model as safetensors weights and a jax.export "
                            "inference function, for tools without p2p_fl")
    export.add_argument("run", type=Path, help="the site's --out folder (result.json, final_model.npz)")
    export.add_argument("--out", type=Path, help="folder for model.safetensors, model.jaxexport, model.json "
                        "(default: RUN/export)")
    export.set_defaults(func=cmd_export)

    status = sub.add_parser("status", help="what a site's node is doing: state, round, trainings, each peer as "
                            "its heartbeats show it (read from OUT, no network)")
    status.add_argument("out", type=Path, help="the node's --out folder")
    status.set_defaults(func=cmd_status)

    keygen = sub.add_parser("keygen", help="create this institution's CURVE key pair")
    keygen.add_argument("--name", required=True, help="the institution's peer name")
    keygen.add_argument("--out", type=Path, default=Path("keys"), help="folder for the key files (default: keys/)")
    keygen.set_defaults(func=cmd_keygen)

    central = sub.add_parser("centralized", help="train the same model on pooled data (the reference)")
    central.add_argument("--config", type=Path, default=None,
                         help="take model, training settings and dataset from this topology (default: the defaults)")
    central.add_argument("--data", help="dataset (default: the topology's)")
    central.add_argument("--epochs", type=int, help="epochs (default: rounds x local_epochs of the topology)")
    central.add_argument("--seed", type=int, help="seed (default: the topology's)")
    central.add_argument("--out", type=Path, help="output folder (default: runs/centralized-<time>)")
    central.set_defaults(func=cmd_centralized)

    experiment = sub.add_parser("experiment", help="run a sweep of federations and write its results tables")
    experiment.add_argument("sweep", type=Path, help="sweep file (TOML), e.g. launch/experiments/study.toml")
    experiment.add_argument("--out", type=Path, help="output folder (default: runs/<sweep name>); "
                            "rerunning into it resumes, skipping finished runs")
    experiment.add_argument("--list", action="store_true", help="list the runs and exit")
    experiment.add_argument("--only", action="append", metavar="GLOB",
                            help="run only the runs whose names match (repeatable), e.g. '*-seed0'")
    experiment.add_argument("--engine", choices=("process", "inproc"), default="process",
                            help="how each federation runs, as `launch --engine` (default: process)")
    experiment.set_defaults(func=cmd_experiment)

    report = sub.add_parser("report", help="write DIR/report.html with plots, for a run, an experiment or one "
                            "site's folder")
    report.add_argument("folder", type=Path, help="a `launch` or `experiment` output folder, or a node's --out")
    report.add_argument("--centralized", type=Path, help="a `p2p-fl centralized` output folder for the reference ROC "
                        "(default: ../centralized-seed<S> beside the run, as `experiment` makes)")
    report.set_defaults(func=cmd_report)

    from p2p_fl.chaos import FAULTS, PROTOCOLS

    chaos = sub.add_parser("chaos", help="run federations under seeded random faults and check every run's invariants")
    chaos.add_argument("--protocols", default=",".join(PROTOCOLS),
                       help=f"comma-separated, of {', '.join(PROTOCOLS)} (default: all)")
    chaos.add_argument("--trials", type=int, default=10, help="trials per protocol (default: 10)")
    chaos.add_argument("--faults", default=",".join(FAULTS),
                       help=f"comma-separated fault kinds to draw from, of {', '.join(FAULTS)} (default: all)")
    chaos.add_argument("--seed", type=int, default=0, help="seed of the fault plans (default: 0)")
    chaos.add_argument("--out", type=Path, help="folder for the runs and chaos.jsonl (default: runs/chaos-<time>)")
    chaos.set_defaults(func=cmd_chaos)

    from p2p_fl.bench import FAMILIES

    bench = sub.add_parser("bench", help="run the benchmarks: one JSON line per figure, each with its reference")
    bench.add_argument("--quick", action="store_true", help="a short version of each benchmark")
    bench.add_argument("--only", action="append", choices=FAMILIES, metavar="FAMILY",
                       help=f"run only this family (repeatable): {', '.join(FAMILIES)}")
    bench.set_defaults(func=cmd_bench)
    return parser


def _setup_runtime() -> None:
    """Thread limits (set by launch for local peers) and the persistent compilation cache,
    before JAX starts: a node started again, or beside others, compiles its model once."""
    from p2p_fl.launch import XLA_CACHE_DIR
    from p2p_fl.learn.runtime import configure_jax

    threads = os.environ.get("P2P_FL_THREADS")
    configure_jax(threads=int(threads) if threads else None,
                  cache_dir=os.environ.get("P2P_FL_XLA_CACHE", str(XLA_CACHE_DIR)))


def _check_model(topology: Topology, source: Path) -> None:
    from p2p_fl.learn.catalog import model_has_batchnorm, model_names

    model, models = topology.training.model, model_names()
    if model not in models:
        raise ConfigError(f"{source}: training.model {model!r} is not one of {', '.join(models)} (a model of "
                          "your own: install its package at every site, docs/deploying.md)")
    if topology.training.fedbn and not model_has_batchnorm(model):
        raise ConfigError(f"{source}: training.fedbn needs a model with BatchNorm; {model} has none")


def _site_inputs(args, topology: Topology):
    """A site's data, keys and shared test set, as `node` and `check` read them (logged)."""
    from p2p_fl.data import load_dataset, load_test_like, partition_dataset
    from p2p_fl.site import site_curve

    options = data_options(topology.data)
    if args.data:
        data = load_dataset(args.data, **options)
    else:
        index = topology.names.index(args.name)
        logging.warning("no --data: training on shard %d of %d of %s (%s), as launch would: a site's own images "
                        "need --data", index + 1, len(topology.peers), topology.data.dataset, topology.data.partition)
        shards = partition_dataset(load_dataset(topology.data.dataset, **options), len(topology.peers),
                                   topology.data.partition, topology.seed)
        data = shards[index]
    logging.info("data %s", data.describe())
    curve = site_curve(topology, args.name, args.key or Path("keys") / f"{args.name}.key_secret", args.config)
    common_test = load_test_like(topology.data.test, data) if topology.data.test else None
    logging.info("test set: %s", f"{topology.data.test}'s test split ({len(common_test)} images) and this site's "
                 f"own ({len(data.test)})" if common_test else f"this site's own test split ({len(data.test)} images)")
    return data, curve, common_test


def _site_topology(args) -> Topology:
    topology = load_topology(args.config)
    _check_model(topology, args.config)
    topology.peer(args.name)  # refuse an unknown name before loading anything
    return topology


def _log_to_stderr(name: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)])


def _listen_error(topology: Topology, name: str, err: zmq.ZMQError) -> str | None:
    """One line for an address this site cannot listen on; None for another ZeroMQ error."""
    if err.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EINVAL, errno.ENODEV):
        return None
    return (f"{name}: cannot listen on {topology.peer(name).address} ({err.strerror}): "
            + ("another program holds that port; stop it or give this site another port in the topology"
               if err.errno == errno.EADDRINUSE else "that address is not one of this machine's; fix "
               f"[[peers]].address of {name} (or listen on tcp://0.0.0.0:PORT)"))


def cmd_node(args) -> int:
    topology = _site_topology(args)  # a bad topology or name is told before JAX's seconds of start-up
    _setup_runtime()
    from p2p_fl.node import run_node

    out = args.out or Path("runs") / args.name
    out.mkdir(parents=True, exist_ok=True)
    _hold_out_folder(out, args.name)
    _log_to_stderr(args.name)
    if args.overwrite and (out / "result.json").exists():
        from p2p_fl.site import clear_finished_run

        logging.warning("--overwrite: deleted the finished run's %s in %s", ", ".join(clear_finished_run(out)), out)
    data, curve, common_test = _site_inputs(args, topology)

    def emit(event: dict) -> None:
        if args.events:
            print(json.dumps(event), flush=True)
        elif event.get("event") in ("trained", "done"):
            logging.info("%s", json.dumps(event))

    return _run_hosted(topology, {args.name: out},
                       lambda: {args.name: run_node(topology, args.name, data, out, curve=curve,
                                                    common_test=common_test, emit=emit)})


def cmd_group(args) -> int:
    """Several sites of a launch folder in this process (`node.run_group`); a site that
    already finished (its result.json) is not run again, as when launch restarts the group."""
    _setup_runtime()
    from p2p_fl.data import load_dataset, load_test_like
    from p2p_fl.launch import GROUPS_FILE
    from p2p_fl.node import Member, run_group
    from p2p_fl.site import site_curve

    config = args.launch_dir / "topology.toml"
    if not config.exists():
        raise ConfigError(f"{args.launch_dir}: no topology.toml; `group` runs sites of a `launch` folder")
    topology = load_topology(config)
    _check_model(topology, config)
    if args.group is not None:
        try:
            groups = json.loads((args.launch_dir / GROUPS_FILE).read_text())["groups"]
        except FileNotFoundError:
            raise ConfigError(f"{args.launch_dir}: no {GROUPS_FILE}; --group needs a folder of `launch --hosts`") from None
        if not 0 <= args.group < len(groups):
            raise ConfigError(f"--group {args.group}: {args.launch_dir} has groups 0 to {len(groups) - 1}")
        args.name = groups[args.group]["sites"]
    for name in args.name:
        topology.peer(name)
    _log_to_stderr("+".join(args.name))
    outs = {name: args.launch_dir / name for name in args.name}
    members = []
    for name in args.name:
        if (outs[name] / "result.json").exists():
            logging.info("%s: finished before (result.json); not run again", name)
            continue
        outs[name].mkdir(parents=True, exist_ok=True)
        _hold_out_folder(outs[name], name)
        data = load_dataset(str(args.launch_dir / "shards" / f"{name}.npz"), **data_options(topology.data))
        logging.info("%s: data %s", name, data.describe())
        members.append(Member(name, data, outs[name],
                              site_curve(topology, name, args.launch_dir / "keys" / f"{name}.key_secret", config)))
    if not members:
        if args.group is not None:
            _summarize(args.launch_dir)
        return 0
    common_test = load_test_like(topology.data.test, members[0].data) if topology.data.test else None

    def emit(name: str, event: dict) -> None:
        if args.events:
            print(json.dumps({**event, "site": name}), flush=True)
        elif event.get("event") in ("trained", "done"):
            logging.info("%s: %s", name, json.dumps(event))

    hosted = {m.name: outs[m.name] for m in members}
    code = _run_hosted(topology, hosted, lambda: run_group(topology, members, common_test=common_test, emit=emit))
    if args.group is not None:
        _summarize(args.launch_dir)
    return code


def _summarize(launch_dir: Path) -> None:
    """A group of `launch --hosts`: the last to finish writes the run's summary.json."""
    from p2p_fl.launch import summarize_if_finished

    if summarize_if_finished(launch_dir) is not None:
        print(f"every site finished: {launch_dir / 'summary.json'}", file=sys.stderr)


def _run_hosted(topology: Topology, outs: dict[str, Path], run) -> int:
    """Runs `run` (-> site -> result or RunTimeout) for the sites in `outs` (site -> --out);
    one line and an exit code for each way a node ends (launch's supervision reads them)."""
    from p2p_fl.driver import SetupMismatch
    from p2p_fl.launch import GAVE_UP_EXIT, INCOMPLETE_EXIT
    from p2p_fl.node import RunTimeout

    names = ", ".join(outs)
    try:
        outcomes = run()
    except RunTimeout as err:
        outcomes = {next(iter(outs)): err}
    except zmq.ZMQError as err:
        site = getattr(err, "site", None)  # set by node._host on a socket it could not open
        line = _listen_error(topology, site, err) if site else None
        if line is None:
            raise
        print(f"p2p-fl: error: {line}", file=sys.stderr)
        return 2
    except SetupMismatch as err:
        print(f"p2p-fl: error: {err}", file=sys.stderr)
        return 2
    except CheckpointWriteError as err:  # nothing that depended on it left; a restart resumes
        print(f"p2p-fl: error: {names}: {err}; nothing that depends on it was sent: free the space "
              "and start the node again (it resumes from its last good checkpoint)", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        # A metrics line or a model file on a full disk (found by p2p-fl chaos): one line;
        # what a restart needs is in the last checkpoint, written atomically before.
        where = ", ".join(str(out) for out in outs.values())
        print(f"p2p-fl: error: {names}: cannot write in {where}: {err.strerror} ({err.filename or 'a file'}); "
              "free the space and start the node again (it resumes from its last checkpoint)", file=sys.stderr)
        return 1
    code = 0
    for name, outcome in outcomes.items():
        if isinstance(outcome, RunTimeout):
            print(f"p2p-fl: error: {outcome}", file=sys.stderr)
            code = GAVE_UP_EXIT
        elif outcome["shortfall"]:
            print(f"p2p-fl: error: {name} ended without the federation: {outcome['shortfall']} "
                  f"(result.json in {outs[name]})", file=sys.stderr)
            code = code or INCOMPLETE_EXIT
    return code


def cmd_check(args) -> int:
    """Preflight: what `node` would refuse, then a CURVE heartbeat exchange with every peer."""
    topology = _site_topology(args)  # a bad topology or name is told before JAX's seconds of start-up
    _setup_runtime()
    from p2p_fl.fingerprint import federation_fingerprint
    from p2p_fl.learn.models import model_code
    from p2p_fl.preflight import check_peers
    from p2p_fl.site import make_learner

    _log_to_stderr(args.name)
    data, curve, _ = _site_inputs(args, topology)
    print(f"config: {args.config}: {topology.federation}, {topology.protocol}, {len(topology.peers)} sites; "
          f"this site: {args.name} at {topology.peer(args.name).address or '(no address)'}")
    print(f"keys: {'CURVE, the secret key matches the public key the topology lists' if curve else 'NONE (insecure)'}")
    print(f"data: {data.describe()}")
    learner = make_learner(topology, data.num_classes, data.image_shape)
    print(f"model: {topology.training.model} for {'x'.join(map(str, data.image_shape))} inputs, "
          f"{data.num_classes} classes: builds")
    if topology.protocol == "local" or len(topology.peers) < 2:
        return 0
    fingerprint = federation_fingerprint(topology, data.image_shape, data.num_classes, learner.weight_spec(),
                                         model_code(topology.training.model))
    print(f"setup fingerprint: {fingerprint.digest}; listening and waiting up to {args.wait:g} s for the peers "
          "(their node or their check)", flush=True)
    try:
        checks = check_peers(topology, args.name, fingerprint, curve, wait_s=args.wait,
                             tensor_spec=learner.weight_spec(),
                             on_ready=lambda c: print(f"  {c.name}: {c.state}", flush=True))
    except zmq.ZMQError as err:
        line = _listen_error(topology, args.name, err)
        if line is None:
            raise
        raise ConfigError(line) from None
    for c in checks:
        print(f"peer {c.name} ({c.address}): {c.state}: {c.detail}")
    if any(c.state == "other setup" for c in checks):
        print("p2p-fl: error: a peer runs another federation setup (above); every site must use the same topology "
              "file and p2p-fl version", file=sys.stderr)
        return 2
    if any(c.state != "ready" for c in checks):
        print("p2p-fl: error: not every peer answered (above); each site's check shows whether its peers reach it",
              file=sys.stderr)
        return 1
    print("ready: every peer answered with the same setup")
    return 0


def cmd_predict(args) -> int:
    _setup_runtime()
    import collections

    from p2p_fl.predict import PredictError, predict_files, write_csv

    try:
        rows, skipped = predict_files(args.run, args.images)
    except PredictError as err:
        raise ConfigError(str(err)) from None
    if not rows:
        raise ConfigError(f"none of the {len(skipped)} image file(s) could be read (see the warnings)")
    write_csv(rows, args.out)
    counts = collections.Counter(row["predicted"] for row in rows)
    where = f" at threshold {rows[0]['threshold']:.4g} (chosen on the site's validation data)" if "threshold" in rows[0] else ""
    print(f"{len(rows)} image(s){where}: " + ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
          + (f"; {len(skipped)} unreadable file(s) skipped" if skipped else "") + f"; wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    _setup_runtime()
    from p2p_fl.export import FILES, export_site_model
    from p2p_fl.predict import PredictError

    out = args.out or args.run / "export"
    try:
        described = export_site_model(args.run, out)
    except PredictError as err:
        raise ConfigError(str(err)) from None
    print(f"{described['model']} of {described['site']}, input {described['input']['shape']}, classes "
          f"{described['classes']}: {', '.join(str(out / f) for f in FILES)}")
    return 0


def cmd_status(args) -> int:
    """Exit 0: the node runs (or finished with the federation); 1: it is not running; 3: it
    finished without the federation."""
    from p2p_fl.launch import INCOMPLETE_EXIT
    from p2p_fl.node import STATUS_FILE

    result_path, status_path = args.out / "result.json", args.out / STATUS_FILE
    if result_path.exists():
        r = json.loads(result_path.read_text())
        auc = "-" if r.get("test_auc") is None else f"{r['test_auc']:.4f}"
        print(f"{r['name']}: finished ({r['protocol']}); test AUC {auc} on {r.get('test_set', '?')} test set; "
              f"{r.get('resumes', 0)} restart(s); " + (f"WITHOUT the federation: {r['shortfall']}" if r.get("shortfall")
                                                       else "with the federation"))
        return INCOMPLETE_EXIT if r.get("shortfall") else 0
    if not status_path.exists():
        raise ConfigError(f"{args.out}: no node status here (status.json); give a node's --out folder")
    s = json.loads(status_path.read_text())
    try:
        os.kill(s["pid"], 0)
        running = True
    except ProcessLookupError:
        running = False
    except PermissionError:  # another user's process: it exists
        running = True
    age = time.time() - s["updated"]
    print(f"{s['name']} ({s['federation']}, {s['protocol']}): " + (f"running, pid {s['pid']}" if running else
          f"NOT RUNNING (pid {s['pid']} gone)") + f"; as of {age:.0f} s ago")
    print(f"  state: {s['state']}" + (f", round {s['round']} of {s['rounds']}" if s["round"] is not None else "")
          + f"; trained: {', '.join(map(str, s['trained'])) or 'nothing yet'}"
          + (f"; last val AUC {s['last_val_auc']:.4f}" if s.get("last_val_auc") is not None else ""))
    for name, p in s["peers"].items():
        seen = f", heard {p['silent_s']:.1f} s ago" if p["silent_s"] is not None else ""
        progress = f", at {p['progress']}" if p["progress"] is not None else ""
        differs = f": {', '.join(p['differs'])} differ" if p.get("differs") else ""
        print(f"  peer {name}: {p['state']}{seen}{progress}{differs}")
    return 0 if running else 1


def _hold_out_folder(out: Path, name: str) -> None:
    """Locks OUT for this process's lifetime: the same node started twice would otherwise
    overwrite the first one's metrics and checkpoint before failing on the port."""
    import fcntl

    lock = open(out / ".node.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise ConfigError(f"{out}: node {name} already runs here (pid {lock.read().strip() or '?'}); "
                          "one node per --out") from None
    except OSError as err:  # a file system without locks (some network mounts): go on unguarded
        print(f"p2p-fl: warning: {out}: cannot lock it ({err.strerror}); do not start this node twice",
              file=sys.stderr)
        return
    try:  # the pid, for the refusal above; a full disk must not stop the node here
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
    except OSError:
        pass
    _held_locks.append(lock)  # open until the process ends, when the OS releases it


_held_locks: list = []


def cmd_keygen(args) -> int:
    from p2p_fl.net import generate_keypair, load_public_key

    public_path, secret_path = generate_keypair(args.out, args.name)
    print(f"secret key: {secret_path} (mode 600; never share it)")
    print(f"public key: {public_path}; put this line in the topology's [[peers]] entry for {args.name}:")
    print(f'public_key = "{load_public_key(public_path)}"')
    return 0


def cmd_launch(args) -> int:
    from p2p_fl.launch import Supervision, run_launch, with_overrides
    from p2p_fl.netns import NetnsError

    if not args.restart_delay >= 0:
        raise ConfigError(f"--restart-delay must be >= 0 seconds, got {args.restart_delay}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    supervision = Supervision(not args.no_restart, args.restart_delay, args.max_restarts)
    faults = ()
    if args.engine == "inproc":
        if args.netns:
            raise ConfigError("--netns needs --engine process: in-process sites share no network")
        _setup_runtime()  # JAX runs in this process: every core, the compilation cache
        from p2p_fl.simulate import Fault

        faults = tuple(Fault.parse(text) for text in args.kill)
    elif args.kill:
        raise ConfigError("--kill needs --engine inproc (kill process nodes with a signal)")
    if args.processes is not None and (args.engine == "inproc" or args.processes < 1):
        raise ConfigError("--processes P needs --engine process and P >= 1 (inproc runs every site in one process)")
    hosts = [h.strip() for h in args.hosts.split(",")] if args.hosts is not None else None
    if hosts is not None and (args.engine == "inproc" or args.netns or args.processes is not None or not all(hosts)):
        raise ConfigError("--hosts H1,H2,... lists one host per process (so no --processes), for the process "
                          "engine without --netns")
    topology = load_topology(args.topology)
    try:
        topology = with_overrides(topology, peers=args.peers, rounds=args.rounds, local_epochs=args.local_epochs,
                                  partition=args.partition, seed=args.seed, dataset=args.data)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # Overrides obey the same rules as the file.
    topology = parse_topology(tomllib.loads(dump_topology(topology)), source=f"{args.topology} (with overrides)")
    _check_model(topology, args.topology)
    out = args.out or Path("runs") / f"{topology.federation}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "summary.json").exists():  # its models, metrics and keys would be overwritten
        if not args.overwrite:
            raise ConfigError(f"{out} holds a finished run (summary.json); use another --out, or --overwrite to "
                              "replace it")
        if not (out / "topology.toml").exists():
            raise ConfigError(f"{out} holds a summary.json but no topology.toml: not a launch folder; not deleting it")
        import shutil

        shutil.rmtree(out)
        print(f"--overwrite: deleted the finished run in {out}")
    if hosts is not None:
        return _prepare_hosts(topology, out, hosts)
    try:
        summary = run_launch(topology, out, netns=args.netns, supervision=supervision, engine=args.engine,
                             faults=faults, processes=args.processes)
    except NetnsError as err:
        raise ConfigError(f"--netns: {err}") from None
    except RuntimeError as err:  # failed nodes, or a simulation that stalled
        print(f"p2p-fl: error: {err}", file=sys.stderr)
        return 1
    print(f"results: {out / 'summary.json'}")
    for site, why in summary["incomplete"].items():
        print(f"p2p-fl: error: {site} ended without the federation: {why}", file=sys.stderr)
    if summary["incomplete"]:
        from p2p_fl.launch import INCOMPLETE_EXIT

        return INCOMPLETE_EXIT
    return 0 if summary["nodes"] else 1


def _prepare_hosts(topology: Topology, out: Path, hosts: list[str]) -> int:
    from p2p_fl.launch import prepare_hosts

    groups = prepare_hosts(topology, out, hosts)
    print(f"{out}: {len(topology.peers)} sites in {len(groups)} processes; start each on its host "
          f"(OUT on storage every host reads; with Slurm: srun p2p-fl group {out} --group $SLURM_PROCID):")
    for g, group in enumerate(groups):
        print(f"  {group['host']}: p2p-fl group {out} --group {g}    # {', '.join(group['sites'])}")
    return 0


def cmd_centralized(args) -> int:
    _setup_runtime()
    from p2p_fl.centralized import run_centralized

    if args.config:
        topology = load_topology(args.config)
        _check_model(topology, args.config)
    else:
        topology = Topology(federation="centralized", protocol="local", peers=(PeerConfig("central"),))
    out = args.out or Path("runs") / f"centralized-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_centralized(topology, out, dataset=args.data, epochs=args.epochs, seed=args.seed)
    f = summary["final"]
    print(f"centralized {topology.training.model}, {summary['epochs']} epochs, {summary['wall_s']:.1f} s: "
          f"test AUC {f['test_auc']:.4f}, acc@0.5 {f['test_acc']:.4f}, loss {f['test_loss']:.4f}")
    print(f"results: {out / 'summary.json'}")
    return 0


def cmd_experiment(args) -> int:
    from p2p_fl.experiment import load_sweep, run_sweep, select

    runs = load_sweep(args.sweep)
    out = args.out or Path("runs") / args.sweep.stem
    if args.only and not select(runs, args.only):
        raise ConfigError(f"--only {' '.join(args.only)}: matches none of the {len(runs)} runs (see --list)")
    if args.list:
        for run in select(runs, args.only):
            print(f"{run.name}{'  (done)' if (out / run.name / 'summary.json').exists() else ''}")
        return 0
    return 1 if run_sweep(runs, out, only=args.only, engine=args.engine) else 0


def cmd_report(args) -> int:
    _setup_runtime()
    from p2p_fl.report import ReportError, write_report

    try:
        page = write_report(args.folder, centralized=args.centralized)
    except ReportError as err:
        raise ConfigError(str(err)) from None
    print(f"report: {page}")
    return 0


def cmd_chaos(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from p2p_fl.chaos import FAULTS, PROTOCOLS, run_chaos, summary_rows

    protocols = [p for p in args.protocols.split(",") if p]
    kinds = tuple(k for k in args.faults.split(",") if k)
    unknown = [p for p in protocols if p not in PROTOCOLS] + [k for k in kinds if k not in FAULTS]
    if unknown or not protocols or not kinds:
        raise ConfigError(f"chaos: unknown or missing protocol or fault {', '.join(unknown) or '(none given)'}; "
                          f"protocols: {', '.join(PROTOCOLS)}; faults: {', '.join(FAULTS)}")
    if args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    if "cut" in kinds:
        from p2p_fl.netns import NetnsError, network_hosts

        try:
            with network_hosts(1):
                pass
        except NetnsError as err:
            raise ConfigError(f"chaos: the cut fault needs network namespaces ({err}); leave it out of --faults") from None
    out = args.out or Path("runs") / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}"
    records = run_chaos(protocols, args.trials, kinds, args.seed, out, report=lambda line: print(line, flush=True))
    rows = summary_rows(records)
    table = Table(title=f"chaos: {len(records)} trials, seed {args.seed}")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)
    print(f"trials: {out / 'chaos.jsonl'}")
    return 1 if any(r["violations"] for r in records) else 0


def cmd_bench(args) -> int:
    _setup_runtime()
    from p2p_fl.bench import FAMILIES, run_benchmarks

    run_benchmarks(args.only or list(FAMILIES), args.quick, lambda line: print(json.dumps(line), flush=True))
    return 0
