"""Files a reader must never see half-written: the one way to write them.

(Checkpoints have their own, stricter writer in checkpoint.py: created private, fsynced.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a file beside `path`, which then replaces `path` at once; a
    failed write leaves `path` as it was and no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))


def write_npz(path: Path, arrays: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    write_atomic(path, write)
