"""Non-IID comparison: 10 peers, PneumoniaMNIST, Dirichlet(0.5) label skew, one seed.

FedAvg-gossip (complete graph, secure sums), FedProx, FedBN, the ensemble, CWT, local-only
and centralized, then FedAvg-gossip with DP-SGD at epsilon 1, 3 and 8. The same budget of
work for all: 10 epochs over its own shard at each site (10 rounds or cycles of 1 epoch;
centralized: 10 epochs over the pooled data). Every federation runs through `p2p-fl launch`
(10 node processes over CurveZMQ on loopback); the table (test AUC, accuracy at 0.5 and at
the validation threshold, loss, wall time, epsilon for DP) goes to stdout and OUT/results.md.

    .venv/bin/python launch/experiments/noniid.py [--out runs/noniid] [--seed 0] [--only LABEL,...]

Rerunning resumes: a run whose summary.json exists is read, not run again. The topologies
actually launched are written to OUT/topologies/.
"""

from __future__ import annotations

import argparse
import platform
import tomllib
from pathlib import Path

import tomli_w

from foundation import ROOT, run

PARTITION = "dirichlet:0.5"
ROUNDS, LOCAL_EPOCHS = 10, 1  # 10 epochs of work per site in every row
PROX_MU = 0.01
EPSILONS = (1.0, 3.0, 8.0)
# DP-SGD needs its own recipe (docs/results.md, "DP recipe"; searched with dp_recipe.py).
# Adam normalises each coordinate's noise-dominated gradient to a full step: AUC 0.34-0.36
# at every epsilon. SGD with momentum restarted on every arriving model never builds
# momentum (1 to 10 steps per round) and a cosine rate shrinks the steps while the noise
# stays: 0.47-0.63. What works: small-cnn-dp (GroupNorm, which trains under per-example
# gradients, where BatchNorm stays frozen; tanh), momentum kept across rounds, a constant
# rate, C = 5 (per-example gradient norms are ~5 at initialisation); a smaller rate for the
# larger noise at epsilon 1.
DP_CLIP_NORM = 5.0
DP_TRAINING = {eps: {"model": "small-cnn-dp", "optimizer": "sgd", "learning_rate": 0.01 if eps < 2 else 0.02,
                     "lr_schedule": "constant", "keep_optimizer_state": True} for eps in EPSILONS}

# label -> (base topology, changes to it). Gossip rows start from gossip-10 (complete
# graph, secure sums, FedAvg sample-count weights).
GOSSIP = "topologies/gossip-10.toml"
TRAINING = {"rounds": ROUNDS, "local_epochs": LOCAL_EPOCHS}
RUNS = {
    "FedAvg-gossip (secure)": (GOSSIP, {"training": TRAINING}),
    f"FedProx mu={PROX_MU} (gossip, secure)": (GOSSIP, {"training": {**TRAINING, "prox_mu": PROX_MU}}),
    "FedBN (gossip, secure)": (GOSSIP, {"training": {**TRAINING, "fedbn": True}}),
    "ensemble (mean of 10 local models)": (GOSSIP, {"protocol": "ensemble", "training": TRAINING}),
    "CWT ring-10 (defaults: 10 cycles)": ("topologies/ring-10.toml", {}),
    "local-only (mean of sites)": (GOSSIP, {"protocol": "local", "training": TRAINING}),
    **{f"DP FedAvg-gossip, epsilon {eps:g}": (GOSSIP, {"training": {**TRAINING, **DP_TRAINING[eps]}, "privacy": {
        "enabled": True, "target_epsilon": eps, "clip_norm": DP_CLIP_NORM}}) for eps in EPSILONS},
}


def topology_file(base: str, changes: dict, path: Path) -> Path:
    """The base topology with `changes` (top-level fields and sections) applied, written to path."""
    raw = tomllib.loads((ROOT / base).read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    if raw["protocol"] != "gossip":
        raw.pop("gossip", None)
    raw["federation"] = f"noniid-{path.stem}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(raw))
    return path


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")[:48]


def row(label: str, summary: dict) -> str:
    f = summary["final"]
    eps = summary.get("epsilon") or {}
    spent = [e for e in eps.values() if e is not None]
    epsilon = f"{max(spent):.2f}" if spent else "-"
    members = [n.get("final_ensemble_members") for n in summary.get("nodes", []) if "final_ensemble_members" in n]
    if members:
        label += f" [{min(members)}-{max(members)} members]" if min(members) != max(members) else f" [{members[0]} members]"

    def num(key, digits):
        value = f.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    # Each site's own test shard (skewed like its training data; FedBN's BatchNorm is fitted
    # to it): the mean over sites whose shard holds both classes.
    site_aucs = [n["local_test_auc"] for n in summary.get("nodes", []) if n.get("local_test_auc") is not None]
    site_auc = f"{sum(site_aucs) / len(site_aucs):.4f} ({len(site_aucs)})" if site_aucs else "-"
    return (f"| {label} | {num('test_auc', 4)} | {num('test_acc', 3)} | {num('test_acc_at_val_threshold', 3)} | "
            f"{num('test_loss', 3)} | {site_auc} | {summary['wall_s']:.0f} | {epsilon} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "noniid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated label prefixes to run (default: all)")
    args = parser.parse_args()
    wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    header = [f"10 peers, PneumoniaMNIST, {PARTITION}, seed {args.seed}; {ROUNDS} x {LOCAL_EPOCHS} epochs per site "
              f"(centralized: {ROUNDS * LOCAL_EPOCHS} epochs pooled); {platform.node()} ({platform.machine()})",
              "",
              "| run | test AUC | acc@0.5 | acc@val-threshold | test loss | site-test AUC (sites) | wall s "
              "| epsilon (max over sites) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(header), flush=True)
    lines = list(header)
    jobs = [("centralized (pooled data)", ["centralized", "--config", "topologies/ring-10.toml",
                                           "--seed", str(args.seed)], "centralized")]
    for label, (base, changes) in RUNS.items():
        name = slug(label)
        path = topology_file(base, changes, args.out / "topologies" / f"{name}.toml")
        jobs.append((label, ["launch", str(path), "--partition", PARTITION, "--seed", str(args.seed)], name))
    for label, cmd, name in jobs:
        if wanted and not any(label.lower().startswith(w) for w in wanted):
            continue
        line = row(label, run(cmd, args.out / name))
        print(line, flush=True)
        lines.append(line)
        (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
