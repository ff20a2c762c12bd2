"""Flax NNX image classifiers for small medical images (NHWC, float32 in [0, 1]).

Every model has the same call signature::

    logits = model(x, train=True, rngs=nnx.Rngs(dropout=key))

Dropout draws its randomness from the ``rngs`` passed at call time, so no RNG
state lives in the module and ``nnx.split(model, nnx.Param, nnx.BatchStat)``
covers everything a model holds. BatchNorm uses batch statistics when
``train`` and its running averages otherwise.

The head has one logit for two classes (sigmoid, binary cross-entropy) and
``num_classes`` logits otherwise (softmax).

Example:
    >>> import jax.numpy as jnp
    >>> model = build_model("small-cnn", num_classes=2, in_channels=1,
    ...                     image_size=28, seed=0)
    >>> model(jnp.zeros((4, 28, 28, 1)), train=False).shape
    (4, 1)
"""

from __future__ import annotations

import functools
import importlib.metadata
import math

import jax
import jax.numpy as jnp
from flax import nnx

from p2p_fl.learn.catalog import installed_models
from p2p_fl.learn.conv import conv_general_dilated, max_pool_2x2

# 0.99 (the Flax default) leaves the running statistics of a small site's
# model far from its data after a few hundred steps; 0.9 tracks them.
BATCHNORM_MOMENTUM = 0.9
# Channels per group 4 (conv1) and 8 (conv2).
GROUPNORM_GROUPS = 8
# Wavelet scattering with 2 scales and 8 orientations: 1 + 2*8 + 8*8 = 81 channels per image
# channel at a quarter of the side, normalised in groups of 9 channels (Tramer and Boneh
# 2021 normalised Fashion-MNIST's 81 in 27 groups of 3; 9 was not compared here).
SCATTER_SCALES = 2
SCATTER_ORIENTATIONS = 8
SCATTER_GROUP_CHANNELS = 9
# The bound on each example's feature norm, whatever the image size: that of a 28 x 28 grey
# image's 3,969 features were each GroupNorm'd group of unit variance. GroupNorm's epsilon
# (1e-6) keeps the faintest groups below that: X-rays' features have norms of 36-51.
SCATTER_FEATURE_NORM = 63.0


def head_width(num_classes: int) -> int:
    """Number of logits for ``num_classes``: 1 for binary, else one per class."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def _conv(in_features: int, features: int, kernel_size: int, rngs: nnx.Rngs, *,
          strides: int = 1, use_bias: bool = True) -> nnx.Conv:
    # This conv_general_dilated keeps training fast inside an epoch's scan on CPU.
    return nnx.Conv(in_features, features, (kernel_size, kernel_size), strides=strides,
                    padding="SAME", use_bias=use_bias, rngs=rngs,
                    conv_general_dilated=conv_general_dilated)


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=BATCHNORM_MOMENTUM, rngs=rngs)


def _pooled_size(image_size: int, num_pools: int) -> int:
    """Side after ``num_pools`` SAME 2x2 pools: each rounds up."""
    return -(-image_size // 2**num_pools)


class SeedCNN(nnx.Module):
    """The chest X-ray study's CNN: five conv blocks, a 128-unit dense layer, a head.

    Each block is Conv 3x3 + ReLU, optional Dropout, BatchNorm, MaxPool 2
    (SAME), in that order, as in the study's Keras model.
    """

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int,
                 rngs: nnx.Rngs):
        self.conv1, self.bn1 = _conv(in_channels, 32, 3, rngs), _batch_norm(32, rngs)
        self.conv2, self.bn2 = _conv(32, 64, 3, rngs), _batch_norm(64, rngs)
        self.conv3, self.bn3 = _conv(64, 64, 3, rngs), _batch_norm(64, rngs)
        self.conv4, self.bn4 = _conv(64, 128, 3, rngs), _batch_norm(128, rngs)
        self.conv5, self.bn5 = _conv(128, 256, 3, rngs), _batch_norm(256, rngs)
        self.dropout2 = nnx.Dropout(0.1)
        self.dropout4 = nnx.Dropout(0.2)
        self.dropout5 = nnx.Dropout(0.2)
        flat = _pooled_size(image_size, 5) ** 2 * 256
        self.dense = nnx.Linear(flat, 128, rngs=rngs)
        self.dropout_dense = nnx.Dropout(0.2)
        self.head = nnx.Linear(128, head_width(num_classes), rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        def block(x, conv, bn, dropout=None):
            x = nnx.relu(conv(x))
            if dropout is not None:
                x = dropout(x, deterministic=not train, rngs=rngs)
            return max_pool_2x2(bn(x, use_running_average=not train))

        x = block(x, self.conv1, self.bn1)
        x = block(x, self.conv2, self.bn2, self.dropout2)
        x = block(x, self.conv3, self.bn3)
        x = block(x, self.conv4, self.bn4, self.dropout4)
        x = block(x, self.conv5, self.bn5, self.dropout5)
        x = nnx.relu(self.dense(x.reshape(x.shape[0], -1)))
        x = self.dropout_dense(x, deterministic=not train, rngs=rngs)
        return self.head(x)


class SmallCNN(nnx.Module):
    """A small, fast CNN: two conv blocks, a 128-unit dense layer, a head.

    Conv 32 - BN - ReLU - MaxPool 2, Conv 64 - BN - ReLU - MaxPool 2, then an
    overlapping 3x3/2 max pool (7x7 -> 3x3 at 28x28, covering every row and
    column) keeps the dense layer small.
    """

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int,
                 rngs: nnx.Rngs):
        self.conv1 = _conv(in_channels, 32, 3, rngs)
        self.bn1 = self._norm(32, rngs)
        self.conv2 = _conv(32, 64, 3, rngs)
        self.bn2 = self._norm(64, rngs)
        side = (_pooled_size(image_size, 2) - 3) // 2 + 1
        if side < 1:
            raise ValueError(f"small-cnn needs image_size >= 9, got {image_size}")
        self.dense = nnx.Linear(side * side * 64, 128, rngs=rngs)
        self.dropout = nnx.Dropout(0.2)
        self.head = nnx.Linear(128, head_width(num_classes), rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        x = max_pool_2x2(nnx.relu(self._normalize(self.bn1, self.conv1(x), train)))
        x = max_pool_2x2(nnx.relu(self._normalize(self.bn2, self.conv2(x), train)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        x = nnx.relu(self.dense(x.reshape(x.shape[0], -1)))
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        return self.head(x)


    @staticmethod
    def _norm(features: int, rngs: nnx.Rngs) -> nnx.Module:
        return _batch_norm(features, rngs)

    @staticmethod
    def _normalize(norm: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
        return norm(x, use_running_average=not train)


class SmallCNNGroupNorm(SmallCNN):
    """SmallCNN with GroupNorm (8 groups) for BatchNorm: for label-skewed sites.

    BatchNorm trains each site's layers on its own skewed batch statistics, then the
    federation averages running statistics of different distributions; GroupNorm
    normalises each example alone, so nothing in the model depends on a site's mix of
    classes (Hsieh et al. 2020, "The non-IID data quagmire of decentralized machine
    learning"). Same parameter count as small-cnn.
    """

    @staticmethod
    def _norm(features: int, rngs: nnx.Rngs) -> nnx.Module:
        return nnx.GroupNorm(features, num_groups=GROUPNORM_GROUPS, rngs=rngs)

    @staticmethod
    def _normalize(norm: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
        return norm(x)


class SmallCNNForDP(nnx.Module):
    """SmallCNN made for DP-SGD: GroupNorm (8 groups) for BatchNorm, tanh for ReLU, no dropout.

    GroupNorm normalises each example by its own statistics, so it trains under DP-SGD's
    per-example gradients; BatchNorm cannot (its batch statistics mix examples), so DP
    training freezes it at its running statistics (``privacy``'s docstring) and a
    BatchNorm model runs unnormalised. Bounded activations keep the noisy steps from
    blowing activations up (Papernot et al. 2021, "Tempered sigmoid activations for deep
    learning with differential privacy"). Same parameter count as small-cnn.
    """

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int,
                 rngs: nnx.Rngs):
        self.conv1 = _conv(in_channels, 32, 3, rngs)
        self.gn1 = nnx.GroupNorm(32, num_groups=GROUPNORM_GROUPS, rngs=rngs)
        self.conv2 = _conv(32, 64, 3, rngs)
        self.gn2 = nnx.GroupNorm(64, num_groups=GROUPNORM_GROUPS, rngs=rngs)
        side = (_pooled_size(image_size, 2) - 3) // 2 + 1
        if side < 1:
            raise ValueError(f"small-cnn-dp needs image_size >= 9, got {image_size}")
        self.dense = nnx.Linear(side * side * 64, 128, rngs=rngs)
        self.head = nnx.Linear(128, head_width(num_classes), rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        del train, rngs  # No batch statistics, no dropout.
        x = max_pool_2x2(nnx.tanh(self.gn1(self.conv1(x))))
        x = max_pool_2x2(nnx.tanh(self.gn2(self.conv2(x))))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        x = nnx.tanh(self.dense(x.reshape(x.shape[0], -1)))
        return self.head(x)


@functools.lru_cache(maxsize=None)
def _scattering(height: int, width: int):
    """kymatio's JAX scattering for images of this size (its filters are NumPy constants,
    built once). Imported from the 2D frontend: ``kymatio.jax`` also loads the 3D
    transform, which needs ``scipy.special.sph_harm``, absent from SciPy 1.17."""
    from kymatio.scattering2d.frontend.jax_frontend import ScatteringJax2D

    return ScatteringJax2D(J=SCATTER_SCALES, shape=(height, width), L=SCATTER_ORIENTATIONS)


def scatter_features(x: jax.Array) -> jax.Array:
    """NHWC images -> their wavelet scattering coefficients, NHWC (channels = 81 per image
    channel, a quarter of the side): fixed, translation-stable edge and texture features
    with nothing to learn."""
    s = _scattering(x.shape[1], x.shape[2]).scattering(jnp.moveaxis(x, -1, 1))  # B C K h w
    s = s.reshape(x.shape[0], -1, *s.shape[-2:])
    return jnp.moveaxis(s, 1, -1)


class ScatterLinear(nnx.Module):
    """A linear classifier on fixed wavelet scattering features: the model for DP-SGD.

    DP-SGD's noise grows with the number of trained weights while each example's clipped
    gradient does not, and a few hundred images cannot teach a CNN's filters through that
    noise. Scattering features (Mallat 2012) are fixed in advance, so DP-SGD trains only a
    linear head on them: 3,970 weights at 28 x 28 against small-cnn-dp's 92,993 (Tramer and
    Boneh 2021, "Differentially private learning needs better features (or much more
    data)"). The features are GroupNorm'd per example (no batch statistics, nothing
    learned, as their Fashion-MNIST model's) and scaled by the square root of 3,969 over their number, so their
    norm is bounded by ``SCATTER_FEATURE_NORM`` at any image size. The linear layer is the
    ``head``.
    """

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int,
                 rngs: nnx.Rngs):
        if image_size < 2 ** SCATTER_SCALES:
            raise ValueError(f"scatter-linear needs image_size >= {2 ** SCATTER_SCALES}, got {image_size}")
        shape = jax.eval_shape(scatter_features,
                               jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32))
        channels = shape.shape[-1]
        self.norm = nnx.GroupNorm(channels, num_groups=channels // SCATTER_GROUP_CHANNELS,
                                  use_scale=False, use_bias=False, rngs=rngs)
        features = math.prod(shape.shape[1:])
        self.feature_scale = SCATTER_FEATURE_NORM / math.sqrt(features)
        # Zeros: the loss is convex in the head, so no symmetry to break.
        self.head = nnx.Linear(features, head_width(num_classes),
                               kernel_init=nnx.initializers.zeros, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """The head's input: each example's normalised scattering coefficients, flattened."""
        z = self.norm(scatter_features(x))
        return z.reshape(x.shape[0], -1) * self.feature_scale

    def __call__(self, x: jax.Array, *, train: bool,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        del train, rngs  # No batch statistics, no dropout.
        return self.head(self.features(x))


class BasicBlock(nnx.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1-conv shortcut."""

    def __init__(self, in_features: int, features: int, stride: int, rngs: nnx.Rngs):
        self.conv1 = _conv(in_features, features, 3, rngs, strides=stride, use_bias=False)
        self.bn1 = _batch_norm(features, rngs)
        self.conv2 = _conv(features, features, 3, rngs, use_bias=False)
        self.bn2 = _batch_norm(features, rngs)
        if stride != 1 or in_features != features:
            self.shortcut_conv = _conv(in_features, features, 1, rngs, strides=stride,
                                       use_bias=False)
            self.shortcut_bn = _batch_norm(features, rngs)
        else:
            self.shortcut_conv = self.shortcut_bn = None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        y = self.bn2(self.conv2(y), use_running_average=not train)
        if self.shortcut_conv is not None:
            x = self.shortcut_bn(self.shortcut_conv(x), use_running_average=not train)
        return nnx.relu(x + y)


class ResNet8(nnx.Module):
    """A small ResNet: 3x3 stem, three stages of one basic block (16/32/64 wide),
    global average pooling, a head. Stages 2 and 3 halve the resolution."""

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int,
                 rngs: nnx.Rngs):
        del image_size  # Global average pooling makes the head size-independent.
        self.stem_conv = _conv(in_channels, 16, 3, rngs, use_bias=False)
        self.stem_bn = _batch_norm(16, rngs)
        self.stage1 = BasicBlock(16, 16, stride=1, rngs=rngs)
        self.stage2 = BasicBlock(16, 32, stride=2, rngs=rngs)
        self.stage3 = BasicBlock(32, 64, stride=2, rngs=rngs)
        self.head = nnx.Linear(64, head_width(num_classes), rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        del rngs  # No dropout.
        x = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
        for stage in (self.stage1, self.stage2, self.stage3):
            x = stage(x, train=train)
        return self.head(x.mean(axis=(1, 2)))


MODELS: dict[str, type[nnx.Module]] = {
    "small-cnn": SmallCNN,
    "small-cnn-gn": SmallCNNGroupNorm,
    "small-cnn-dp": SmallCNNForDP,
    "seed-cnn": SeedCNN,
    "resnet8": ResNet8,
    "scatter-linear": ScatterLinear,
}


def available_models() -> dict[str, object]:
    """Model name -> class (builtin) or entry point (installed, loaded when built)."""
    return {**installed_models(), **MODELS}


def model_code(name: str) -> str:
    """What code builds model `name`: "p2p_fl" for a builtin, "DIST VERSION" for an
    installed one (every site must run the same: the federation fingerprint holds it)."""
    if name == "scatter-linear":  # its features are kymatio's filters: every site needs the same
        return f"p2p_fl, kymatio {importlib.metadata.version('kymatio')}"
    if name in MODELS:  # no scan of the installed packages: every site of a study asks
        return "p2p_fl"
    entry = installed_models().get(name)
    if entry is None:
        return "p2p_fl"
    return f"{entry.dist.name} {entry.dist.version}" if entry.dist is not None else entry.value


def build_model(name: str, *, num_classes: int, in_channels: int, image_size: int,
                seed: int) -> nnx.Module:
    """Builds a freshly initialised model.

    Args:
      name: a key of ``MODELS``, or a model an installed package registers under the
        ``p2p_fl.models`` entry points: a class built as
        ``Class(num_classes=, in_channels=, image_size=, rngs=)`` and called as
        ``model(x, train=..., rngs=...)`` on NHWC float32 in [0, 1], giving logits (one
        logit for two classes, see ``head_width``).
      num_classes: number of classes (2 gives a single-logit binary head).
      in_channels: image channels (1 for grey-scale X-rays).
      image_size: side of the square input images in pixels.
      seed: seed of the parameter initialisation.

    Returns:
      The model, called as ``model(x, train=..., rngs=...)`` on NHWC float32.

    Raises:
      ValueError: unknown name or unusable sizes.
    """
    models = available_models()
    if name not in models:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(models))}")
    cls = models[name] if name in MODELS else models[name].load()
    return cls(num_classes=num_classes, in_channels=in_channels, image_size=image_size, rngs=nnx.Rngs(params=seed))


def has_batchnorm(name: str) -> bool:
    """Whether model ``name`` has a BatchNorm layer (FedBN needs one); builds no weights."""
    model = nnx.eval_shape(lambda: build_model(name, num_classes=2, in_channels=1,
                                               image_size=28, seed=0))
    return any(isinstance(node, nnx.BatchNorm) for _, node in nnx.iter_graph(model))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param``; BatchNorm statistics excluded)."""
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
