"""Ensemble: each site trains alone, then the sites swap their final models once and each
predicts with the mean output (probabilities) of every model it holds, its own included.

Training is the local baseline's (`rounds` x `local_epochs`, the LR schedule over the whole
run); nothing crosses the network until a site's training is done. Then it sends its model
to every other site (one `ensemble-model` message each, checked on arrival like any model:
the model's exact spec, finite values, the sender the authenticated peer) and waits for
theirs until all arrived or `wait_s` after its own training ended. Models from sites that
finished earlier wait in the inbox meanwhile. A site that never sends is left out of the
others' ensembles; the member count is recorded.

A model cannot be averaged into a model after it has been trained on different data alone
(weights of separately trained networks do not line up); outputs can. The price: each site
runs n models at prediction time, and each model leaves its site whole, as in plain gossip.

A site checkpoints after each round it trains (the learner holds its model) and keeps the
models it received in the checkpoint too: restarted after its training, it sends its model
again (a peer that has it takes an identical copy as a resend) and waits for the rest.

`EnsembleProtocol` is a state machine with no sockets and no clock of its own, like the others.
"""

from __future__ import annotations

import numpy as np

from p2p_fl.net import wire
from p2p_fl.protocols.actions import CHECKPOINT, Action, Finish, Send, Train, Weights
from p2p_fl.protocols.base import Protocol


class EnsembleProtocol(Protocol):
    """One site's view of an ensemble run.

    Args:
        me: this site's name.
        peers: every site of the federation (this one included).
        rounds: rounds of local training (each `local_epochs` long, as in `LocalProtocol`).
        wait_s: after its own training, how long a site waits for the others' models.
    """

    def __init__(self, me: str, peers: list[str], rounds: int, *, wait_s: float):
        if me not in peers:
            raise ValueError(f"{me!r} is not a peer of the ensemble")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.me = me
        self.others = sorted(set(peers) - {me})
        self.rounds = rounds
        self.wait_s = wait_s
        self.finished = False
        self._own: Weights | None = None
        self._deadline = 0.0
        self._received: dict[str, Weights] = {}
        self._round = 0  # the next round to train (rounds: training is over)

    @property
    def progress(self) -> int:
        return self._round

    def start(self, now: float) -> list[Action]:
        if self._own is not None:  # resumed after its training: offer the model again
            self._deadline = now + self.wait_s
            return self._offer(now)
        return [Train(self._round, None, progress=self._round / self.rounds)]

    def on_trained(self, round: int, weights: Weights, now: float) -> list[Action]:
        self._round = round + 1
        if round + 1 < self.rounds:
            return [CHECKPOINT, Train(round + 1, None, progress=(round + 1) / self.rounds)]
        self._own = weights
        self._deadline = now + self.wait_s
        return [CHECKPOINT, *self._offer(now)]

    def _offer(self, now: float) -> list[Action]:
        sends = [Send(n, wire.ENSEMBLE_MODEL, self.rounds, self._own) for n in self.others]
        return sends + self._finish_when_complete(now)

    def on_message(self, msg: wire.Message, now: float) -> list[Action]:
        """Keeps a peer's final model. Raises wire.WireError for one this state refuses."""
        if msg.type != wire.ENSEMBLE_MODEL:
            raise wire.WireError(f"unexpected {msg.type} message in an ensemble")
        if msg.sender not in self.others:
            raise wire.WireError(f"{msg.sender} is not another site of the ensemble")
        if msg.round != self.rounds:
            raise wire.WireError(f"ensemble model for round {msg.round}, expected {self.rounds}")
        if self.finished:
            raise wire.WireError(f"ensemble model from {msg.sender} after this site finished")
        known = self._received.get(msg.sender)
        if known is not None:
            if known.keys() == msg.tensors.keys() and all(np.array_equal(known[k], msg.tensors[k]) for k in known):
                return []  # a restarted sender offers its model again
            raise wire.WireError(f"a different second ensemble model from {msg.sender}")
        self._received[msg.sender] = dict(msg.tensors)
        return [CHECKPOINT, *self._finish_when_complete(now)]

    def on_tick(self, now: float) -> list[Action]:
        return self._finish_when_complete(now)

    def _finish_when_complete(self, now: float) -> list[Action]:
        if self._own is None or self.finished:
            return []
        if len(self._received) < len(self.others) and now < self._deadline:
            return []
        self.finished = True
        names = sorted(self._received)
        order = list(self._own)  # the model's order, as the learner expects
        members = (self._own, *({k: self._received[n][k] for k in order} for n in names))
        missing = [n for n in self.others if n not in self._received]
        meta = {"rounds": self.rounds, "ensemble_members": len(members), "ensemble_missing": ",".join(missing)}
        return [Finish(self._own, meta=meta, members=members)]

    def shortfall(self) -> str | None:
        if not self._received:
            return f"no other site's model reached it in {self.wait_s:g} s: its ensemble is its own model alone"
        return None

    def snapshot(self) -> tuple[dict, Weights]:
        arrays = {f"own/{k}": v for k, v in (self._own or {}).items()}
        for name, model in self._received.items():
            arrays.update({f"from/{name}/{k}": v for k, v in model.items()})
        return {"round": self._round, "own": self._own is not None, "received": sorted(self._received)}, arrays

    def restore(self, state: dict, arrays: Weights, now: float) -> None:
        def take(prefix: str) -> Weights:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        self._round = state["round"]
        self._own = take("own/") if state["own"] else None
        self._received = {name: take(f"from/{name}/") for name in state["received"]}
