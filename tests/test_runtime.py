"""Process-wide runtime settings (learn/runtime.py), each checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from processes import shipped_topology, small_dataset

# Bytes glibc holds in separately mapped blocks (mallinfo2's hblkhd) grow by a large
# array's size when the array is mapped on its own, and not at all when the heap serves it.
_MALLINFO = """
import ctypes, sys
import numpy as np

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_growth():
    before = libc.mallinfo2().hblkhd
    block = np.ones(96 << 20, np.uint8)  # over glibc's largest default threshold, 32 MB
    grown = libc.mallinfo2().hblkhd - before
    del block
    return grown
"""

# The function alone: the block before it, what it says, the block after it.
_KEEP = _MALLINFO + """
from p2p_fl.learn.runtime import keep_freed_memory
default = mapped_growth()
print(default, keep_freed_memory(), mapped_growth())
"""

# A launch on the in-process engine after configure_jax (what every command runs first):
# the block before the launch and after it.
_ENGINE = _MALLINFO + """
import os
from pathlib import Path
from rich.console import Console
from p2p_fl.config import load_topology
from p2p_fl.launch import run_launch, with_overrides
from p2p_fl.learn.runtime import configure_jax

configure_jax()
before = mapped_growth()
topology = with_overrides(load_topology(Path(sys.argv[1])), peers=3, rounds=1, local_epochs=1)
with open(os.devnull, "w") as devnull:
    run_launch(topology, Path(sys.argv[2]), console=Console(file=devnull), engine="inproc")
print(before, mapped_growth())
"""


def _glibc_with_mallinfo2() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return False
    return True


needs_glibc = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")


@needs_glibc
def test_large_blocks_are_served_from_the_kept_heap_after_keep_freed_memory():
    # Without it every XLA:CPU call maps its temporaries afresh and page-faults them in
    # (a third of a small site's training step); with it the heap keeps and reuses them.
    out = subprocess.run([sys.executable, "-c", _KEEP], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    default_growth, applied, kept_growth = int(out[0]), out[1], int(out[2])
    assert default_growth >= 96 << 20  # glibc's default: a block of its own
    assert applied == "True"
    assert kept_growth == 0


@needs_glibc
def test_a_process_hosting_several_sites_keeps_freed_memory_and_a_plain_process_does_not(tmp_path):
    # configure_jax alone (what a one-site node runs) leaves glibc's defaults: a node's
    # memory is what a hospital's machine counts; the in-process engine keeps the blocks.
    data = small_dataset(tmp_path / "data.npz", train=120, val=30, test=30)
    topology = shipped_topology(tmp_path, "gossip-3.toml", **{
        'dataset = "builtin:pneumoniamnist"': f'dataset = "{data}"', 'test = "builtin:pneumoniamnist"': 'test = ""'})
    out = subprocess.run([sys.executable, "-c", _ENGINE, str(topology), str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = (int(x) for x in out.stdout.split()[-2:])
    assert before >= 96 << 20
    assert after == 0
