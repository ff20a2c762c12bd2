"""`p2p-fl bench`: every benchmark in one command, one JSON line per figure.

Each line has `name`, `value`, `unit`, `reference` (measured in the same run, on the same
machine, interleaved where possible), `ratio` (value / reference) and `family`, plus what
the figure needs to be read (`reference_is`, sizes, repeats). Families:

* train: images/s of a node's `Learner.fit` (one `lax.scan` per epoch) against a plain
  jitted step looped in Python, same model, data, batch and Adam.
* handoff: one model hand-off between two `Peer`s over CURVE (send, receive and check
  every field, acknowledge) against the same bytes through a bare DEALER/ROUTER pair; and
  CURVE against the same hand-off in plain ZeroMQ.
* masks: keystream rate of a masked contribution (self mask + one pairwise mask per
  neighbour) and of one PRG call, against AES-128-CTR encrypting into a preallocated buffer.
* secure-round: the CPU of one secure neighbourhood sum on the complete graph (every
  member's join and release, the aggregator's unmasking; a site does one such sum's worth
  per round) against the plain FedAvg average of the same models, real small-cnn weights.
* scaling: wall time per round of CWT and secure gossip as peers grow, one process per
  site on this machine (`launch`), tiny shards (128 training images a site); reference:
  the same protocol with 3 peers. Each line carries the peak RSS of the largest node.

* inproc: the in-process engine (`launch --engine inproc`), each run in a child process
  of its own (its peak RSS is that child's): 10 sites x 10 rounds x 1 epoch of secure
  gossip, IID, on the embedded data, against `centralized` for the same 10 epochs; its
  round time against plain gossip's in the same settings; bytes each site sent per round
  against the model's size; the same with chunked sums (gossip.chunked: bytes, and the
  round against plain gossip's).
* inproc-large: 100 sites of secure gossip on a 4-regular graph (5 rounds) and 1,000 (3
  rounds): peak RSS, and time per image trained against 10 sites of the same; the 100-site
  round against plain gossip's in the same settings; each site
  scores its final model on the common test set, not the last rounds' ones
  (data.score_last_rounds = 0: that pass per site and round grows with the sites).
* processes: the process engine's memory and start-up: 10 sites x 3 rounds of secure
  gossip (IID, embedded data) with one process per site and with the sites in 2 processes
  (`launch --processes 2`), against the in-process engine's one process: each process's
  peak RSS and their sum, start-up seconds per process (imports, JAX, data, keys, sockets),
  and the round time.
* dp: seconds per epoch of `Learner.fit` with DP-SGD (Poisson-sampled steps, per-example
  gradients over `dp_slots` padded slots, clipped and noised under a site secret) and with
  FedProx (mu 0.01), against the plain epoch of the same model, data, batch and Adam.

`--quick` runs a short version of each (fewer repeats, smaller sizes, 3 and 5 peers).
This command is the one way to run them: `--only FAMILY` picks families, and
`P2P_FL_THREADS` limits XLA's threads as for a node.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

FAMILIES = ("train", "handoff", "masks", "secure-round", "scaling", "inproc", "inproc-large", "processes", "dp")


def figure(family: str, name: str, value: float, reference: float, unit: str, **extra) -> dict:
    return {"family": family, "name": name, "value": value, "unit": unit, "reference": reference,
            "ratio": value / reference if reference else None, **extra}


def run_benchmarks(families: list[str], quick: bool, emit: Callable[[dict], None]) -> None:
    benches = {"train": bench_train, "handoff": bench_handoff, "masks": bench_masks,
               "secure-round": bench_secure_round, "scaling": bench_scaling, "inproc": bench_inproc,
               "inproc-large": bench_inproc_large, "processes": bench_processes, "dp": bench_dp}
    for family in families:
        for line in benches[family](quick):
            emit(line)


# Training throughput.

def reference_epoch(model_name: str, images: np.ndarray, labels: np.ndarray, batch_size: int) -> Callable[[], None]:
    """One epoch of a hand-written jitted step looped in Python, as a callable."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from p2p_fl.learn import build_model

    model = build_model(model_name, num_classes=2, in_channels=images.shape[-1], image_size=images.shape[1], seed=0)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, batch_stats, copy=True)
            logits = model(x, train=True, rngs=nnx.Rngs(dropout=key))
            loss = optax.sigmoid_binary_cross_entropy(logits[:, 0], y).mean()
            return loss, nnx.state(model, nnx.BatchStat)

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    num_batches = len(images) // batch_size
    batches = [(jnp.asarray(images[i * batch_size:(i + 1) * batch_size]),
                jnp.asarray(labels[i * batch_size:(i + 1) * batch_size], jnp.float32))
               for i in range(num_batches)]
    keys = jax.random.split(jax.random.key(0), num_batches)

    def epoch():
        nonlocal params, batch_stats, opt_state
        for (x, y), key in zip(batches, keys):
            params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y, key)
        loss.block_until_ready()

    return epoch


def learner_epoch(model_name: str, images: np.ndarray, labels: np.ndarray, batch_size: int,
                  augment: bool) -> Callable[[], None]:
    """One epoch of Learner.fit (data transfer included), as a callable."""
    from p2p_fl.learn import Learner

    learner = Learner(model_name, image_shape=images.shape[1:], batch_size=batch_size, augment=augment)
    return lambda: learner.fit(images, labels, epochs=1)


def median_seconds(epochs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per epoch of each callable after a warm-up (compiling) epoch.

    Repeats are interleaved so that a change of load on a shared machine affects every
    contender alike.
    """
    for epoch in epochs.values():
        epoch()
    seconds = {name: [] for name in epochs}
    for _ in range(repeats):
        for name, epoch in epochs.items():
            start = time.perf_counter()
            epoch()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def bench_train(quick: bool) -> Iterator[dict]:
    from p2p_fl.data import load_dataset
    from p2p_fl.learn import describe_backend

    models = ["small-cnn"] if quick else ["small-cnn", "seed-cnn"]
    count, repeats, batch = (1024, 3, 64) if quick else (2048, 5, 64)
    train = load_dataset("builtin:pneumoniamnist").train
    images, labels = train.images[:count], train.labels[:count]
    per_epoch = len(images) // batch * batch
    for model in models:
        seconds = median_seconds({
            "reference": reference_epoch(model, images, labels, batch),
            "learner": learner_epoch(model, images, labels, batch, augment=False),
            "learner_augment": learner_epoch(model, images, labels, batch, augment=True),
        }, repeats)
        common = {"reference_is": "plain jitted step looped in Python", "backend": describe_backend(),
                  "images_per_epoch": per_epoch, "batch_size": batch, "repeats": repeats}
        yield figure("train", f"train_throughput_{model}", per_epoch / seconds["learner"],
                     per_epoch / seconds["reference"], "images/s", **common)
        yield figure("train", f"train_throughput_augmented_{model}", per_epoch / seconds["learner_augment"],
                     per_epoch / seconds["reference"], "images/s", **common)



# What DP-SGD and FedProx cost per epoch.

def bench_dp(quick: bool) -> Iterator[dict]:
    import secrets

    from p2p_fl.data import load_dataset
    from p2p_fl.learn import DPConfig, Learner, describe_backend
    from p2p_fl.learn.privacy import batch_sampling, poisson_capacity

    models = ["small-cnn"] if quick else ["small-cnn", "seed-cnn"]
    count, batch, noise, mu = 1024, 64, 1.0, 0.01
    repeats = 3 if quick else 5
    train = load_dataset("builtin:pneumoniamnist").train
    images, labels = train.images[:count], train.labels[:count]
    rate, steps = batch_sampling(len(images), batch)
    shape = images.shape[1:]
    for model in models:
        learners = {
            "plain": Learner(model, image_shape=shape, batch_size=batch),
            "fedprox": Learner(model, image_shape=shape, batch_size=batch, prox_mu=mu),
            "dp": Learner(model, image_shape=shape, batch_size=batch, dp=DPConfig(noise_multiplier=noise),
                          training_secret=secrets.token_bytes(32)),
        }
        seconds = median_seconds({name: (lambda learner=learner: learner.fit(images, labels, epochs=1))
                                  for name, learner in learners.items()}, repeats)
        common = {"reference_is": "the plain epoch of Learner.fit, same model, data, batch and Adam",
                  "backend": describe_backend(), "images": len(images), "batch_size": batch, "repeats": repeats}
        yield figure("dp", f"dp_epoch_{model}", seconds["dp"], seconds["plain"], "s per epoch (median)",
                     noise_multiplier=noise, dp_steps=steps, dp_slots=poisson_capacity(len(images), rate), **common)
        yield figure("dp", f"fedprox_epoch_{model}", seconds["fedprox"], seconds["plain"], "s per epoch (median)",
                     prox_mu=mu, **common)

# Hand-off.

def model_weights(name: str) -> dict[str, np.ndarray]:
    """The real tensors of a model (names, shapes, values) as a site would send them."""
    from p2p_fl.learn import Learner

    return Learner(name).get_weights()


def time_peer_handoff(weights: dict, repeats: int, curve: bool) -> list[float]:
    """Seconds per hand-off (send, receive and check, ack) between two Peers on loopback."""
    import zmq

    from p2p_fl.launch import free_ports
    from p2p_fl.net import Curve, Peer, wire

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
    """Seconds per round trip of the payload through a bare DEALER/ROUTER pair (1-byte reply)."""
    import zmq

    from p2p_fl.launch import free_ports

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


def bench_handoff(quick: bool) -> Iterator[dict]:
    models, repeats = (["small-cnn"], 10) if quick else (["small-cnn", "seed-cnn"], 30)
    for model in models:
        weights = model_weights(model)
        payload = b"".join(np.ascontiguousarray(w).tobytes() for w in weights.values())
        secure = statistics.median(time_peer_handoff(weights, repeats, curve=True))
        plain = statistics.median(time_peer_handoff(weights, repeats, curve=False))
        raw = statistics.median(time_raw_socket(payload, repeats))
        common = {"bytes": len(payload), "tensors": len(weights), "repeats": repeats}
        yield figure("handoff", f"handoff_{model}", secure, raw, "s (median)",
                     reference_is="the same bytes through a bare DEALER/ROUTER pair", **common)
        yield figure("handoff", f"curve_vs_plain_{model}", secure, plain, "s (median)",
                     reference_is="the same hand-off without CURVE", **common)


# Masks.

def mask_rates(nbytes: int, peers: int, reps: int) -> dict[str, float]:
    """Median rates (MB/s) and per-repetition ratios for one vector size.

    Each repetition times the floor and ours back to back and the ratio is taken per
    repetition, so load from other processes affects both alike. Floors: update_into is
    AES-128-CTR over a zero buffer into a preallocated, already touched output (the cipher
    alone); update is the same returning fresh bytes.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from p2p_fl.federate import masks

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def aes():
        return Cipher(algorithms.AES(bytes(16)), modes.CTR(bytes(16))).encryptor()

    length = nbytes // 4
    zeros = bytearray(nbytes)
    out = bytearray(nbytes + 16)
    encoded = np.zeros(length, np.uint32)
    seed = bytes(range(32))
    pair_seeds = {f"peer{i}": bytes([i]) * 32 for i in range(peers)}
    rows = []
    for _ in range(reps):
        floor_into = timed(lambda: aes().update_into(zeros, out))
        floor_update = timed(lambda: aes().update(zeros))
        ours_prg = timed(lambda: masks.prg(seed, length))
        floor_many = timed(lambda: [aes().update_into(zeros, out) for _ in range(peers + 1)])
        ours_masked = timed(lambda: masks.masked_contribution(encoded, self_seed=seed, pair_seeds=pair_seeds, me="me"))
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


def bench_masks(quick: bool) -> Iterator[dict]:
    sizes, peers, reps = ([4], 9, 5) if quick else ([4, 16], 9, 15)
    for mib in sizes:
        r = mask_rates(mib << 20, peers, reps)
        common = {"mib": mib, "repeats": reps, "reference_is": "AES-128-CTR update_into a preallocated buffer"}
        yield figure("masks", f"mask_rate_{mib}MiB_{peers}peers", r["masked_keystream_MBps"],
                     r["floor_update_into_MBps"], "MB/s of keystream",
                     ratio_per_repeat=r["masked_vs_update_into"], **common)
        yield figure("masks", f"prg_rate_{mib}MiB", r["prg_MBps"], r["floor_update_into_MBps"], "MB/s",
                     ratio_per_repeat=r["prg_vs_update_into"], **common)


# Secure against plain round.

def time_secure_sum(models: dict[str, np.ndarray], repeats: int) -> tuple[float, float]:
    """(median s of one whole secure sum, median s of the plain average), one aggregator.

    The aggregator's neighbours are every other site (complete graph, FedAvg weights equal
    here); all parties' work is timed in one process, so it is the CPU a site spends per
    round (each site runs one sum as aggregator and joins its neighbours' sums).
    """
    import zmq

    from p2p_fl.federate import (JoinedRounds, complete, fixed_point_for, join, mix_with_own, shared_secrets_with,
                                 start_sum, weighted_average)

    names = sorted(models)
    me, members = names[0], names[1:]
    keys = {n: zmq.curve_keypair() for n in names}
    public = {n: k[0] for n, k in keys.items()}
    shared = {n: shared_secrets_with(keys[n][1], public, n) for n in names}
    graph = complete(names)
    weight = 1.0 / len(names)
    cfg = fixed_point_for(clip=16.0, num_contributions=len(members), total_weight=1.0)
    length = models[me].size

    def secure(round_: int):
        session = start_sum(federation="bench", round=round_, me=me, members=members,
                            weights={m: weight for m in members}, fixed_point=cfg, length=length)
        sessions = {}
        for m in members:
            sessions[m], reply = join(session.request, federation="bench", me=m, topology=graph, shared=shared[m],
                                      contribution=models[m], weight=weight, fixed_point=cfg, joined=JoinedRounds())
            session.receive(m, reply)
        announcements = session.announce()
        releases = {m: sessions[m].release(a) for m, a in announcements.items()}
        return mix_with_own(models[me], weight, session.finish(releases))

    def plain():
        return weighted_average([{"w": models[n]} for n in names], [weight] * len(names))["w"]

    np.testing.assert_allclose(secure(0), plain(), atol=1e-3)  # the same average, up to fixed point
    secure_s, plain_s = [], []
    for r in range(1, repeats + 1):
        t0 = time.perf_counter()
        secure(r)
        t1 = time.perf_counter()
        plain()
        secure_s.append(t1 - t0)
        plain_s.append(time.perf_counter() - t1)
    return statistics.median(secure_s), statistics.median(plain_s)


def bench_secure_round(quick: bool) -> Iterator[dict]:
    from p2p_fl.federate import flatten

    peer_counts, repeats = ([3, 10], 3) if quick else ([3, 5, 10, 20], 7)
    base, _ = flatten(model_weights("small-cnn"))
    rng = np.random.default_rng(0)
    for peers in peer_counts:
        models = {f"site-{i:02d}": (base + rng.normal(0, 0.01, base.size)).astype(np.float32) for i in range(peers)}
        secure, plain = time_secure_sum(models, repeats)
        yield figure("secure-round", f"secure_vs_plain_round_{peers}peers", secure, plain, "s per site per round (median)",
                     reference_is="plain weighted average of the same models", parameters=int(base.size),
                     peers=peers, repeats=repeats)


def _processes(nodes: list[dict]) -> list[dict]:
    """Each node process of a launch (result.json's "process", one per pid): its sites,
    start-up seconds and peak RSS (the highest its sites saw: the last to finish saw the
    whole run)."""
    by_pid: dict[int, dict] = {}
    for node in nodes:
        process = node.get("process")
        if process is not None:
            known = by_pid.setdefault(process["pid"], dict(process))
            known["peak_rss_mb"] = max(known["peak_rss_mb"], process["peak_rss_mb"])
    return list(by_pid.values())


# Scaling with peers.

def bench_scaling(quick: bool) -> Iterator[dict]:
    peer_counts, rounds = ([3, 5], 2) if quick else ([3, 5, 10, 20], 3)
    with tempfile.TemporaryDirectory(prefix="p2p-fl-bench-") as tmp:
        for protocol, template in (("cwt", "ring-3.toml"), ("gossip", "gossip-3.toml")):
            reference = None
            for peers in peer_counts:
                result = _scaling_run(Path(tmp) / f"{protocol}-{peers}", template, peers, rounds)
                reference = reference or result["round_s"]
                yield figure("scaling", f"round_wall_{protocol}_{peers}peers", result["round_s"], reference,
                             "s per round (cycle for cwt)", reference_is=f"{protocol} with {peer_counts[0]} peers",
                             peers=peers, rounds=rounds, peak_rss_mb_largest_node=result["peak_rss_mb"],
                             launcher_rss_mb=result["launcher_rss_mb"], run_wall_s=result["wall_s"],
                             train_images_per_site=SCALING_IMAGES_PER_SITE)


SCALING_IMAGES_PER_SITE = 128


def _scaling_run(out: Path, template: str, peers: int, rounds: int) -> dict:
    """One launch in a child process, so its nodes' peak RSS is that child's RUSAGE_CHILDREN."""
    spec = {"out": str(out), "template": template, "peers": peers, "rounds": rounds}
    proc = subprocess.run([sys.executable, "-c", "import sys, json; from p2p_fl.bench import _scaling_child; "
                           "print(json.dumps(_scaling_child(json.loads(sys.argv[1]))))", json.dumps(spec)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"scaling run {out.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _scaling_child(spec: dict) -> dict:
    import os
    import resource

    from rich.console import Console

    from p2p_fl.config import load_topology
    from p2p_fl.data import Dataset, Split, load_dataset, save_npz
    from p2p_fl.launch import run_launch, with_overrides

    out, peers = Path(spec["out"]), spec["peers"]
    out.mkdir(parents=True)
    full = load_dataset("builtin:pneumoniamnist")
    take = lambda split, n: Split(split.images[:n], split.labels[:n])  # noqa: E731
    n = SCALING_IMAGES_PER_SITE * peers
    data = save_npz(Dataset(take(full.train, n), take(full.val, n // 4), take(full.test, n // 4), 2, "bench"),
                    out / "data.npz")
    root = Path(__file__).resolve().parent.parent
    topology = with_overrides(load_topology(root / "topologies" / spec["template"]), peers=peers,
                              rounds=spec["rounds"], local_epochs=1, dataset=str(data))
    topology = dataclasses.replace(topology, data=dataclasses.replace(topology.data, test=""),
                                   training=dataclasses.replace(topology.training, batch_size=32, min_local_steps=0))
    with open(os.devnull, "w") as devnull:
        summary = run_launch(topology, out / "run", console=Console(file=devnull))
    round_s = _round_seconds(out / "run", [p.name for p in topology.peers])
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {"round_s": round_s, "wall_s": summary["wall_s"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 1e6,
            "launcher_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1e6}


def _round_seconds(run: Path, names: list[str]) -> float:
    """Seconds per round (a ring's cycle): the median over sites of the mean gap between
    the site's consecutive training ends.

    A site trains once per round (per cycle on a ring), so the gap is one round; gaps are
    taken on each node's own clock (its elapsed time), and leave out start-up and
    compilation.
    """
    per_site = []
    for name in names:
        ends = [json.loads(line).get("elapsed_s") for line in (run / name / "metrics.jsonl").read_text().splitlines()]
        ends = [e for e in ends if e is not None]
        if len(ends) >= 2:
            per_site.append((ends[-1] - ends[0]) / (len(ends) - 1))
    if not per_site:
        raise RuntimeError(f"{run}: no site trained two rounds")
    return statistics.median(per_site)


# The in-process engine.

def bench_inproc(quick: bool) -> Iterator[dict]:
    sites, rounds = (3, 2) if quick else (10, 10)
    with tempfile.TemporaryDirectory(prefix="p2p-fl-bench-") as tmp:
        central = _child({"kind": "centralized", "out": f"{tmp}/central", "epochs": rounds})
        secure = _child({"kind": "inproc", "out": f"{tmp}/secure", "template": "gossip-10.toml", "peers": sites,
                         "rounds": rounds, "secure": True, "chunked": False})  # full sums: the reference
        plain = _child({"kind": "inproc", "out": f"{tmp}/plain", "template": "gossip-10.toml", "peers": sites,
                        "rounds": rounds, "secure": False})
        chunked = _child({"kind": "inproc", "out": f"{tmp}/chunked", "template": "gossip-10.toml", "peers": sites,
                          "rounds": rounds, "secure": True, "chunked": True})
    common = {"peers": sites, "rounds": rounds, "local_epochs": 1, "partition": "iid"}
    yield figure("inproc", f"inproc_secure_gossip_{sites}sites_wall", secure["wall_s"], central["wall_s"], "s",
                 reference_is=f"centralized training, {rounds} epochs of the same images", **common,
                 peak_rss_mb=secure["peak_rss_mb"], reference_peak_rss_mb=central["peak_rss_mb"],
                 test_auc=secure["test_auc"], reference_test_auc=central["test_auc"])
    yield figure("inproc", f"inproc_secure_vs_plain_round_{sites}sites", secure["round_s"], plain["round_s"],
                 "s per round", reference_is="plain gossip, same settings, same engine", **common)
    yield figure("inproc", f"bytes_per_site_round_{sites}sites_complete", secure["bytes_per_site_round"],
                 secure["model_bytes"], "bytes", reference_is="the model's size", **common,
                 plain_bytes_per_site_round=plain["bytes_per_site_round"])
    # Chunked sums (gossip.chunked): the same federation as a reduce-scatter.
    yield figure("inproc", f"bytes_per_site_round_{sites}sites_complete_chunked", chunked["bytes_per_site_round"],
                 chunked["model_bytes"], "bytes", reference_is="the model's size", **common,
                 full_sums_bytes_per_site_round=secure["bytes_per_site_round"])
    yield figure("inproc", f"inproc_chunked_secure_vs_plain_round_{sites}sites", chunked["round_s"], plain["round_s"],
                 "s per round", reference_is="plain gossip, same settings, same engine", **common,
                 wall_s=chunked["wall_s"], test_auc=chunked["test_auc"])


def bench_inproc_large(quick: bool) -> Iterator[dict]:
    runs = [(10, 2), (30, 2)] if quick else [(10, 5), (100, 5), (1000, 3)]
    with tempfile.TemporaryDirectory(prefix="p2p-fl-bench-") as tmp:
        reference = None
        for sites, rounds in runs:
            # The engine's throughput: each site scores only its final model on the common
            # test set (data.score_last_rounds = 0); scoring the last rounds' models too is a
            # pass over the test set per site and round, which grows with the sites, not the
            # images (docs/results.md gives both).
            result = _child({"kind": "inproc", "out": f"{tmp}/k4-{sites}", "template": "gossip-10-k4.toml",
                             "peers": sites, "rounds": rounds, "secure": True, "score_last_rounds": 0})
            per_image = result["wall_s"] / result["images_trained"]
            reference = reference or per_image
            yield figure("inproc-large", f"inproc_secure_gossip_4regular_{sites}sites_time_per_image", per_image,
                         reference, "s per image trained", reference_is=f"the same with {runs[0][0]} sites",
                         peers=sites, rounds=rounds, score_last_rounds=0, peak_rss_mb=result["peak_rss_mb"],
                         wall_s=result["wall_s"],
                         round_s=result["round_s"], test_auc=result["test_auc"])
            if sites == runs[1][0]:  # what the secure sums cost at this size: the same run, plain
                plain = _child({"kind": "inproc", "out": f"{tmp}/k4-{sites}-plain", "template": "gossip-10-k4.toml",
                                "peers": sites, "rounds": rounds, "secure": False, "score_last_rounds": 0})
                yield figure("inproc-large", f"inproc_secure_vs_plain_round_{sites}sites_4regular", result["round_s"],
                             plain["round_s"], "s per round", reference_is="plain gossip, same settings, same engine",
                             peers=sites, rounds=rounds, wall_s=result["wall_s"], reference_wall_s=plain["wall_s"])


def bench_processes(quick: bool) -> Iterator[dict]:
    sites, rounds = (4, 2) if quick else (10, 3)
    common = {"kind": "launch", "template": "gossip-10.toml", "peers": sites, "rounds": rounds, "secure": True}
    with tempfile.TemporaryDirectory(prefix="p2p-fl-bench-") as tmp:
        inproc = _child({**common, "out": f"{tmp}/inproc", "engine": "inproc"})
        runs = {p: _child({**common, "out": f"{tmp}/p{p}", "engine": "process", "processes": p}) for p in (sites, 2)}
    shape = {"peers": sites, "rounds": rounds, "partition": "iid"}
    one_each = runs[sites]["processes"]
    yield figure("processes", f"process_engine_peak_rss_per_process_{sites}sites",
                 statistics.median(p["peak_rss_mb"] for p in one_each), inproc["peak_rss_mb"], "MB",
                 reference_is=f"the in-process engine's one process, all {sites} sites", **shape)
    for count, run in runs.items():
        yield figure("processes", f"process_engine_total_peak_rss_{sites}sites_{count}processes",
                     sum(p["peak_rss_mb"] for p in run["processes"]), inproc["peak_rss_mb"], "MB",
                     reference_is=f"the in-process engine's one process, all {sites} sites", processes=count, **shape)
        yield figure("processes", f"process_engine_round_{sites}sites_{count}processes", run["round_s"],
                     inproc["round_s"], "s per round", reference_is="the in-process engine, same run",
                     processes=count, wall_s=run["wall_s"], **shape)
    yield figure("processes", f"process_engine_startup_per_process_{sites}sites",
                 statistics.median(p["startup_s"] for p in one_each),
                 statistics.median(p["startup_s"] for p in runs[2]["processes"]), "s",
                 reference_is=f"the same with {sites // 2} sites in each of 2 processes", **shape)


def _child(spec: dict) -> dict:
    """One run in a child process of its own (`_child_run`): its RUSAGE_SELF is the run's."""
    proc = subprocess.run([sys.executable, "-c", "import sys, json; from p2p_fl.bench import _child_run; "
                           "print(json.dumps(_child_run(json.loads(sys.argv[1]))))", json.dumps(spec)],
                          capture_output=True, text=True, timeout=6 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench run {spec['out']} failed: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_run(spec: dict) -> dict:
    import os
    import resource

    from rich.console import Console

    from p2p_fl.config import load_topology
    from p2p_fl.learn.runtime import configure_jax

    configure_jax(cache_dir=os.environ.get("P2P_FL_XLA_CACHE"))
    root = Path(__file__).resolve().parent.parent
    out = Path(spec["out"])
    if spec["kind"] == "centralized":
        from p2p_fl.centralized import run_centralized

        topology = load_topology(root / "topologies" / "gossip-10.toml")
        summary = run_centralized(topology, out, epochs=spec["epochs"])
        result = {"wall_s": summary["wall_s"], "test_auc": summary["final"]["test_auc"]}
    else:  # a launch, in process (kind "inproc") or with the process engine (kind "launch")
        from p2p_fl.launch import run_launch, with_overrides

        topology = with_overrides(load_topology(root / "topologies" / spec["template"]), peers=spec["peers"],
                                  rounds=spec["rounds"], local_epochs=1)
        topology = dataclasses.replace(
            # Engines and sums are measured, not the head refit: its rounds would count as rounds.
            topology, gossip=dataclasses.replace(topology.gossip, secure=spec["secure"], head_refit_steps=0,
                                                 chunked=spec.get("chunked", topology.gossip.chunked)),
            training=dataclasses.replace(topology.training, min_local_steps=0),
            data=dataclasses.replace(topology.data, score_last_rounds=spec.get("score_last_rounds",
                                                                               topology.data.score_last_rounds)))
        with open(os.devnull, "w") as devnull:
            summary = run_launch(topology, out, console=Console(file=devnull), engine=spec.get("engine", "inproc"),
                                 processes=spec.get("processes"))
        names = [p.name for p in topology.peers]
        nodes = summary["nodes"]
        model_bytes = sum(a.nbytes for a in np.load(out / names[0] / "final_model.npz").values())
        result = {"wall_s": summary["wall_s"], "test_auc": summary["final"]["test_auc"],
                  "round_s": _round_seconds(out, names),
                  "images_trained": sum(n["samples"] for n in nodes) * spec["rounds"],
                  "bytes_per_site_round": statistics.median(n["bytes_sent"] for n in nodes) / spec["rounds"],
                  "model_bytes": model_bytes, "processes": _processes(nodes)}
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {**result, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1e6}
