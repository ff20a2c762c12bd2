"""The chest X-ray study's intermittent clients, reproduced: sites leave and come back.

FedAvg as plain gossip on the complete graph (keep-last needs plain sums: with masks nobody
holds a site's last model), PneumoniaMNIST split IID, 10 rounds of 1 local epoch. For 3 and
10 peers, three runs each:

- uninterrupted: everyone every round;
- forget: the scenario below, an absent site's weights no longer count;
- keep-last: the same scenario, an absent site's last model stays in the average.

Scenario (the same [[events]] in both policies): with 3 peers the last site leaves at round 3
and is back at round 7; with 10 peers the last three leave at round 3, two of them are back
at round 7, the last never returns. Figures are on the common test set, averaged over the
sites present at the end (a site that left for good keeps the model it had when it left).

    .venv/bin/python launch/experiments/intermittent.py [--out runs/intermittent] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

from p2p_fl.config import dump_topology, load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[2]


def scenario(names: list[str]) -> list[dict]:
    if len(names) <= 3:
        return [{"round": 3, "peer": names[-1], "action": "leave"}, {"round": 7, "peer": names[-1], "action": "join"}]
    leaving = names[-3:]
    events = [{"round": 3, "peer": n, "action": "leave"} for n in leaving]
    return events + [{"round": 7, "peer": n, "action": "join"} for n in leaving[:2]]


def topology_text(peers: int, rounds: int, policy: str | None) -> str:
    base = load_topology(ROOT / "topologies" / ("gossip-3.toml" if peers == 3 else "gossip-10.toml"))
    names = base.names[:peers]
    raw = tomllib.loads(dump_topology(base))
    raw["federation"] = f"intermittent-{peers}-{policy or 'none'}"
    raw["peers"] = [{"name": n} for n in names]
    raw["training"].update(rounds=rounds, local_epochs=1)
    raw["gossip"].update(secure=False, on_leave=policy or "forget", samples={})
    if policy:
        raw["events"] = scenario(names)
    return dump_topology(parse_topology(raw))  # checked like any topology file


def run(peers: int, rounds: int, policy: str | None, out: Path) -> dict:
    if not (out / "summary.json").exists():  # rerunning the script resumes where it stopped
        out.mkdir(parents=True, exist_ok=True)
        config = out.parent / f"{out.name}.toml"
        config.write_text(topology_text(peers, rounds, policy))
        subprocess.run([sys.executable, "-m", "p2p_fl", "launch", str(config), "--out", str(out)], cwd=ROOT, check=True)
    return json.loads((out / "summary.json").read_text())


def present_at_end(summary: dict) -> list[dict]:
    return [n for n in summary["nodes"] if n.get("final_left_at") is None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "intermittent")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--peers", default="3,10")
    args = parser.parse_args()
    print("| peers | run | test loss | accuracy | AUC | sites at the end | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for peers in map(int, args.peers.split(",")):
        for policy in (None, "forget", "keep-last"):
            summary = run(peers, args.rounds, policy, args.out / f"{peers}-{policy or 'uninterrupted'}")
            nodes = present_at_end(summary)
            mean = lambda key: statistics.fmean(n[key] for n in nodes)  # noqa: E731
            print(f"| {peers} | {policy or 'uninterrupted'} | {mean('test_loss'):.4f} | {mean('test_acc'):.4f} | "
                  f"{mean('test_auc'):.4f} | {len(nodes)} of {peers} | {summary['wall_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
