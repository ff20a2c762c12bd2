"""A node's checkpoint: one .npz file written atomically (write, fsync, rename).

Holds JSON-able state (under the key `state.json`, as bytes) and named arrays: the learner's
state (weights, optimiser, RNG, privacy spent) and the protocol's (round, the models it must
not lose, the secure sums it joined). A `kill -9` at any moment leaves either the previous
checkpoint or the new one, never a torn file; no pickle is ever read back. The file is the
owner's alone (0600).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

FILENAME = "checkpoint.npz"
_STATE_KEY = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says what to do."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a folder gone): the node stops before
    anything that depends on it leaves, and resumes from its last good one once restarted."""


def save_checkpoint(path: Path, state: dict, arrays: dict[str, np.ndarray], *, durable: bool = True) -> None:
    """Writes `state` and `arrays` to `path` atomically; `durable`: on disk (fsync) when it
    returns, as a node needs against power loss (a simulation, which loses only its own
    process, writes without)."""
    if _STATE_KEY in arrays:
        raise ValueError(f"array name {_STATE_KEY!r} is reserved")
    tmp = path.with_name(path.name + ".tmp")
    payload = np.frombuffer(json.dumps(state).encode(), np.uint8)
    tmp.unlink(missing_ok=True)  # a write a kill -9 interrupted
    # Private from its creation (it holds the site's own, unmasked model), and never through
    # a file or link someone else put there.
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise CheckpointWriteError(f"cannot write the checkpoint {path}: {err}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # exact, whatever the umask
            np.savez(f, **{_STATE_KEY: payload}, **arrays)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"cannot write the checkpoint {path}: {err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def load_checkpoint(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(state, arrays) from a file `save_checkpoint` wrote; CheckpointError if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        state = json.loads(arrays.pop(_STATE_KEY).tobytes())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err}); move it away to start afresh") from None
    return state, arrays


def split_prefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays under `prefix/`, with the prefix removed."""
    return {name[len(prefix) + 1:]: a for name, a in arrays.items() if name.startswith(prefix + "/")}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
