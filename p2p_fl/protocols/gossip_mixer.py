"""What a gossip round's mixer does for the round skeleton (`gossip.GossipProtocol`).

The skeleton owns the rounds: training, the round being mixed, planned absences, when a site
that is behind rejoins, the end of the run and the checkpoints. A mixer owns how one round's
models meet: `gossip_plain.PlainMixer` (models in the clear, mean or robust rule) or
`gossip_secure.SecureMixer` (secure neighbourhood sums under per-run keys). The skeleton
calls a mixer only through the methods below; a mixer works on the skeleton's round state
and calls back only what `GossipProtocol` lists under "For the mixers".
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from p2p_fl.net import wire
from p2p_fl.protocols.actions import Action, Weights

if TYPE_CHECKING:
    from p2p_fl.protocols.gossip import GossipProtocol


class Mixer(abc.ABC):
    """How a site mixes each gossip round with its neighbours' models."""

    # Whether a site that is behind catches up through a sum of its own (`rejoin`); if not,
    # the mixer catches up from the models its neighbours send it anyway (in `step`).
    rejoins_with_a_sum: bool = False

    def __init__(self, site: GossipProtocol):
        self.site = site

    def start(self, now: float, resumed: bool) -> list[Action]:
        """The mixer's first actions, before the site trains (or, `resumed`, listens)."""
        return []

    def tick(self, now: float) -> list[Action]:
        """Upkeep on every tick, also while a resumed site listens (run keys)."""
        return []

    @abc.abstractmethod
    def on_message(self, msg: wire.Message, now: float) -> list[Action]:
        """A checked message: a gossip-hello from any peer, anything else from a neighbour.
        Raises wire.WireError for one this state refuses."""

    @abc.abstractmethod
    def trained(self, weights: Weights) -> list[Action]:
        """The site's model of its round is trained (`site.own`): offer it; `step` mixes."""

    @abc.abstractmethod
    def step(self, now: float) -> list[Action]:
        """Moves the round's mix on (what arrived, deadlines) and, after the last mix, the end
        of the run; mixing done, calls `site.next_round`."""

    def revived(self, peers: set[str]) -> None:
        """Heartbeats say these neighbours are back."""

    def rejoin(self, rejoin_from: int, now: float) -> list[Action]:
        """Mixes `site.round` (the skeleton just moved there from `rejoin_from`) through a sum
        of our own. Only called when `rejoins_with_a_sum`."""
        raise TypeError(f"{type(self).__name__} rejoins with the models it is sent, not with a sum")

    def abandon_sum(self) -> bool:
        """The federation left the round we mix: closes our own sum if nothing of it was
        released yet (we then rejoin); False: it stays open."""
        return False

    @abc.abstractmethod
    def finish(self, now: float) -> list[Action]:
        """The last round is mixed (`site.final` is set): the end, now or once served."""

    @abc.abstractmethod
    def snapshot(self) -> tuple[dict, Weights]:
        """The mixer's part of the checkpoint (JSON-able state, named arrays)."""

    @abc.abstractmethod
    def restore(self, state: dict, arrays: Weights) -> None:
        """Takes back `snapshot`'s part of a checkpoint (after the skeleton took its own)."""

    def check_round(self, msg: wire.Message, lowest: int, highest: int) -> None:
        """Refuses a message for a round outside [lowest, highest], or after the end."""
        if self.site.finished or not lowest <= msg.round <= highest:
            raise wire.WireError(f"{msg.type} for round {msg.round} while at round {self.site.round}")
