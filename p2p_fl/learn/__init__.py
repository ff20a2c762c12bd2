"""Learn layer: Flax NNX models, training and evaluation on arrays.

Knows JAX, Flax and Optax; knows nothing about peers, sockets or files.
Weights cross into the federation as flat ``dict[str, np.ndarray]``
(``Learner.get_weights`` / ``Learner.set_weights``).

The names below load their module on first use (PEP 562), so that the JAX-free parts
(``metrics``, ``catalog``) can be imported without paying JAX's start-up.
"""

import importlib

_HOME = {
    "choose_threshold": "metrics", "classification_metrics": "metrics", "evaluation_report": "metrics",
    "roc_auc": "metrics", "roc_curve": "metrics",
    "MODELS": "models", "build_model": "models", "count_params": "models",
    "DPConfig": "privacy", "noise_for_target": "privacy", "privacy_spent": "privacy",
    "configure_jax": "runtime", "describe_backend": "runtime",
    "Learner": "train", "TrainState": "train", "make_optimizer": "train",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'p2p_fl.learn' has no attribute {name!r}")
    return getattr(importlib.import_module(f"p2p_fl.learn.{_HOME[name]}"), name)
