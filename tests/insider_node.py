"""A federation member running modified code under its own valid key: the insider of the
threat model (docs/protocols.md, "What holds against whom").

It is p2p-fl's own node (real data, real training, real CurveZMQ sockets), whose protocol is
swapped for a subclass that takes part honestly and also, every half second, sends the other
sites protocol-valid lies: messages that decode and authenticate, each breaking one rule a
dishonest hospital would try. It writes how many of each it sent to $INSIDER_LOG at exit.

    python tests/insider_node.py ATTACK node --config ... --name ... (the `p2p-fl node` arguments)

ATTACK: "none" (an honest node through the same code path), or "ring" / "gossip".
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import sys

import numpy as np

from p2p_fl import site as site_module
from p2p_fl.net import wire
from p2p_fl.protocols import GossipProtocol, RingProtocol, Send
from p2p_fl.protocols import gossip_messages as messages
from p2p_fl.protocols.base import Protocol
from p2p_fl.protocols.gossip_secure import SecureMixer
from p2p_fl.federate import RunKey
from p2p_fl.learn import Learner

EVERY_S = 0.5
SENT: collections.Counter = collections.Counter()


class _Insider(Protocol):
    """What both insiders share: a clock for the attacks and the count of what they sent.

    A Protocol itself, so that a site's protocol can become an insider in place
    (`__class__` assignment needs the same layout chain as the Protocol it replaces)."""

    _next_attack = 0.0

    @property
    def progress(self) -> int:
        """Every heartbeat lies: far ahead of any real round or hop."""
        return 999

    def on_tick(self, now: float):
        actions = super().on_tick(now)
        if now >= self._next_attack and not self.finished:
            self._next_attack = now + EVERY_S
            SENT["lying-heartbeat"] += len(self.all_sites) - 1  # about one per peer per tick
            attacks = self.attacks()
            for a in attacks:
                SENT[a.meta.pop("attack")] += 1
            actions = actions + attacks
        return actions

    def _others(self) -> list[str]:
        return sorted(set(self.all_sites) - {self.me})


class InsiderRing(_Insider, RingProtocol):
    def attacks(self) -> list[Send]:
        if self.last_round_accepted >= self.cycle_length:
            return []  # after the first cycle a hop it hands on early is its own to spoil
        zeros = {n: np.zeros(s, d) for n, d, s in self.spec}
        out = []
        for site in self._others():
            # A final model, from a site that is not the last holder.
            out.append(Send(site, wire.FINAL, self.num_hops, zeros, {"attack": "forged-final"}))
            # The target's hop of the last cycle: far ahead of the ring.
            last = max(h for h, s in enumerate(self.schedule) if s == site)
            out.append(Send(site, wire.MODEL, last, zeros, {"attack": "far-future-hop"}))
            # A hop that is not the target's to train.
            mine = next(h for h, s in enumerate(self.schedule) if s == self.me)
            out.append(Send(site, wire.MODEL, mine, zeros, {"attack": "not-its-hop"}))
        return out


class InsiderGossip(_Insider, GossipProtocol):
    def attacks(self) -> list[Send]:
        out = []
        others = self._others()
        for site in others:
            members = wire.join_names([s for s in others if s != site] + [site])
            # Group requests an honest member refuses on arrival (they used to crash a node
            # whose training was running when they were answered).
            out.append(Send(site, wire.GOSSIP_GROUP, self.round, None,
                            {"members": members, "threshold": 1, "attack": "bad-group"}))
            out.append(Send(site, wire.GOSSIP_GROUP, self.round, None,
                            {"members": wire.join_names([*others, self.me]), "threshold": 2,
                             "attack": "group-with-aggregator"}))
            out.append(Send(site, wire.GOSSIP_GROUP, self.round + 5, None,
                            {"members": members, "threshold": 2, "attack": "far-future-group"}))
            # A second run key: masks of two keys could be combined.
            out.append(Send(site, wire.GOSSIP_HELLO, 0, {"run_key": np.frombuffer(RunKey().public, np.uint8)},
                            {"have": True, "attack": "second-run-key"}))
            # An announcement for a sum the target never joined.
            out.append(Send(site, wire.GOSSIP_ANNOUNCE, self.round + 3, {},
                            {"survivors": "", "dropped": "", "shares_from": "", "attack": "stray-announcement"}))
        return out


class InsiderSecureMixer(SecureMixer):
    """The insider's own secure sums: honest, but for a second, contradicting announcement."""

    def _announcement(self, to, a):
        """Tells each member its honest story, then a second one dropping another member: an
        honest member must not release a correction for a member whose share it released."""
        honest = super()._announcement(to, a)
        others = [s for s in a.survivors if s != to]
        if others:
            lie = others[0]
            survivors = tuple(s for s in a.survivors if s != lie)
            story = a._replace(survivors=survivors, dropped=tuple(sorted([*a.dropped, lie])),
                               encrypted_shares={k: a.encrypted_shares[k] for k in survivors if k != to})
            SENT["contradicting-announcement"] += 1
            self._pending_lies.append(messages.announce(to, story))
        return honest

    def _take_release(self, agg, msg):
        """Counts what the lie got back: a release carrying a correction for a survivor
        whose shares it also holds would let it unmask that survivor."""
        if msg.meta["correction"] and agg.session.dropped == ():
            SENT["corrections-obtained-by-lying"] += 1
        return super()._take_release(agg, msg)

    def _step_sum(self, now):
        actions = super()._step_sum(now)
        lies, self._pending_lies[:] = list(self._pending_lies), []
        return actions + lies


def main(argv: list[str]) -> int:
    attack, argv = argv[0], argv[1:]
    original = site_module.make_protocol

    def make_protocol(topology, me, curve, **options):
        protocol = original(topology, me, curve, **options)
        if attack == "none":
            return protocol
        protocol.__class__ = {RingProtocol: InsiderRing, GossipProtocol: InsiderGossip}[type(protocol)]
        protocol.all_sites = topology.names
        protocol.spec = Learner(topology.training.model).weight_spec()  # after the node set JAX up
        if type(protocol) is InsiderGossip and type(protocol.mixer) is SecureMixer:
            protocol.mixer.__class__ = InsiderSecureMixer
            protocol.mixer._pending_lies = []
        return protocol

    site_module.make_protocol = make_protocol

    def write_log() -> None:
        if os.environ.get("INSIDER_LOG"):
            with open(os.environ["INSIDER_LOG"], "w") as f:
                json.dump(dict(SENT), f)

    atexit.register(write_log)
    from p2p_fl.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
