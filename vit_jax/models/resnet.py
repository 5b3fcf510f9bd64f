"""The ResNet of the hybrid models (ResNet + ViT), as the original `models_resnet.py` has it.

BiT-style bottleneck units: weight-standardised convolutions without biases,
GroupNorm (32 groups, eps 1e-6) instead of BatchNorm, post-activation, the
stride on the 3x3 convolution and on the projection. The names are the
original checkpoints' (`conv_root`, `gn_root`, `block{i}/unit{j}/conv1` ...),
so loading a hybrid file is the same strict load as a plain ViT's.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

# The original standardises with eps 1e-5 added to the standard deviation (not the variance).
STD_EPS = 1e-5


def standardize(w: Array, eps: float = STD_EPS) -> Array:
  """Each output channel of an HWIO kernel to zero mean and unit deviation (population)."""
  w = w.astype(jnp.float32)
  w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  return w / (jnp.std(w, axis=(0, 1, 2), keepdims=True) + eps)


def _unboxed(init: Callable, rank: int) -> Callable:
  # ResNet weights are small next to the transformer's: replicated on every mesh.
  return nn.with_logical_partitioning(init, (None,) * rank)


class StdConv(nn.Conv):
  """A convolution whose kernel is weight-standardised on every call; the stored kernel is raw."""

  def param(self, name: str, init_fn: Callable[..., Any], *init_args, **init_kwargs) -> Any:
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    return standardize(value) if name == "kernel" else value


def _conv(
  features: int, kernel: int, strides: int, name: str, dtype: Dtype, param_dtype: Dtype
) -> StdConv:
  return StdConv(
    features,
    (kernel, kernel),
    strides=(strides, strides),
    use_bias=False,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_unboxed(nn.initializers.lecun_normal(), 4),
    name=name,
  )


def _norm(name: str, dtype: Dtype, param_dtype: Dtype, zero_scale: bool = False) -> nn.GroupNorm:
  # Flax's GroupNorm defaults (32 groups, eps 1e-6), with which the checkpoints were trained.
  return nn.GroupNorm(
    num_groups=32,
    epsilon=1e-6,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=_unboxed(nn.initializers.zeros if zero_scale else nn.initializers.ones, 1),
    bias_init=_unboxed(nn.initializers.zeros, 1),
    name=name,
  )


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1, 3x3 (strided), 1x1 to 4x `features`, plus a projected shortcut."""

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != 1:
      residual = _conv(self.features * 4, 1, self.strides, "conv_proj", **kw)(residual)
      residual = _norm("gn_proj", **kw)(residual)
    y = nn.relu(_norm("gn1", **kw)(_conv(self.features, 1, 1, "conv1", **kw)(x)))
    y = nn.relu(_norm("gn2", **kw)(_conv(self.features, 3, self.strides, "conv2", **kw)(y)))
    # A zero-initialised last norm starts each unit as the identity (training from scratch).
    y = _norm("gn3", zero_scale=True, **kw)(_conv(self.features * 4, 1, 1, "conv3", **kw)(y))
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` units; the first one strides and projects."""

  block_size: int
  features: int
  first_stride: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.block_size):
      x = ResidualUnit(
        self.features,
        strides=self.first_stride if i == 0 else 1,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"unit{i + 1}",
      )(x)
    return x


def root_and_stages(
  x: Array, layers: Sequence[int], dtype: Dtype, param_dtype: Dtype, width: int = 64
) -> Array:
  """The root (7x7/2 conv, norm, ReLU, 3x3/2 max pool) and the stages.

  Called inside a module's compact `__call__`: the submodules bind to that
  module, so their names sit at its top level as in the original files. The
  root divides the size by 4 and every stage after the first by 2 more.
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  x = _conv(width, 7, 2, "conv_root", **kw)(x)
  x = nn.relu(_norm("gn_root", **kw)(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
  for i, block_size in enumerate(layers):
    x = ResNetStage(
      block_size, width * 2**i, first_stride=1 if i == 0 else 2, name=f"block{i + 1}", **kw
    )(x)
  return x


def stride(layers: Sequence[int] | None) -> int:
  """How much the ResNet shrinks the image: 1 without one, 4 for the root, x2 per later stage."""
  if layers is None:
    return 1
  return 4 * 2 ** max(len(layers) - 1, 0)


def out_channels(layers: Sequence[int], width: int = 64) -> int:
  """Channels of the ResNet's output: the root's, or 4x the last stage's width."""
  return width * 4 * 2 ** (len(layers) - 1) if layers else width


def macs(layers: Sequence[int], image_size: int, width: int = 64) -> int:
  """Multiply-adds of the root and stages for one square image (SAME padding: sizes round up)."""
  size = -(-image_size // 2)  # the root's 7x7/2 convolution
  total = size * size * 7 * 7 * 3 * width
  size = -(-size // 2)  # its 3x3/2 max pool
  channels = width
  for i, units in enumerate(layers):
    w = width * 2**i
    for j in range(units):
      out = -(-size // 2) if (i > 0 and j == 0) else size
      total += size * size * channels * w + out * out * (
        9 * w * w + 4 * w * w
      )  # conv1, conv2, conv3
      if j == 0:
        total += out * out * channels * 4 * w  # conv_proj
      size, channels = out, 4 * w
  return total
