"""Process-wide runtime settings (learn/runtime.py), each checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Bytes glibc holds in separately mapped blocks (mallinfo2's hblkhd) grow by a large
# array's size when the array is mapped on its own, and not at all when the heap serves it.
_MAPPED_GROWTH = """
import ctypes, numpy as np
import sys
from p2p_fl.learn import runtime

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

default = mapped_growth()
applied = runtime.configure_jax() if sys.argv[1] == "configure_jax" else runtime.keep_freed_memory()
print(default, applied, mapped_growth())
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


def _growths(setting: str) -> tuple[int, str, int]:
    out = subprocess.run([sys.executable, "-c", _MAPPED_GROWTH, setting], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return int(out[0]), out[1], int(out[2])


@needs_glibc
def test_large_blocks_are_served_from_the_kept_heap_after_keep_freed_memory():
    # Without it every XLA:CPU call maps its temporaries afresh and page-faults them in
    # (a third of a small site's training step); with it the heap keeps and reuses them.
    default_growth, applied, kept_growth = _growths("keep_freed_memory")
    assert default_growth >= 96 << 20  # glibc's default: a block of its own
    assert applied == "True"
    assert kept_growth == 0


@needs_glibc
def test_configure_jax_keeps_freed_memory():
    # Every command sets JAX up through configure_jax (cli._setup_runtime, bench's runs).
    default_growth, _, kept_growth = _growths("configure_jax")
    assert default_growth >= 96 << 20
    assert kept_growth == 0
