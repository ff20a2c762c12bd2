"""What the end-to-end tests share: running the `p2p-fl` command and making small shards."""

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import zmq

from p2p_fl.data import Dataset, Split, load_dataset, partition_dataset, save_npz

ROOT = Path(__file__).resolve().parent.parent


def p2p_fl(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`python -m p2p_fl ARGS` from the repository root, output captured; `env`: variables
    added to this process's environment."""
    return subprocess.run([sys.executable, "-m", "p2p_fl", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=None if env is None else {**os.environ, **env})


def small_shards(folder: Path, sites, *, train: int, val: int, test: int) -> dict[str, Path]:
    """IID shards of the first images of the embedded data, one .npz per site (fast to train)."""
    full = load_dataset("builtin:pneumoniamnist")
    take = lambda split, n: Split(split.images[:n], split.labels[:n])  # noqa: E731
    small = Dataset(take(full.train, train), take(full.val, val), take(full.test, test), 2, "small",
                    class_names=full.class_names)
    parts = partition_dataset(small, len(sites), "iid", seed=0)
    return {site: save_npz(shard, folder / f"{site}.npz") for site, shard in zip(sites, parts)}


def small_dataset(path: Path, *, train: int, val: int, test: int) -> Path:
    """The first images of the embedded data as one .npz, for `launch --data` (fast to train)."""
    full = load_dataset("builtin:pneumoniamnist")
    take = lambda split, n: Split(split.images[:n], split.labels[:n])  # noqa: E731
    return save_npz(Dataset(take(full.train, train), take(full.val, val), take(full.test, test), 2, "small",
                    class_names=full.class_names), path)


# Test shards are a few batches a site: the default `training.min_local_steps` (16 steps a
# round) would make every round of a test federation 4 to 16 epochs, a third of the suite's
# time, for tests of protocols rather than of accuracy. Test federations train the epochs
# they ask for unless they set it (tests/test_local_steps.py checks the setting itself).
AS_GIVEN = "min_local_steps = 0"


def epochs_as_given(settings: str) -> str:
    """`settings` (topology TOML) with `min_local_steps = 0` unless it sets min_local_steps."""
    if re.search(r"(?m)^min_local_steps\s*=", settings):
        return settings
    if re.search(r"(?m)^\[training\]\s*$", settings):
        return re.sub(r"(?m)^\[training\]\s*$", f"[training]\n{AS_GIVEN}", settings, count=1)
    return f"{settings}\n[training]\n{AS_GIVEN}\n"


def shipped_topology(folder: Path, name: str, **replace: str) -> Path:
    """A copy of topologies/NAME in folder training the epochs it asks for (`epochs_as_given`),
    then each `old=new` of `replace` applied (each must occur; "min_local_steps = 0" can be
    replaced too)."""
    text = (ROOT / "topologies" / name).read_text()
    text = epochs_as_given(re.sub(r"(?m)^min_local_steps\s*=\s*\d+", AS_GIVEN, text))
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def write_federation(folder: Path, sites, settings: str, *, federation: str) -> Path:
    """A topology for `sites` on free loopback ports with fresh CURVE keys under folder/keys;
    `settings` is the TOML of its other sections (`epochs_as_given` applied). Returns the
    topology's path."""
    from p2p_fl.launch import free_ports
    from p2p_fl.net import generate_keypair, load_public_key

    settings = epochs_as_given(settings)
    folder.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(sites, free_ports(len(sites))))
    peers = ""
    for n in sites:
        if not (folder / "keys" / f"{n}.key").exists():
            generate_keypair(folder / "keys", n)
        peers += (f'[[peers]]\nname = "{n}"\naddress = "tcp://127.0.0.1:{ports[n]}"\n'
                  f'public_key = "{load_public_key(folder / "keys" / f"{n}.key")}"\n')
    config = folder / "topology.toml"
    config.write_text(f'federation = "{federation}"\n{settings}\n{peers}')
    return config


def start_node(config: Path, name: str, data: Path, out: Path, *, num_nodes: int) -> subprocess.Popen:
    """`p2p-fl node --events` for one site (keys beside the topology); its JSON progress
    events come on stdout, its log is appended to out/node.log (a restart keeps the first)."""
    from p2p_fl.launch import node_env

    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "p2p_fl", "node", "--config", str(config), "--name", name, "--data", str(data),
         "--key", str(config.parent / "keys" / f"{name}.key_secret"), "--out", str(out), "--events"],
        cwd=ROOT, env=node_env(num_nodes), stdout=subprocess.PIPE, stderr=open(out / "node.log", "ab"), text=True)


def run_nodes(config: Path, shards: dict[str, Path], out: Path, *, timeout=300) -> dict[str, str]:
    """Runs one `start_node` per site to the end; returns each site that failed -> its log's tail."""
    procs = {n: start_node(config, n, data, out / n, num_nodes=len(shards)) for n, data in shards.items()}
    try:
        for proc in procs.values():
            proc.communicate(timeout=timeout)  # reads the events, so no pipe fills up
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {n: (out / n / "node.log").read_text()[-2000:] for n, proc in procs.items() if proc.returncode != 0}


def finish_all(procs: dict[str, subprocess.Popen], timeout=300) -> dict[str, tuple[int, str, str]]:
    """Waits for every process (reading its pipes, so none fills up); kills what is left on
    the way out, whatever happens. Returns name -> (exit code, stdout, stderr)."""
    done = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=timeout)
            done[name] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def wait_listening(port: int, procs: list[subprocess.Popen], timeout_s: float = 120) -> None:
    """Returns once something accepts TCP connections on the loopback `port`; AssertionError
    if one of `procs` exits first or nothing listens within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on port {port}")


@contextlib.contextmanager
def zmq_context():
    """A ZeroMQ context for a test's own sockets that cannot hang the suite: its sockets
    linger 0 unless a close says otherwise, and it is destroyed (linger 0) however the test
    ends. (A context left to the garbage collector terms in some later test, and blocks
    there forever on a socket with unsent messages and unbounded linger.)"""
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)
