"""Which models a topology may name, answered without importing JAX.

`launch` and `experiment` check a topology's model before anything starts; importing JAX and
Flax for that took about 3 s of every launch on 2 cores, in front of every node's start.
`models.MODELS` holds the classes; this table holds their names and whether each has a
BatchNorm layer (FedBN needs one). tests/test_learn_models.py checks the two agree.
"""

from __future__ import annotations

import importlib.metadata

# Builtin model name -> whether it has a BatchNorm layer.
BUILTIN_MODELS: dict[str, bool] = {
    "small-cnn": True,
    "small-cnn-gn": False,
    "small-cnn-dp": False,
    "seed-cnn": True,
    "resnet8": True,
    "scatter-linear": False,
}

# Models a site installs: a package lists its Flax NNX model classes under this entry-point
# group (pyproject: [project.entry-points."p2p_fl.models"] my-cnn = "mypkg.models:MyCNN").
# A topology names the model; nothing a topology says is imported as code.
MODEL_ENTRY_POINTS = "p2p_fl.models"


def installed_models() -> dict[str, importlib.metadata.EntryPoint]:
    """Models installed packages register, by name (a builtin name cannot be taken over)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=MODEL_ENTRY_POINTS)
            if ep.name not in BUILTIN_MODELS}


def model_names() -> list[str]:
    """Every model a topology may name: the installed ones, then the builtins."""
    return [*installed_models(), *BUILTIN_MODELS]


def model_has_batchnorm(name: str) -> bool:
    """Whether model `name` (builtin or installed) has a BatchNorm layer; JAX is imported only
    for an installed model."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    from p2p_fl.learn.models import has_batchnorm

    return has_batchnorm(name)
