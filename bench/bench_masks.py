"""Mask throughput against the cipher's own keystream rate (a benchmark, not a test).

    python bench/bench_masks.py [--mib 4 16 64] [--peers 9] [--reps 15]

Each repetition times the floor and ours back to back and the ratio is taken per
repetition, so load from other processes on a shared machine affects both alike. Floors:

* update_into: AES-128-CTR over a zero buffer of the same size, into a preallocated,
  already touched output (the cipher alone);
* update: the same returning fresh bytes (what a naive caller pays, page faults included).

`prg` and `masked_contribution` return fresh arrays, so their fair floor lies between the two.
The function lives in p2p_fl/bench.py; `p2p-fl bench --only masks` gives JSON lines.
"""

from __future__ import annotations

import argparse

from p2p_fl.bench import mask_rates as bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--peers", type=int, default=9, help="pairwise masks per vector")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    for mib in args.mib:
        r = bench(mib << 20, args.peers, args.reps)
        print(f"{mib:4d} MiB  floor: update_into {r['floor_update_into_MBps']:6.0f} MB/s, "
              f"update {r['floor_update_MBps']:6.0f} MB/s | prg {r['prg_MBps']:6.0f} MB/s "
              f"= {r['prg_vs_update_into']:.2f} x update_into, {r['prg_vs_update']:.2f} x update | "
              f"masked_contribution ({args.peers} peers + self) {r['masked_keystream_MBps']:6.0f} MB/s "
              f"of keystream = {r['masked_vs_update_into']:.2f} x update_into")


if __name__ == "__main__":
    main()
