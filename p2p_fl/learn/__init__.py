"""Learn layer: Flax NNX models, training and evaluation on arrays.

Knows JAX, Flax and Optax; knows nothing about peers, sockets or files.
Weights cross into the federation as flat ``dict[str, np.ndarray]``
(``Learner.get_weights`` / ``Learner.set_weights``).
"""

from p2p_fl.learn.metrics import (
    choose_threshold,
    classification_metrics,
    evaluation_report,
    roc_auc,
    roc_curve,
)
from p2p_fl.learn.models import MODELS, build_model, count_params
from p2p_fl.learn.privacy import DPConfig, noise_for_target, privacy_spent
from p2p_fl.learn.runtime import configure_jax, describe_backend
from p2p_fl.learn.train import Learner, TrainState, make_optimizer

__all__ = [
    "MODELS",
    "DPConfig",
    "Learner",
    "TrainState",
    "build_model",
    "choose_threshold",
    "classification_metrics",
    "configure_jax",
    "count_params",
    "describe_backend",
    "evaluation_report",
    "make_optimizer",
    "noise_for_target",
    "privacy_spent",
    "roc_auc",
    "roc_curve",
]
