"""Local-only training: each site trains alone on its own data, nothing is exchanged.

The baseline every federated result is compared with: what one hospital gets by itself.
"""

from __future__ import annotations

from p2p_fl.protocols.actions import CHECKPOINT, Action, Finish, Train, Weights
from p2p_fl.protocols.base import Protocol


class LocalProtocol(Protocol):
    """Trains `rounds` rounds back to back; same interface as the networked protocols."""

    def __init__(self, me: str, rounds: int):
        self.me = me
        self.rounds = rounds
        self.finished = False
        self.round = 0  # the next round to train

    @property
    def progress(self) -> int:
        return self.round

    def start(self, now: float) -> list[Action]:
        return [Train(self.round, None, progress=self.round / self.rounds)]

    def on_message(self, msg, now: float) -> list[Action]:
        return []

    def on_trained(self, round: int, weights: Weights, now: float) -> list[Action]:
        self.round = round + 1
        # The learner's state is the model: the checkpoint keeps it.
        if round + 1 < self.rounds:
            return [CHECKPOINT, Train(round + 1, None, progress=(round + 1) / self.rounds)]
        self.finished = True
        return [CHECKPOINT, Finish(weights, meta={"rounds": self.rounds})]

    def on_tick(self, now: float) -> list[Action]:
        return []

    def snapshot(self) -> tuple[dict, Weights]:
        return {"round": self.round}, {}

    def restore(self, state: dict, arrays: Weights, now: float) -> None:
        self.round = state["round"]
