"""What a protocol asks its site to do. Protocols return these; only the driver acts on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Send:
    """Send one message to peer `to`."""

    to: str
    type: str
    round: int
    weights: Weights | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Train:
    """Train locally for one hop/round, starting from `weights` (None: the node's own model).

    `progress` is the fraction of the whole run done before this step (for LR schedules).
    """

    round: int
    weights: Weights | None
    progress: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finish:
    """The run is over for this node; `weights` is its final model.

    `members`: for an ensemble, every model whose mean output is the node's prediction
    (its own included); empty: `weights` alone predicts.
    """

    weights: Weights | None
    meta: dict[str, Any] = field(default_factory=dict)
    members: tuple[Weights, ...] = ()


@dataclass(frozen=True)
class Refuse:
    """A peer's message this protocol refused after it was accepted for later (a group
    request answered once our training is done): the node drops and counts it, as it does
    for a message refused on arrival (wire.WireError)."""

    reason: str


@dataclass(frozen=True)
class Checkpoint:
    """Write this site's checkpoint (protocol snapshot and learner state) now. The driver
    writes it before it carries out any other action of the same callback, so that what a
    message tells a peer (a hop taken, a sum joined, a model released) is on disk first."""


CHECKPOINT = Checkpoint()

Action = Send | Train | Finish | Refuse | Checkpoint
