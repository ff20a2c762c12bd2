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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import zmq

from p2p_fl.launch import free_ports
from p2p_fl.net import Curve, Peer, wire


def model_weights(name: str) -> dict[str, np.ndarray]:
    """The real tensors of a model (names, shapes, values) as a site would send them."""
    from p2p_fl.learn import Learner

    return Learner(name).get_weights()


def time_peer_handoff(weights: dict, repeats: int, curve: bool) -> list[float]:
    pa, pb = free_ports(2)
    keys = {n: tuple(k.decode() for k in zmq.curve_keypair()) for n in "ab"}
    curves = {n: Curve(*keys[n], {o: keys[o][0] for o in "ab" if o != n}) if curve else None for n in "ab"}
    spec = wire.spec_of(weights)
    a = Peer("a", f"tcp://127.0.0.1:{pa}", {"b": f"tcp://127.0.0.1:{pb}"}, "bench", spec, curve=curves["a"])
    b = Peer("b", f"tcp://127.0.0.1:{pb}", {"a": f"tcp://127.0.0.1:{pa}"}, "bench", spec, curve=curves["b"])
    times = []
    try:
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            a.send("b", wire.MODEL, i, weights)
            got = []
            while not got:
                got = b.receive(1.0)
            b.send("a", wire.ACK, i, meta={"of": wire.MODEL})
            acks = []
            while not acks:
                acks = a.receive(1.0)
            if i >= 3:  # the first hand-offs pay for connection set-up
                times.append(time.perf_counter() - t0)
    finally:
        a.close()
        b.close()
    return times


def time_raw_socket(payload: bytes, repeats: int) -> list[float]:
    ctx = zmq.Context.instance()
    (port,) = free_ports(1)
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    times = []
    try:
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            dealer.send(payload, copy=False)
            ident, _ = router.recv_multipart(copy=False)
            router.send_multipart([ident, b"k"])
            dealer.recv()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    finally:
        dealer.close(0)
        router.close(0)
    return times


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
