"""Benchmark: one model hand-off between two peers, against a plain loopback socket and with
CURVE against without.

A hand-off is what a ring does per hop: the holder sends the model (msgpack header + one raw
frame per tensor), the successor receives it, checks every field and value (wire.decode:
names, dtypes, shapes, finite), and acknowledges; the holder receives the ack. The reference
sends the same bytes as one frame through a bare DEALER/ROUTER pair on tcp://127.0.0.1 and
gets a 1-byte reply: the floor for a loopback round trip of that payload.

Prints JSON lines {"name", "value", "reference", "ratio", "unit", ...}: per model, the peer
hand-off over CURVE against the raw socket (`handoff_*`), and the same hand-off with CURVE
against without (`curve_vs_plain_*`), all measured in the same run.
Run: .venv/bin/python bench/bench_handoff.py [--repeats 30]
(functions in p2p_fl/bench.py; `p2p-fl bench --only handoff` gives the same figures)
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from p2p_fl.bench import model_weights, time_peer_handoff, time_raw_socket


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default="small-cnn,seed-cnn,resnet8")
    args = parser.parse_args()
    for model in args.models.split(","):
        weights = model_weights(model)
        payload = b"".join(np.ascontiguousarray(w).tobytes() for w in weights.values())
        secure = statistics.median(time_peer_handoff(weights, args.repeats, curve=True))
        plain = statistics.median(time_peer_handoff(weights, args.repeats, curve=False))
        raw = statistics.median(time_raw_socket(payload, args.repeats))
        common = {"unit": "s (median)", "bytes": len(payload), "tensors": len(weights)}
        print(json.dumps({"name": f"handoff_{model}", "value": secure, "reference": raw,
                          "ratio": secure / raw, **common}))
        print(json.dumps({"name": f"handoff_plain_{model}", "value": plain, "reference": raw,
                          "ratio": plain / raw, **common}))
        print(json.dumps({"name": f"curve_vs_plain_{model}", "value": secure, "reference": plain,
                          "ratio": secure / plain, **common}))


if __name__ == "__main__":
    main()
