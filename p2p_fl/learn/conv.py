"""2-D convolution and max pooling that stay fast inside ``lax.scan`` on the CPU.

XLA:CPU runs a convolution through Eigen only if its dimension numbers are
canonical (NHWC input, HWIO kernel, NHWC output), and it rewrites other
convolutions into that form only in the entry computation, not in loop
bodies (jax-ml/jax#12868). Autodiff writes the kernel gradient as a
convolution with batch and features swapped, so inside the scan of a
training epoch it falls back to a naive loop (20x slower on a 3x3 layer).
Eigen is also slow with one input channel and on 2x2 feature maps, and the
gradient of ``reduce_window`` max pooling (``select_and_scatter``) costs
more than the convolutions around it.

On the CPU, ``conv_general_dilated`` therefore computes the convolution as
shifted slices of the input, concatenated along the channels (im2col),
times the reshaped kernel: one matrix product whose gradients are matrix
products, slices and pads, all fast inside a loop. ``max_pool_2x2`` is a
reshape and a max. Other backends keep ``lax.conv_general_dilated``
(cuDNN). One small-cnn training step (batch 64) inside the epoch's scan on
2 cores: 400 ms with ``lax`` convolutions and pooling, 32 ms with these.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, out_sharding=None):
    """Drop-in for ``lax.conv_general_dilated`` (e.g. for ``nnx.Conv``).

    2-D NHWC/HWIO convolutions without dilation or grouping run as im2col
    matrix products on the CPU; everything else, and every other backend,
    goes to ``lax.conv_general_dilated`` unchanged.
    """
    covered = (
        lhs.ndim == 4
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
        and feature_group_count == 1 and batch_group_count == 1
        and preferred_element_type is None and out_sharding is None
    )
    stock_conv = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    if not covered:
        return stock_conv(lhs, rhs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    im2col = functools.partial(im2col_conv, strides=tuple(window_strides),
                               padding=tuple(tuple(p) for p in padding), precision=precision)
    return lax.platform_dependent(lhs, rhs, cpu=im2col, default=stock_conv)


def im2col_conv(images: jax.Array, kernel: jax.Array, *, strides: tuple[int, int],
                padding: tuple[tuple[int, int], tuple[int, int]], precision=None
                ) -> jax.Array:
    """NHWC x HWIO convolution as one matrix product over shifted input slices.

    Args:
      images: (B, H, W, C_in).
      kernel: (KH, KW, C_in, C_out).
      strides: (row, column) strides.
      padding: ((top, bottom), (left, right)) zero padding.
      precision: matrix product precision.

    Returns:
      (B, H_out, W_out, C_out), as ``lax.conv_general_dilated`` computes it.
    """
    kernel_h, kernel_w, in_features, out_features = kernel.shape
    padded = jnp.pad(images, ((0, 0), *padding, (0, 0)))
    out_h = (padded.shape[1] - kernel_h) // strides[0] + 1
    out_w = (padded.shape[2] - kernel_w) // strides[1] + 1
    # Slice order (row, column, channel) matches the kernel's HWIO flattening.
    patches = jnp.concatenate([
        lax.slice(padded, (0, i, j, 0),
                  (padded.shape[0], i + (out_h - 1) * strides[0] + 1,
                   j + (out_w - 1) * strides[1] + 1, in_features),
                  (1, strides[0], strides[1], 1))
        for i in range(kernel_h) for j in range(kernel_w)], axis=-1)
    flat_kernel = kernel.reshape(kernel_h * kernel_w * in_features, out_features)
    return jnp.dot(patches, flat_kernel, precision=precision)


def max_pool_2x2(images: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, SAME padding (odd sides round up), NHWC.

    A reshape and a max: its gradient is elementwise, unlike the
    ``select_and_scatter`` of ``reduce_window`` pooling (2-3x slower on CPU).
    Where a window holds several maxima the gradient is shared among them.
    """
    batch, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)),
                     constant_values=-jnp.inf)
    return padded.reshape(batch, (height + 1) // 2, 2, (width + 1) // 2, 2,
                          channels).max(axis=(2, 4))
