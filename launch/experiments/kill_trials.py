"""Kill/restart trials: `kill -9` random nodes at random moments, count runs that lost anything.

Each trial launches a federation on small shards of the embedded data (launch restarts a
killed node after --restart-delay and it resumes from its checkpoint), kills 1-2 random node
processes at random moments, and checks what came out:

- every site finished, and all sites hold the same final model (ring: bit-identical; secure
  gossip on the complete graph: within the fixed-point error);
- ring: every hop was trained once except at most one per kill (the hop a killed holder was
  training), so no completed hop's work is lost; gossip: the last round's sums went through.

    .venv/bin/python launch/experiments/kill_trials.py [--trials 10] [--protocols cwt,gossip]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from p2p_fl.data import Dataset, Split, load_dataset, save_npz

ROOT = Path(__file__).resolve().parents[2]
SITES = 4
NETWORK = ("[network]\nheartbeat_interval_s = 0.3\npeer_timeout_s = 2.0\nack_timeout_s = 0.5\n"
           "handoff_timeout_s = 30.0\nrun_timeout_s = 600.0\n")
SETTINGS = {
    "cwt": 'protocol = "cwt"\n[training]\nrounds = 3\nlocal_epochs = 2\n[ring]\nfinal = "last"\n',
    "gossip": 'protocol = "gossip"\n[training]\nrounds = 6\nlocal_epochs = 1\noptimizer = "sgd"\n'
              'learning_rate = 0.05\n[gossip]\nsecure = true\nround_timeout_s = 20.0\n',
}


def small_data(folder: Path) -> Path:
    full = load_dataset("builtin:pneumoniamnist")
    take = lambda split, n: Split(split.images[:n], split.labels[:n])  # noqa: E731
    return save_npz(Dataset(take(full.train, 3200), take(full.val, 400), take(full.test, 400), 2, "small"),
                    folder / "small.npz")


def topology(protocol: str, trial: int) -> str:
    peers = "".join(f'[[peers]]\nname = "s{i}"\n' for i in range(SITES))
    return (f'federation = "kill-{protocol}-{trial}"\nseed = {trial}\n{SETTINGS[protocol]}'
            f'[data]\ntest = ""\n{NETWORK}{peers}')


def trial(protocol: str, number: int, data: Path, folder: Path, rng: random.Random) -> dict:
    out = folder / f"{protocol}-{number}"
    config = folder / f"{protocol}-{number}.toml"
    config.write_text(topology(protocol, number))
    launch = subprocess.Popen([sys.executable, "-m", "p2p_fl", "launch", str(config), "--data", str(data),
                               "--out", str(out), "--restart-delay", "1"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kills = []
    for _ in range(rng.choice([1, 2])):
        time.sleep(rng.uniform(8, 25))
        site = f"s{rng.randrange(SITES)}"
        try:
            pid = int((out / site / "node.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            kills.append(site)
        except (OSError, ValueError):
            pass  # that node was between processes or done: no kill this time
    code = launch.wait(timeout=900)
    return {"protocol": protocol, "trial": number, "kills": kills, "launch_rc": code, **check(protocol, out, len(kills))}


def check(protocol: str, out: Path, kills: int) -> dict:
    sites = [f"s{i}" for i in range(SITES)]
    try:
        models = {s: np.load(out / s / "final_model.npz") for s in sites}
        metrics = {s: [json.loads(line) for line in (out / s / "metrics.jsonl").read_text().splitlines()] for s in sites}
    except OSError as err:
        return {"lost": True, "why": f"missing output: {err}"}
    difference = max(float(np.max(np.abs(models[s][k] - models["s0"][k]))) for s in sites for k in models["s0"].files)
    if protocol == "cwt":
        hops = sorted(m["round"] for s in sites for m in metrics[s] if "train_loss" in m)
        expected = list(range(3 * SITES))
        missing = sorted(set(expected) - set(hops))
        twice = len(hops) - len(set(hops))
        lost = difference != 0 or len(missing) > kills or twice > 0
        return {"lost": lost, "hops_missing": missing, "hops_twice": twice, "max_difference": difference}
    last = [metrics[s][-1] for s in sites]
    failed = [m for m in last if m.get("kept_own")]
    lost = difference > 1e-4 or bool(failed)
    return {"lost": lost, "last_round_kept_own": len(failed), "max_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--protocols", default="cwt,gossip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    folder = args.out or Path(tempfile.mkdtemp(prefix="kill-trials-"))
    folder.mkdir(parents=True, exist_ok=True)
    data = small_data(folder)
    results = []
    for protocol in args.protocols.split(","):
        for number in range(args.trials):
            result = trial(protocol, number, data, folder, rng)
            results.append(result)
            print(json.dumps(result), flush=True)
    kills = sum(len(r["kills"]) for r in results)
    lost = sum(r["lost"] for r in results)
    print(f"{len(results)} trials, {kills} kill -9s, {lost} lost anything", flush=True)


if __name__ == "__main__":
    main()
