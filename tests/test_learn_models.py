"""Models: output shapes, parameter counts derived from the architectures, errors, and the
JAX-free catalogue and imports that keep every launch and node start short."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from processes import ROOT

from p2p_fl.learn.catalog import BUILTIN_MODELS, model_names
from p2p_fl.learn.conv import conv_general_dilated, max_pool_2x2
from p2p_fl.learn.models import MODELS, SCATTER_FEATURE_NORM, build_model, count_params, has_batchnorm


def conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def batch_norm(features):
    return 2 * features  # scale and bias; the running statistics are not parameters


def dense(fin, fout):
    return fin * fout + fout


def expected_params(name, outputs):
    """Trainable parameters at 28x28x1, from each architecture's description."""
    if name == "small-cnn":
        # 28 -> 14 -> 7 by 2x2 pools, then a 3x3/2 pool to 3x3.
        return (conv(3, 1, 32) + batch_norm(32) + conv(3, 32, 64) + batch_norm(64)
                + dense(3 * 3 * 64, 128) + dense(128, outputs))
    if name in ("small-cnn-dp", "small-cnn-gn"):  # GroupNorm: a scale and a bias per channel, like BatchNorm
        return (conv(3, 1, 32) + batch_norm(32) + conv(3, 32, 64) + batch_norm(64)
                + dense(3 * 3 * 64, 128) + dense(128, outputs))
    if name == "scatter-linear":  # fixed scattering: 81 channels at 7x7; GroupNorm without scale or bias
        return dense(81 * 7 * 7, outputs)
    if name == "seed-cnn":
        widths = [1, 32, 64, 64, 128, 256]
        convs = sum(conv(3, a, b) + batch_norm(b) for a, b in zip(widths, widths[1:]))
        # Five SAME pools: 28 -> 14 -> 7 -> 4 -> 2 -> 1.
        return convs + dense(256, 128) + dense(128, outputs)
    if name == "resnet8":
        def block(cin, cout):
            shortcut = conv(1, cin, cout, bias=False) + batch_norm(cout) if cin != cout else 0
            return (conv(3, cin, cout, bias=False) + batch_norm(cout)
                    + conv(3, cout, cout, bias=False) + batch_norm(cout) + shortcut)
        stem = conv(3, 1, 16, bias=False) + batch_norm(16)
        return stem + block(16, 16) + block(16, 32) + block(32, 64) + dense(64, outputs)
    raise AssertionError(name)


def abstract_model(name, num_classes):
    """The model's structure and shapes, without computing any weights."""
    return nnx.eval_shape(lambda: build_model(name, num_classes=num_classes, in_channels=1,
                                              image_size=28, seed=0))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_classes, outputs", [(2, 1), (3, 3)])
def test_parameter_counts_and_output_shapes(name, num_classes, outputs):
    model = abstract_model(name, num_classes)
    assert count_params(model) == expected_params(name, outputs)
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((3, 28, 28, 1)),
                                                             train=False), state)
    assert logits.shape == (3, outputs)


def test_seed_cnn_size_as_documented():
    assert count_params(abstract_model("seed-cnn", 2)) == 458_881


@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_mode_traces(name):
    graphdef, state = nnx.split(abstract_model(name, 2))

    def train_call(state, key):
        return nnx.merge(graphdef, state)(jnp.zeros((3, 28, 28, 1)), train=True,
                                          rngs=nnx.Rngs(dropout=key))

    assert jax.eval_shape(train_call, state, jax.random.key(0)).shape == (3, 1)


def test_scatter_features_are_fixed_and_their_norm_bounded_at_any_image_size():
    """scatter-linear learns its head alone: its features are the same for every seed, and
    each example's have norm at most SCATTER_FEATURE_NORM at any image size or channel count
    (GroupNorm'd groups, each of unit variance at most): unscaled, the random RGB images'
    would reach 233."""
    from p2p_fl.data.sources import load_dataset

    xrays = load_dataset("builtin:pneumoniamnist").train.images[:16]  # float32 in [0, 1]
    rgb = np.random.default_rng(0).uniform(size=(4, 64, 64, 3)).astype(np.float32)
    for images in (xrays.reshape(16, 28, 28, 1), rgb):
        _, side, _, channels = images.shape
        models = [build_model("scatter-linear", num_classes=3, in_channels=channels,
                              image_size=side, seed=seed) for seed in (0, 1)]
        first, second = (jax.jit(lambda x, m=m: m.features(x))(images) for m in models)
        np.testing.assert_array_equal(first, second)
        norms = np.linalg.norm(first, axis=1)
        assert norms.max() <= SCATTER_FEATURE_NORM * (1 + 1e-5)
        assert norms.min() > 0


def test_modes_dropout_and_batch_statistics():
    model = build_model("small-cnn", num_classes=2, in_channels=1, image_size=28, seed=0)
    graphdef, state = nnx.split(model)
    images = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype(np.float32)

    # Jitted: eager NNX calls compile op by op, which is slow.
    @jax.jit
    def train_call(state, key):
        model = nnx.merge(graphdef, state, copy=True)
        logits = model(images, train=True, rngs=nnx.Rngs(dropout=key))
        return logits, nnx.state(model, nnx.BatchStat)

    logits = jax.jit(lambda state: nnx.merge(graphdef, state)(images, train=False))(state)
    first, new_stats = train_call(state, jax.random.key(1))
    second, _ = train_call(state, jax.random.key(2))
    assert logits.shape == (8, 1) and np.isfinite(logits).all()
    # Training normalises with batch statistics, draws dropout masks from the
    # key given at call time, and updates the running statistics.
    assert not np.allclose(first, logits)
    assert not np.allclose(first, second)
    assert not np.allclose(new_stats["bn1"]["mean"][...], model.bn1.mean[...])


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="resnet8.*seed-cnn.*small-cnn"):
        build_model("vgg16", num_classes=2, in_channels=1, image_size=28, seed=0)


@pytest.mark.parametrize("shape, kernel_shape, strides, padding", [
    ((2, 28, 28, 1), (3, 3, 1, 4), (1, 1), "SAME"),
    ((2, 14, 14, 4), (1, 1, 4, 8), (2, 2), "SAME"),
    ((2, 9, 11, 2), (3, 2, 2, 5), (2, 3), ((2, 0), (1, 3))),
])
def test_conv_matches_lax_values_and_gradients(shape, kernel_shape, strides, padding):
    rng = np.random.default_rng(0)
    images = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=kernel_shape).astype(np.float32)
    dims = ("NHWC", "HWIO", "NHWC")

    def reference(x, k):
        return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=dims)

    def ours(x, k):
        return conv_general_dilated(x, k, strides, padding, dimension_numbers=dims)

    @jax.jit
    def values_and_gradients(cotangent):
        return [(out, vjp(cotangent)) for out, vjp in (jax.vjp(f, images, kernel)
                                                        for f in (ours, reference))]

    out_shape = jax.eval_shape(reference, images, kernel).shape
    (actual, actual_grads), (expected, expected_grads) = values_and_gradients(
        rng.normal(size=out_shape).astype(np.float32))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads):
        np.testing.assert_allclose(actual_grad, expected_grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("side", [28, 7, 2, 1])
def test_max_pool_matches_reduce_window(side):
    images = np.random.default_rng(0).normal(size=(2, side, side + 1, 3)).astype(np.float32)
    expected = nnx.max_pool(images, (2, 2), strides=(2, 2), padding="SAME")
    np.testing.assert_array_equal(max_pool_2x2(images), expected)


def test_the_jax_free_catalogue_names_every_builtin_and_its_batchnorm():
    """`launch` checks a topology's model from learn/catalog.py, without JAX: its table must
    be the builtins' own, BatchNorm flags included (FedBN is refused on its word)."""
    assert list(BUILTIN_MODELS) == list(MODELS)
    assert {name: has_batchnorm(name) for name in MODELS} == BUILTIN_MODELS
    assert set(model_names()) >= set(MODELS)


def test_checking_a_topology_s_model_imports_no_jax():
    """`launch` is in front of every node's start: its checks must not import JAX (~3 s here)."""
    code = ("import sys; from p2p_fl.cli import _check_model; from p2p_fl.config import load_topology; "
            "from pathlib import Path; p = Path('topologies/ring-3.toml'); _check_model(load_topology(p), p); "
            "import p2p_fl.learn.metrics; print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_node_imports_only_what_every_run_uses():
    """What only DP runs (dp-accounting, scipy.stats), DICOM folders (pydicom) or scatter-linear
    (kymatio) need is imported where they need it: each of the first three was ~0.2-1.1 s of
    every node's start on 2 cores."""
    code = ("import sys, p2p_fl.node, p2p_fl.cli; "
            "print(sorted(m for m in ('scipy.stats', 'pydicom', 'dp_accounting', 'kymatio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
