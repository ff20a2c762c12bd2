"""Mask throughput against the cipher's own keystream rate (a benchmark, not a test).

    python bench/bench_masks.py [--mib 4 16 64] [--peers 9] [--reps 15]

Each repetition times the floor and ours back to back and the ratio is taken per
repetition, so load from other processes on a shared machine affects both alike. Floors:

* update_into: AES-128-CTR over a zero buffer of the same size, into a preallocated,
  already touched output (the cipher alone);
* update: the same returning fresh bytes (what a naive caller pays, page faults included).

`prg` and `masked_contribution` return fresh arrays, so their fair floor lies between the two.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from p2p_fl.federate import masks


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _aes():
    return Cipher(algorithms.AES(bytes(16)), modes.CTR(bytes(16))).encryptor()


def bench(nbytes: int, peers: int, reps: int) -> dict[str, float]:
    """Median rates (MB/s) and per-repetition ratios for one vector size."""
    length = nbytes // 4
    zeros = bytearray(nbytes)
    out = bytearray(nbytes + 16)
    encoded = np.zeros(length, np.uint32)
    seed = bytes(range(32))
    pair_seeds = {f"peer{i}": bytes([i]) * 32 for i in range(peers)}
    rows = []
    for _ in range(reps):
        floor_into = _time(lambda: _aes().update_into(zeros, out))
        floor_update = _time(lambda: _aes().update(zeros))
        ours_prg = _time(lambda: masks.prg(seed, length))
        floor_many = _time(lambda: [_aes().update_into(zeros, out) for _ in range(peers + 1)])
        ours_masked = _time(lambda: masks.masked_contribution(encoded, self_seed=seed, pair_seeds=pair_seeds,
                                                              me="me"))
        rows.append((floor_into, floor_update, ours_prg, floor_many, ours_masked))
    t = np.array(rows)
    mb = nbytes / 1e6
    return {
        "floor_update_into_MBps": mb / np.median(t[:, 0]),
        "floor_update_MBps": mb / np.median(t[:, 1]),
        "prg_MBps": mb / np.median(t[:, 2]),
        "prg_vs_update_into": float(np.median(t[:, 0] / t[:, 2])),
        "prg_vs_update": float(np.median(t[:, 1] / t[:, 2])),
        "masked_keystream_MBps": (peers + 1) * mb / np.median(t[:, 4]),
        "masked_vs_update_into": float(np.median(t[:, 3] / t[:, 4])),
    }


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
