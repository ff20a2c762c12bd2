"""What the end-to-end tests share: running the `p2p-fl` command and making small shards."""

import subprocess
import sys
from pathlib import Path

from p2p_fl.data import Dataset, Split, load_dataset, partition_dataset, save_npz

ROOT = Path(__file__).resolve().parent.parent


def p2p_fl(*args, timeout=600) -> subprocess.CompletedProcess:
    """`python -m p2p_fl ARGS` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "p2p_fl", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def small_shards(folder: Path, sites, *, train: int, val: int, test: int) -> dict[str, Path]:
    """IID shards of the first images of the embedded data, one .npz per site (fast to train)."""
    full = load_dataset("builtin:pneumoniamnist")
    take = lambda split, n: Split(split.images[:n], split.labels[:n])  # noqa: E731
    small = Dataset(take(full.train, train), take(full.val, val), take(full.test, test), 2, "small")
    parts = partition_dataset(small, len(sites), "iid", seed=0)
    return {site: save_npz(shard, folder / f"{site}.npz") for site, shard in zip(sites, parts)}


def small_dataset(path: Path, *, train: int, val: int, test: int) -> Path:
    """The first images of the embedded data as one .npz, for `launch --data` (fast to train)."""
    full = load_dataset("builtin:pneumoniamnist")
    take = lambda split, n: Split(split.images[:n], split.labels[:n])  # noqa: E731
    return save_npz(Dataset(take(full.train, train), take(full.val, val), take(full.test, test), 2, "small"), path)
