"""Reruns the foundation's comparison and prints a markdown table of the results.

CWT on 3 and 10 sites, SWT on 3, local-only on 3, and centralized, with the default
settings of each topology (so the same epochs per site), then CWT on 10 sites with
Dirichlet(0.5) label skew under several seeds (the worst case is what matters for a ring).

    .venv/bin/python launch/experiments/foundation.py [--out runs/foundation] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], out: Path) -> dict:
    if not (out / "summary.json").exists():  # rerunning the script resumes where it stopped
        subprocess.run([sys.executable, "-m", "p2p_fl", *args, "--out", str(out)], cwd=ROOT, check=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "foundation")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    runs = [
        ("centralized (10 epochs)", ["centralized", "--config", "topologies/ring-3.toml"], "centralized"),
        ("CWT ring-3, iid", ["launch", "topologies/ring-3.toml"], "ring-3"),
        ("CWT ring-10, iid", ["launch", "topologies/ring-10.toml"], "ring-10"),
        ("SWT-3, iid", ["launch", "topologies/swt-3.toml"], "swt-3"),
        ("local-only 3, iid (mean of sites)", ["launch", "topologies/local-3.toml"], "local-3"),
    ]
    for seed in args.seeds.split(","):
        runs.append((f"CWT ring-10, dirichlet:0.5, seed {seed}",
                     ["launch", "topologies/ring-10.toml", "--partition", "dirichlet:0.5", "--seed", seed],
                     f"ring-10-dir0.5-seed{seed}"))
    print("| run | test AUC | acc@0.5 | acc@val-threshold | test loss | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, cmd, name in runs:
        summary = run(cmd, args.out / name)
        f = summary["final"]
        print(f"| {label} | {f['test_auc']:.4f} | {f['test_acc']:.3f} | "
              f"{f.get('test_acc_at_val_threshold') or float('nan'):.3f} | "
              f"{f['test_loss']:.3f} | {summary['wall_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
