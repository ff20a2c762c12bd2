"""What every test module shares: a ZeroMQ context that cannot hang the suite, the `pure`
marker, and the compilation cache the `p2p-fl` commands use.

`pytest -m pure` runs the pure layers alone, in seconds: configuration, data partitioning,
the federate math, the wire format, keys, and the protocols as state machines (no process,
no socket, no training).
"""

import os

import pytest
from processes import zmq_context as _zmq_context

from p2p_fl.launch import XLA_CACHE_DIR

# The programs the tests train in this process are compiled once and then read from the
# cache every `p2p-fl` command shares (learn/runtime.py's settings, given to JAX through its
# environment before JAX is imported): test_train_together.py took 100 s cold, 39 s warm.
for _option, _value in (("JAX_COMPILATION_CACHE_DIR", os.environ.get("P2P_FL_XLA_CACHE", str(XLA_CACHE_DIR))),
                        ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                        ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")):
    os.environ.setdefault(_option, _value)

PURE_MODULES = {
    "test_config", "test_data_partition", "test_federate_doctests", "test_federate_fixed_point",
    "test_federate_flat", "test_federate_masks", "test_federate_mixing", "test_federate_robust",
    "test_federate_secure_sum", "test_federate_shares", "test_net_keys", "test_net_wire",
    "test_net_wire_fuzz", "test_protocol_gossip", "test_protocol_ring", "test_views", "test_chaos",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        # A slow test of a pure module (test_chaos's real trial) is not pure: `-m pure`
        # replaces the default `-m 'not slow'` and would otherwise run it.
        if item.module.__name__ in PURE_MODULES and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.pure)


@pytest.fixture
def zmq_context():
    """A context whose sockets linger 0 and which is destroyed when the test ends, whatever happened."""
    with _zmq_context() as ctx:
        yield ctx
