"""The outer optimizer: a server optimizer's step, without a server (FedAvgM, FedAdam).

After a round of gossip on the complete graph every site holds the same average of the
round's models. Instead of adopting it, each site treats `start - average` as the round's
pseudo-gradient and takes one step of an optimizer over rounds from the model the round
started from (Hsu et al. 2019, FedAvgM; Reddi et al. 2021, "Adaptive Federated
Optimization", FedAdam). Every site applies the same step to the same numbers, so on the
complete graph they stay identical, as with a server. On a sparse graph each site steps
from its own mix: momentum over its neighbourhood's rounds (quasi-global momentum).

The step only post-processes models that were already released and averaged: under DP it
costs no privacy. BatchNorm running statistics are averages, not parameters: they take the
average as it is.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import numpy as np
import optax

from p2p_fl.config import OUTER_OPTIMIZERS

Weights = dict[str, np.ndarray]


@functools.lru_cache(maxsize=None)
def outer_transformation(name: str, learning_rate: float, momentum: float) -> optax.GradientTransformation:
    """The optax transformation of `name` (not "avg": that is no step at all); one object per
    setting, so every site of a process shares one compiled `_outer_update`."""
    if name == "momentum":  # FedAvgM with Nesterov momentum (as DiLoCo's outer step)
        return optax.sgd(learning_rate, momentum=momentum, nesterov=True)
    if name == "adam":  # FedAdam: tau (eps) 1e-3 as in Reddi et al., b2 0.99
        return optax.adam(learning_rate, b1=momentum, b2=0.99, eps=1e-3)
    raise ValueError(f"outer optimizer {name!r} is not one of {OUTER_OPTIMIZERS[1:]}")


@functools.partial(jax.jit, static_argnums=0)
def _outer_update(transformation: optax.GradientTransformation, params, pseudo_gradient, state):
    # Compiled once per setting: eagerly, the step's few dozen small array operations each
    # went through JAX's dispatch (25 ms a step under cProfile: 0.25 s of a 10-site round in
    # one process).
    updates, state = transformation.update(pseudo_gradient, state, params)
    return optax.apply_updates(params, updates), state


class OuterOptimizer:
    """One site's optimizer over rounds; its state travels in the site's checkpoint.

    Args:
        name: "momentum" or "adam".
        learning_rate, momentum: the outer step's (momentum is Adam's b1).
        statistics: names of tensors that are running statistics (BatchNorm mean and var):
            they take the average, no step.
    """

    def __init__(self, name: str, learning_rate: float, momentum: float, statistics: Iterable[str] = ()):
        self.transformation = outer_transformation(name, learning_rate, momentum)
        self.statistics = frozenset(statistics)
        self._state = None

    def step(self, start: Weights, average: Weights) -> Weights:
        """The model that follows `start` after a round whose average was `average`."""
        names = [n for n in average if n not in self.statistics]
        params = {n: np.asarray(start[n], np.float32) for n in names}
        pseudo_gradient = {n: params[n] - np.asarray(average[n], np.float32) for n in names}
        if self._state is None:
            self._state = self.transformation.init(params)
        stepped, self._state = _outer_update(self.transformation, params, pseudo_gradient, self._state)
        return {n: (np.asarray(stepped[n], average[n].dtype) if n in stepped else average[n]) for n in average}

    def snapshot(self) -> Weights:
        """The optimizer state as named arrays (empty before the first step)."""
        if self._state is None:
            return {}
        return {f"outer/{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(self._state))}

    def restore(self, arrays: Weights, template: Weights) -> None:
        """The state of `snapshot`; `template` gives the parameters' names and shapes."""
        count = sum(name.startswith("outer/") for name in arrays)
        leaves = [arrays[f"outer/{i}"] for i in range(count)]
        if not leaves:
            self._state = None
            return
        params = {n: np.asarray(a, np.float32) for n, a in template.items() if n not in self.statistics}
        structure = jax.tree_util.tree_structure(self.transformation.init(params))
        if structure.num_leaves != len(leaves):
            raise ValueError(f"outer optimizer state has {len(leaves)} arrays, expected {structure.num_leaves}")
        self._state = jax.tree_util.tree_unflatten(structure, [np.asarray(x) for x in leaves])
