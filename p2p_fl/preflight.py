"""`p2p-fl check`: a site's preflight, without training.

Everything a node would refuse at start is checked the same way (the topology, the key, the
data, the port: the same code as `p2p-fl node`), then the site listens on its address and
heartbeats every peer over CurveZMQ for a while: a peer is "ready" once its heartbeat came
through the handshake with the topology's key and the same federation fingerprint. A peer
answers whether it runs its node (waiting in its start window) or its own check; a check's
heartbeats are marked, so no running node counts the checking site as started.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from p2p_fl.config import Topology
from p2p_fl.fingerprint import Fingerprint
from p2p_fl.net import Curve, Peer

POLL_S = 0.1


@dataclass(frozen=True)
class PeerCheck:
    name: str
    address: str
    state: str  # "ready" | "other setup" | "no answer"
    detail: str


def check_peers(topology: Topology, name: str, fingerprint: Fingerprint, curve: Curve | None, *,
                wait_s: float, tensor_spec, on_ready: Callable[[PeerCheck], None] = lambda c: None) -> list[PeerCheck]:
    """Listens on this site's address and heartbeats every peer until each answered or
    `wait_s` went by; returns one PeerCheck per peer, in topology order.

    Raises:
        zmq.ZMQError: this site's address cannot be bound (the caller says why in one line).
    """
    me = topology.peer(name)
    others = {p.name: p.address for p in topology.peers if p.name != name}
    net = topology.network
    peer = Peer(name, me.address, others, topology.federation, tensor_spec, curve=curve,
                max_message_bytes=net.max_message_mb * 2**20, heartbeat_interval_s=net.heartbeat_interval_s,
                peer_timeout_s=net.peer_timeout_s, fingerprint=fingerprint, preflight=True)
    reported: set[str] = set()
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and len(reported) < len(others):
            peer.pulse(0)
            peer.receive(POLL_S)
            for other in others:
                if other not in reported and (other in peer.peer_progress or _known_mismatch(peer, other)):
                    reported.add(other)
                    on_ready(_verdict(peer, other, others[other]))
        return [_verdict(peer, other, address) for other, address in others.items()]
    finally:
        peer.close()


def _known_mismatch(peer: Peer, other: str) -> bool:
    return other in peer.mismatched and peer.mismatched[other] != ["(not yet known)"]


def _verdict(peer: Peer, other: str, address: str) -> PeerCheck:
    if other in peer.mismatched:
        return PeerCheck(other, address, "other setup", f"{', '.join(peer.mismatched[other])} differ(s) from this site's")
    if other in peer.peer_progress:
        return PeerCheck(other, address, "ready", "its heartbeats reach this site, authenticated by its key, under the same federation setup")
    return PeerCheck(other, address, "no answer", "not started, unreachable from here (address, firewall), or it "
                     "does not hold the key the topology lists for it")
