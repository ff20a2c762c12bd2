"""A node's ZeroMQ endpoint: one ROUTER it binds for everything it receives, and one
DEALER per peer it sends to. All traffic into a node arrives on its ROUTER, so one poll
serves every protocol; replies (acks) travel back over the replier's own DEALER.

The peer knows bytes and frames, not models: it encodes and checks messages with `wire`
and counts what it sent, received and dropped.

What one peer, even one holding a valid key (an insider), can cost this node is bounded:

* time: one `receive` reads at most `Limits.per_receive` messages and returns after
  `Limits.receive_budget_s`, so the node's loop gets back to its heartbeats; the ROUTER
  reads its connections in turn (libzmq fair-queues them message by message);
* rate: every authenticated sender has a token bucket of messages and of bytes; over its
  rate its messages are dropped undecoded and counted, and a sender that keeps it up is
  quarantined (all of its messages dropped undecoded) for `Limits.quarantine_s`;
* memory: a frame may be no larger than the model needs (ZMQ_MAXMSGSIZE) and a message
  have no more frames than the largest legitimate one. libzmq keeps a multipart message
  out of sight until its last frame arrived (ZMQ_RCVHWM counts whole messages, and
  ZMQ_MAXMSGSIZE checks each frame alone), so a connection that holds more bytes than it
  has delivered as messages, beyond `Limits.inflight_bytes`, is cut by a watcher thread;
* file descriptors: the soft limit is raised to the hard one, an unauthenticated
  connection must finish its handshake within `Limits.handshake_timeout_s`, and when too
  many connections sit without ever delivering a message the oldest are cut;
* the log: each reason for dropping is logged a few times per `LOG_WINDOW_S`, then one
  summary line with the counts; `dropped` counts every one (it ends up in result.json).
"""

from __future__ import annotations

import collections
import logging
import resource
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from p2p_fl.net import wire
from p2p_fl.net.drops import DropLog
from p2p_fl.net.heartbeat import Heartbeats

if TYPE_CHECKING:  # the net layer only calls it; importing it would import the config layer
    from p2p_fl.fingerprint import Fingerprint

log = logging.getLogger(__name__)

# Queue depth per connection; a model is one message, so a few suffice and memory stays bounded.
SEND_HWM = 64
RECEIVE_HWM = 64  # complete messages libzmq queues per inbound connection before it stops reading it
LINGER_MS = 2000
ZAP_DOMAIN = "p2p_fl"
# Bytes a frame takes on the wire beyond its payload (ZMTP header, CurveZMQ MESSAGE box): at most
# 9 + 33; and what a handshake may have sent before the first message (greeting, HELLO, INITIATE).
FRAME_OVERHEAD = 64
HANDSHAKE_BYTES = 4096
LOG_KEYS = 16  # distinct unknown keys whose refusal is logged by name
SETUP_WARNINGS = 3  # changes of one peer's federation setup logged; later ones only counted
WATCH_TICK_S = 0.02  # how often the watcher thread looks at the connections
WATCH_PER_TICK = 256  # connections it measures per tick (in turn when there are more)
IDLE_CUT_EVENTS_S = 10.0  # a cut idle connection's failed handshake is reported within this
_TCP_INFO_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in Linux's struct tcp_info (>= 4.1)
_MONITOR_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_MONITOR_STOPPED)


@dataclass(frozen=True)
class Curve:
    """CURVE identities: this node's key pair and the public key of every peer, by name."""

    public: str
    secret: str
    peer_keys: Mapping[str, str]


@dataclass(frozen=True)
class Limits:
    """What one peer may cost this node. The defaults are far above what any protocol sends
    (a few messages per round and peer, a heartbeat per interval) and far below a flood."""

    messages_per_s: float = 200.0  # per sender, sustained
    burst_messages: int = 1000  # per sender, at once (a restarted peer's queue, resends)
    models_per_s: float = 8.0  # bytes per sender and second, in largest legitimate messages
    burst_models: float = 32.0
    quarantine_after: int = 1000  # messages over the rate (less the rate since): then quarantined
    quarantine_s: float = 5.0  # capped at half the peer timeout: a flood alone makes no site dead
    per_receive: int = 256  # messages one `receive` reads at most
    receive_budget_s: float = 0.05  # and the time it spends reading
    handshake_timeout_s: float = 5.0  # ZMQ_HANDSHAKE_IVL: an idle or slow connection is closed
    # Bytes a connection may hold in libzmq (received, not yet read as messages); None: 32 MiB
    # + 8 largest legitimate messages; 0: not watched.
    inflight_bytes: int | None = None
    # Connections that never delivered a message, beyond which the oldest are cut; None:
    # a quarter of the file descriptor limit (at least 64, at most 4096); 0: not watched.
    idle_connections: int | None = None


class _TokenBucket:
    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now


class _SenderBudget:
    """One sender's message and byte buckets, and its quarantine."""

    def __init__(self, limits: Limits, unit_bytes: int, quarantine_s: float, now: float):
        self.messages = _TokenBucket(limits.messages_per_s, limits.burst_messages, now)
        self.bytes = _TokenBucket(limits.models_per_s * unit_bytes, limits.burst_models * unit_bytes, now)
        self.quarantine_after = limits.quarantine_after
        self.quarantine_s = quarantine_s
        self.over, self.over_at = 0.0, now  # messages over the rate, draining at the rate
        self.until = float("-inf")  # quarantined until then
        self.seen = now

    def admit(self, nbytes: int, now: float) -> str | None:
        """None if the message may be decoded, else the reason to drop it undecoded."""
        self.seen = now
        if now < self.until:
            return "quarantined"
        self.messages.refill(now)
        self.bytes.refill(now)
        # Messages over the rate pile up in `over`, which drains at the message rate: a
        # sender that keeps sending faster than it may is quarantined.
        self.over = max(0.0, self.over - (now - self.over_at) * self.messages.rate)
        self.over_at = now
        if self.messages.tokens >= 1 and self.bytes.tokens >= nbytes:
            self.messages.tokens -= 1
            self.bytes.tokens -= nbytes
            return None
        self.over += 1
        if self.over >= self.quarantine_after:
            self.over = 0.0
            self.until = now + self.quarantine_s
        return "rate-limited"


class _TopologyAuthenticator(ThreadAuthenticator):
    """ZAP handler admitting only the topology's keys; the User-Id it sets is the peer's name.

    A refused key is counted on every attempt and logged once (a refused client keeps
    reconnecting, and one line per attempt would flood the log), for the first LOG_KEYS keys.
    """

    def __init__(self, context: zmq.Context, names_by_key: Mapping[str, str], drops: DropLog, node: str):
        super().__init__(context, log=logging.getLogger(__name__ + ".zap"))
        self._names_by_key = dict(names_by_key)
        self._drops = drops
        self._node = node
        self._logged: set[str] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        z85_key = key.decode("ascii")
        if z85_key in self._names_by_key:
            return True
        self._drops.drop("unknown-key", None)
        if z85_key not in self._logged and len(self._logged) < LOG_KEYS:
            self._logged.add(z85_key)
            log.warning("%s: refused connection from unknown key %s", self._node, z85_key)
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names_by_key[z85.encode(client_public_key).decode("ascii")]


def raise_fd_limit() -> int:
    """Raises this process's soft limit of open files to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (hard, 1 << 20, 1 << 16):
        if target == resource.RLIM_INFINITY or (soft != resource.RLIM_INFINITY and target <= soft):
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            continue
    return soft


class _ConnectionWatch(threading.Thread):
    """Reads the ROUTER's monitor socket and watches its inbound TCP connections.

    Counts failed handshakes (a client without CURVE, a port scanner, an idle connection
    timed out); cuts (shutdown(2) of its file descriptor, which libzmq sees as the peer
    hanging up, dropping any half-received message) a connection holding more than
    `inflight_bytes` bytes it received but has not delivered as messages, and the oldest
    connections that never delivered a message when there are more than `idle_limit`.
    """

    def __init__(self, monitor: zmq.Socket, drops: DropLog, inflight_bytes: int, idle_limit: int):
        super().__init__(name="p2p-fl-connection-watch", daemon=True)
        self._monitor = monitor
        self.port = -1  # the ROUTER's, once bound
        self._drops = drops
        self._inflight_bytes = inflight_bytes
        self._idle_limit = idle_limit
        self._stop_event = threading.Event()
        self._accepted: dict[int, float] = {}  # fd -> accepted at (monotonic)
        self._cut: set[int] = set()
        self._cut_handshakes = 0  # idle connections cut whose failed handshake is still to be reported
        self._last_idle_cut = float("-inf")
        self._turn = 0
        # fd -> wire bytes delivered as messages; written by the receiving thread.
        self.delivered: dict[int, int] = {}
        if inflight_bytes and not (sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")):
            log.warning("connection watch: no TCP_INFO on %s; per-connection memory is not watched", sys.platform)
            self._inflight_bytes = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                if self._monitor.poll(int(WATCH_TICK_S * 1000)):
                    for _ in range(4096):
                        try:
                            event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if not self._on_event(event):
                            return
                self._check(time.monotonic())
        except zmq.ZMQError:
            pass  # the context is going away
        finally:
            self._monitor.close(linger=0)

    def _on_event(self, event: dict) -> bool:
        kind, value = event["event"], int(event["value"])
        if kind == zmq.EVENT_MONITOR_STOPPED:
            return False
        if kind == zmq.EVENT_ACCEPTED:
            self._accepted[value] = time.monotonic()
            self.delivered[value] = 0
            self._cut.discard(value)
        elif kind == zmq.EVENT_DISCONNECTED:
            self._accepted.pop(value, None)
            self.delivered.pop(value, None)
            self._cut.discard(value)
        elif (kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self._cut_handshakes > 0
              and time.monotonic() - self._last_idle_cut < IDLE_CUT_EVENTS_S):
            self._cut_handshakes -= 1  # one we cut as idle, already counted
        else:  # a handshake that failed: no CURVE, not ZMTP at all, or too slow
            self._drops.drop("plaintext-or-bad-handshake", f"a connection failed its handshake: {_handshake_failure(kind, value)}")
        return True

    def _check(self, now: float) -> None:
        if self._inflight_bytes and self._accepted:
            fds = list(self._accepted)
            if len(fds) > WATCH_PER_TICK:  # measure them in turn
                self._turn = (self._turn + WATCH_PER_TICK) % len(fds)
                fds = (fds[self._turn:] + fds[:self._turn])[:WATCH_PER_TICK]
            for fd in fds:
                if fd in self._cut:
                    continue
                received = self._bytes_received(fd)
                if received is None:
                    continue
                held = received - self.delivered.get(fd, 0) - HANDSHAKE_BYTES
                if held > self._inflight_bytes:
                    self._shutdown(fd, "oversized", f"cut a connection holding {held / 2**20:.1f} MiB not yet a "
                                   f"message (limit {self._inflight_bytes / 2**20:.1f} MiB): larger than the model needs")
        if self._idle_limit and len(self._accepted) - len(self._cut) > self._idle_limit:
            idle = sorted((t, fd) for fd, t in self._accepted.items()
                          if not self.delivered.get(fd) and fd not in self._cut)
            excess = len(self._accepted) - len(self._cut) - self._idle_limit * 3 // 4
            for _, fd in idle[:excess]:
                if self._shutdown(fd, "idle-connection", f"more than {self._idle_limit} connections never "
                                  "delivered a message; cut the oldest"):
                    if now - self._last_idle_cut >= IDLE_CUT_EVENTS_S:
                        self._cut_handshakes = 0  # those cut after their handshake never report one
                    self._cut_handshakes += 1
                    self._last_idle_cut = now

    def _socket(self, fd: int) -> socket.socket | None:
        """The inbound TCP connection behind `fd` (to detach after use), or None if it is not one now."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return None
        try:
            if sock.type != socket.SOCK_STREAM or sock.getsockname()[1] != self.port:
                sock.detach()
                return None
        except (OSError, IndexError, TypeError):
            sock.detach()
            return None
        return sock

    def _bytes_received(self, fd: int) -> int | None:
        sock = self._socket(fd)
        if sock is None:
            return None
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:
            return None
        finally:
            sock.detach()
        if len(info) < _TCP_INFO_BYTES_RECEIVED + 8:
            return None
        return struct.unpack_from("=Q", info, _TCP_INFO_BYTES_RECEIVED)[0]

    def _shutdown(self, fd: int, reason: str, detail: str) -> bool:
        sock = self._socket(fd)
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()
        self._cut.add(fd)
        self._drops.drop(reason, detail)
        return True


class Peer:
    """One institution's sockets.

    Args:
        name: this node's name in the topology.
        address: the address its ROUTER binds, e.g. "tcp://127.0.0.1:5701".
        peers: name -> address of every other node it may talk to.
        federation: the federation id every message must carry.
        tensor_spec: (name, dtype, shape) of the model's tensors, in order.
        curve: CURVE keys; None only with the topology's explicit `insecure = true`.
        max_message_bytes: upper cap on an inbound frame (ZMQ_MAXMSGSIZE); below it the
            frame limit is what the model needs (`wire.max_frame_bytes`).
        heartbeat_interval_s: send every peer a heartbeat this often (`pulse`); None: none.
        peer_timeout_s: a peer silent this long is dead (`health`, `liveness_changes`).
        limits: what one peer may cost this node (see `Limits`).
        fingerprint: the federation fingerprint (p2p_fl/fingerprint.py) every message
            carries and every received one must match; a peer under another is in
            `mismatched`, its messages dropped. None: not checked (tests of the wire alone).
        preflight: `p2p-fl check`: its heartbeats say so, and peers answer them without
            counting the site as started (a check must not open anyone's start window).
    """

    def __init__(
        self,
        name: str,
        address: str,
        peers: Mapping[str, str],
        federation: str,
        tensor_spec: wire.TensorSpec,
        *,
        curve: Curve | None,
        max_message_bytes: int = 512 * 1024 * 1024,
        heartbeat_interval_s: float | None = None,
        peer_timeout_s: float = 10.0,
        limits: Limits = Limits(),
        fingerprint: Fingerprint | None = None,
        preflight: bool = False,
    ):
        self.name = name
        self.fingerprint = fingerprint
        self.preflight = preflight
        # Peer -> the fields in which its setup differs from ours (as its heartbeats tell),
        # while its messages carry another fingerprint; the driver decides what that means.
        self.mismatched: dict[str, list[str]] = {}
        self._setup_changes: dict[str, int] = {}  # per peer: setup warnings logged (a few, then counted)
        self.federation = federation
        self.tensor_spec = list(tensor_spec)
        self.peer_names = frozenset(peers)
        self.limits = limits
        self.dropped: collections.Counter[str] = collections.Counter()
        self._drops = DropLog(name, self.dropped)
        fd_limit = raise_fd_limit()
        frame_limit = wire.max_frame_bytes(self.tensor_spec) + FRAME_OVERHEAD
        if max_message_bytes < frame_limit:
            log.warning("%s: network.max_message_mb (%.2f MiB) is below the largest frame this model needs "
                        "(%.2f MiB); such frames will be cut at the socket", name, max_message_bytes / 2**20,
                        frame_limit / 2**20)
        self.max_frame_bytes = min(max_message_bytes, frame_limit)
        self.max_frames = wire.max_frames(self.tensor_spec)
        self.max_message_bytes = wire.max_message_bytes(self.tensor_spec)
        self._quarantine_s = min(limits.quarantine_s, peer_timeout_s / 2)
        self._budgets: dict[str, _SenderBudget] = {}
        # One context per peer: the ZAP handler belongs to a context.
        self._ctx = zmq.Context()
        self._auth = None
        self._watch = None
        self._router = None
        self._dealers: dict[str, zmq.Socket] = {}
        try:
            if curve is not None:
                missing = sorted(set(peers) - set(curve.peer_keys))
                if missing:
                    raise ValueError(f"no public key for peers {', '.join(missing)}")
                names_by_key = {curve.peer_keys[p]: p for p in peers}
                self._auth = _TopologyAuthenticator(self._ctx, names_by_key, self._drops, name)
                self._auth.start()
                self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self._auth)
            else:
                log.warning("%s: INSECURE: CURVE is off (insecure = true); traffic is plaintext and "
                            "unauthenticated. Use this for debugging only.", name)
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
            self._router.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            self._router.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(limits.handshake_timeout_s * 1000)))
            if curve is not None:
                self._router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
                self._router.curve_secretkey = curve.secret.encode("ascii")
                self._router.curve_publickey = curve.public.encode("ascii")
                self._router.curve_server = True
            inflight = limits.inflight_bytes
            if inflight is None:
                inflight = 32 * 2**20 + 8 * self.max_message_bytes
            idle = limits.idle_connections
            if idle is None:
                idle = min(4096, max(64, fd_limit // 4))
            if address:  # a site without one accepts no connections: its peers answer on its own
                self._watch = _ConnectionWatch(self._router.get_monitor_socket(_MONITOR_EVENTS), self._drops,
                                               inflight, idle)
                self._watch.start()
                self._router.bind(address)
                self._watch.port = _port_of(self._router.getsockopt_string(zmq.LAST_ENDPOINT))
            for peer, peer_address in peers.items():
                if not peer_address:
                    continue  # it accepts no connections: it reaches us, we answer on that connection
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, LINGER_MS)
                sock.setsockopt(zmq.SNDHWM, SEND_HWM)
                if curve is not None:
                    sock.curve_secretkey = curve.secret.encode("ascii")
                    sock.curve_publickey = curve.public.encode("ascii")
                    sock.curve_serverkey = curve.peer_keys[peer].encode("ascii")
                sock.connect(peer_address)
                self._dealers[peer] = sock
        except BaseException:
            self.close()
            raise
        # Outbound-only sites: a peer without an address is answered through the connection it
        # made to our ROUTER (its routing id there, recorded from messages CURVE authenticated
        # as that peer); a site without an address reads its answers on its own DEALERs.
        self._answered_via_router = frozenset(p for p, a in peers.items() if not a)
        self._routes: dict[str, bytes] = {}
        self._dealer_peer: dict[zmq.Socket, str] = {} if address else {s: p for p, s in self._dealers.items()}
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        for sock in self._dealer_peer:
            self._poller.register(sock, zmq.POLLIN)
        # Sequence numbers start from the clock so a restarted node keeps increasing them.
        self._seq = time.time_ns() // 1000
        self._last_seq: dict[str, int] = {}
        self.bytes_sent = 0
        self.messages_sent = 0
        self.bytes_received = 0
        self.messages_received = 0  # read from the socket, valid or not
        self.health = None
        self._pulsed_progress: int | None = None
        if heartbeat_interval_s is not None:
            self.health = Heartbeats(peers, heartbeat_interval_s, peer_timeout_s, time.monotonic())

    def pulse(self, progress: int) -> None:
        """Sends the heartbeats that are due; `progress` tells the peers where we are. A new
        progress goes to every live peer at once: others wait on it (a ring's last hop, a
        site that holds the final model and is about to leave)."""
        if self.health is None:
            return
        now = time.monotonic()
        due = self.health.due(now)
        if progress != self._pulsed_progress:
            self._pulsed_progress = progress
            dead = self.health.dead(now)
            due = sorted(set(due) | (self.peer_names - dead))
            self.health.mark_sent(due, now)
        for to in due:
            self.send(to, wire.HEARTBEAT, progress, quiet=True)

    @property
    def peer_progress(self) -> Mapping[str, int]:
        """Peer -> the hop or round its last heartbeat carried."""
        return self.health.progress if self.health is not None else {}

    def liveness_changes(self) -> tuple[set[str], set[str]]:
        """(peers newly dead, peers alive again) since the last call; empty without heartbeats."""
        if self.health is None:
            return set(), set()
        return self.health.changes(time.monotonic())

    def send(
        self,
        to: str,
        type: str,
        round: int,
        tensors: Mapping[str, np.ndarray] | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        quiet: bool = False,
    ) -> int:
        """Queues one message for peer `to` without blocking; returns its sequence number."""
        self._seq += 1
        if type == wire.HEARTBEAT and self.fingerprint is not None:
            meta = {**(meta or {}), "config": self.fingerprint.field_digests}
        if type == wire.HEARTBEAT and self.preflight:
            meta = {**(meta or {}), "preflight": True}
        frames = wire.encode(
            type, federation=self.federation, sender=self.name, round=round, seq=self._seq,
            tensors=tensors, meta=meta, fingerprint=self.fingerprint.digest if self.fingerprint else "",
        )
        try:
            if to in self._dealers:
                self._dealers[to].send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            elif to in self._routes:  # an outbound-only peer, on the connection it made to us
                self._router.send_multipart([self._routes[to], *frames], copy=False, flags=zmq.NOBLOCK)
            else:
                return self._seq  # it has not reached us yet; the protocol's retries cover it
        except zmq.Again:
            # The peer's queue is full (it is down or far behind); the protocol's
            # retry/deadline logic decides what happens next.
            if quiet:
                return self._seq
            log.warning("%s: send queue to %s full, message %s round %d not queued", self.name, to, type, round)
            return self._seq
        self.bytes_sent += wire.message_bytes(frames)
        self.messages_sent += 1
        return self._seq

    def receive(self, timeout_s: float) -> list[wire.Message]:
        """Waits up to `timeout_s` for messages; returns the valid ones among those it read.

        Reads at most `limits.per_receive` messages and for at most `limits.receive_budget_s`
        (what is left waits for the next call), so that a flood cannot keep the caller from
        its heartbeats.
        """
        messages = []
        ready = [sock for sock, _ in self._poller.poll(int(timeout_s * 1000))]
        deadline = time.monotonic() + self.limits.receive_budget_s
        budget = self.limits.per_receive
        for sock in ready:
            via = self._dealer_peer.get(sock)  # None: our ROUTER
            while budget > 0 and time.monotonic() < deadline:
                try:
                    frames = sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                budget -= 1
                routing_id = None
                if via is None:
                    routing_id, frames = frames[0], frames[1:]  # frames[0] is the ROUTER's routing id
                message = self._check(frames, via=via)
                if message is None:
                    continue
                if routing_id is not None and message.sender in self._answered_via_router and self._auth is not None:
                    self._routes[message.sender] = routing_id.bytes
                if message.type == wire.HEARTBEAT and message.meta.get("preflight") is True and not self.preflight:
                    continue  # a site's `p2p-fl check`, not its node: not alive in the run
                if self.health is not None:
                    progress = message.round if message.type == wire.HEARTBEAT else None
                    self.health.heard(message.sender, time.monotonic(), progress)
                if message.type != wire.HEARTBEAT:
                    messages.append(message)
        self._drops.tick()
        return messages

    def _check(self, frames, via: str | None = None) -> wire.Message | None:
        """The message in `frames` if it passes every check, else None (dropped, counted).
        `via`: the peer whose DEALER it came on (the CURVE server key we connected with
        authenticates it); None: our ROUTER, where ZAP set its User-Id."""
        nbytes = wire.message_bytes(frames)
        self.bytes_received += nbytes
        self.messages_received += 1
        fd = _source_fd(frames)
        if fd >= 0 and self._watch is not None:
            delivered = self._watch.delivered
            delivered[fd] = delivered.get(fd, 0) + nbytes + FRAME_OVERHEAD * len(frames)
        # With CURVE the ZAP handler set User-Id to the authenticated peer's name; the
        # header's sender must be that peer, or a site could speak for another.
        authenticated = frames[0].get("User-Id") if self._auth is not None and frames and via is None else None
        if via is not None and self._auth is not None:
            authenticated = via
        if self._auth is not None and not authenticated:
            return self.drop("unauthenticated", "message without an authenticated User-Id")
        now = time.monotonic()
        sender = authenticated or f"connection {fd}"  # without CURVE: per connection
        budget = self._budgets.get(sender)
        if budget is None:
            if len(self._budgets) > 4096:  # only without CURVE, where connections come and go
                self._budgets = {k: b for k, b in self._budgets.items() if now - b.seen < 60}
            budget = self._budgets[sender] = _SenderBudget(self.limits, self.max_message_bytes, self._quarantine_s, now)
        if len(frames) > self.max_frames or nbytes > self.max_message_bytes:
            budget.admit(0, now)  # counts against its message rate
            return self.drop("oversized", f"{len(frames)} frames, {nbytes:,} bytes from {sender}; a message of "
                             f"this model has at most {self.max_frames} frames and {self.max_message_bytes:,} bytes")
        quarantined_until = budget.until
        refused = budget.admit(nbytes, now)
        if budget.until != quarantined_until:  # one line per quarantine, however long the flood
            log.warning("%s: %s sent more than %d messages over its rate; its messages are dropped for %g s",
                        self.name, sender, self.limits.quarantine_after, self._quarantine_s)
        if refused == "quarantined":
            return self.drop(refused, f"from {sender}, quarantined for {budget.until - now:.1f} s more")
        if refused:
            return self.drop(refused, f"{sender} is over {self.limits.messages_per_s:g} messages/s or "
                             f"{self.limits.models_per_s:g} x {self.max_message_bytes:,} bytes/s")
        try:
            message = wire.decode(
                frames, federation=self.federation, senders=self.peer_names,
                tensor_spec=self.tensor_spec, authenticated_sender=authenticated,
                max_seq=wire.seq_ceiling(time.time_ns()),
                fingerprint=self.fingerprint.digest if self.fingerprint else None,
            )
        except wire.ConfigMismatch as err:
            return self._mismatch(err)
        except wire.WireError as err:
            return self.drop("malformed", str(err))
        if message.seq <= self._last_seq.get(message.sender, -1):
            return self.drop("replayed-seq", f"seq {message.seq} from {message.sender} not increasing")
        self._last_seq[message.sender] = message.seq
        if self.mismatched.pop(message.sender, None) is not None and self._setup_warning(message.sender):
            log.warning("%s: %s now runs the same federation setup", self.name, message.sender)
        return message

    def _setup_warning(self, peer: str) -> bool:
        """Whether a change of `peer`'s setup may still be logged: a few times, then once
        more to say the rest are only counted (a peer switching setups on purpose, an
        insider, must not flood the log; its dropped messages stay counted)."""
        count = self._setup_changes[peer] = self._setup_changes.get(peer, 0) + 1
        if count == SETUP_WARNINGS + 1:
            log.warning("%s: %s changed its federation setup %d times; further changes are counted, not logged",
                        self.name, peer, SETUP_WARNINGS)
        return count <= SETUP_WARNINGS

    def _mismatch(self, err: wire.ConfigMismatch) -> None:
        """A peer under another fingerprint: which fields differ (known once its heartbeat
        comes), one warning per change, every message of it dropped and counted."""
        fields = self.fingerprint.differing(err.fields) if err.fields is not None else None
        known = self.mismatched.get(err.sender)
        if fields is not None and fields != known:
            self.mismatched[err.sender] = fields
            if self._setup_warning(err.sender):
                log.warning("%s: %s runs another federation setup: %s differ; its messages are dropped until it "
                            "runs the same topology file and p2p-fl version", self.name, err.sender,
                            ", ".join(fields))
        elif known is None:
            self.mismatched[err.sender] = ["(not yet known)"]
        return self.drop("mismatched-setup", str(err))

    def drop(self, reason: str, detail: str) -> None:
        """Counts a dropped message under `reason`; logs it, or only counts it in the
        periodic summary line once this window logged a few of that reason."""
        self._drops.drop(reason, detail)

    def close(self) -> None:
        for sock in self._dealers.values():
            sock.close()
        if self._watch is not None:
            self._watch.stop()
            try:
                self._router.disable_monitor()
            except zmq.ZMQError:
                pass
            self._watch.join(timeout=5)
        if self._router is not None:
            self._router.close()
        if self._auth is not None:
            self._auth.stop()
        self._drops.tick(force=True)
        self._ctx.term()


def _source_fd(frames) -> int:
    """The file descriptor of the connection a received message came on (-1 if unknown)."""
    try:
        return int(frames[-1].get(zmq.SRCFD)) if frames and hasattr(frames[-1], "get") else -1
    except (zmq.ZMQError, TypeError, ValueError):
        return -1


def _port_of(endpoint: str) -> int:
    """The TCP port of a bound endpoint like "tcp://127.0.0.1:5701" (-1 for any other transport)."""
    try:
        return int(endpoint.rsplit(":", 1)[1]) if endpoint.startswith("tcp://") else -1
    except (IndexError, ValueError):
        return -1


def _handshake_failure(kind: int, value: int) -> str:
    """Words for a failed-handshake monitor event (its value: a ZMTP protocol error or an errno)."""
    if kind != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"closed or timed out before it finished (errno {value}): a scanner, an idle or a slow client"
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "mechanism mismatch: a client without CURVE (plaintext)"
    names = [n for n in dir(zmq) if n.startswith("PROTOCOL_ERROR_") and getattr(zmq, n) == value]
    return f"protocol error {names[0][len('PROTOCOL_ERROR_'):] if names else hex(value)}: not ZeroMQ, or a broken client"
