"""Process-wide JAX settings: XLA threads and the persistent compilation cache; and, for
processes that host several sites, how freed memory is kept.

Call ``configure_jax`` once, at process start, before the first JAX
computation: XLA reads its thread count when the backend initialises.

Example:
    >>> configure_jax(threads=1, cache_dir="/tmp/p2p_fl_xla_cache")  # doctest: +SKIP
    >>> describe_backend()                                           # doctest: +SKIP
    'cpu x1'
"""

from __future__ import annotations

import ctypes
import os
import sys

import jax
from jax._src import xla_bridge  # backends_are_initialized has no public alias.

# XLA:CPU sizes its intra-op thread pool from this variable when the backend
# initialises. Measured with jax 0.10: NPROC=1 holds a process to one core,
# while --xla_cpu_multi_thread_eigen=false leaves matrix products threaded.
_THREADS_ENV = "NPROC"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Freed memory up to this size stays mapped in the process (see keep_freed_memory).
KEPT_FREED_BYTES = 1 << 30


def configure_jax(threads: int | None = None, cache_dir: str | None = None) -> None:
    """Limits XLA's CPU threads and shares compiled programs between processes.

    Args:
      threads: intra-op threads of the XLA CPU backend; None leaves XLA's
        default (one per core). With many local peers on few cores, 1 per
        process avoids oversubscription.
      cache_dir: directory of JAX's persistent compilation cache. Processes
        that share it compile each program once; every program is cached,
        however small or quick to compile, since a node compiles the same
        few programs and CPU compiles are short but add up at start-up.

    Raises:
      ValueError: threads < 1.
      RuntimeError: threads given after the JAX backend was initialised
        (the first computation or device query), when it can no longer apply.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if xla_bridge.backends_are_initialized():
            raise RuntimeError("configure_jax(threads=...) must run before the first JAX "
                               "computation; call it at process start")
        os.environ[_THREADS_ENV] = str(threads)
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def keep_freed_memory() -> bool:
    """Makes glibc keep freed blocks of up to ``KEPT_FREED_BYTES`` for reuse.

    By default glibc maps every block over 32 MB afresh and unmaps it when freed. XLA:CPU
    allocates each run's temporaries as such a block (one training step of small-cnn on
    64 images: about 57 MB), so every jitted call paid the page faults of touching it
    again: 12 of the 35 ms of a one-step epoch on this project's 2-core machine, a third
    of a small site's training. Kept, the next call reuses the pages already in place.

    For processes that host several sites (the in-process engine, a process of a group),
    whose many short calls paid it most: their peak RSS did not grow (100 and 1,000
    sites). A one-site node keeps glibc's defaults: its rounds are scans of many steps,
    which paid it once a call, and its memory is the figure a hospital's machine counts
    (docs/results.md).

    Returns:
      True where it applied (Linux with glibc); elsewhere nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl): its own allocator
        return False
    # The trim threshold too: a freed block at the heap's top beyond it would be returned.
    return bool(mallopt(_M_MMAP_THRESHOLD, KEPT_FREED_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, KEPT_FREED_BYTES))


def describe_backend() -> str:
    """Short description of the default JAX backend, e.g. 'cpu x2' or 'gpu NVIDIA H100'.

    Initialises the backend: call ``configure_jax`` first.

    Returns:
      For the CPU, 'cpu x<threads>' (the NPROC limit, else the usable cores);
      otherwise the platform and the first device's kind, with ' x<n>' when
      there are several devices.
    """
    devices = jax.devices()
    if devices[0].platform == "cpu":
        threads = os.environ.get(_THREADS_ENV) or _usable_cores()
        return f"cpu x{threads}"
    description = f"{devices[0].platform} {devices[0].device_kind}"
    return description + (f" x{len(devices)}" if len(devices) > 1 else "")


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: respects taskset and cgroups' cpusets.
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
