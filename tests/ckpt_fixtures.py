"""Checkpoints in the original `gs://vit_models` layout, written independently of vit_jax.

The key names and shapes below are spelled out from the original file format
(pre-Linen names, flat `np.savez`), not derived from our own save code, so a
test that loads these files checks our loader against the format itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Spec:
  hidden: int = 192
  mlp: int = 384
  heads: int = 3
  layers: int = 2
  patch: int = 16
  image_size: int = 32
  classes: int | None = 10
  pre_logits: int | None = None
  cls: bool = True
  # A hybrid: units per ResNet stage (() the root alone), before patches of the feature map.
  resnet: tuple[int, ...] | None = None
  gn_4d: bool = False  # GroupNorm params as [1, 1, 1, C], as files written by old Flax hold them

  @property
  def stride(self) -> int:
    """Pixels per patch side: the root divides by 4, each stage after the first by 2."""
    if self.resnet is None:
      return self.patch
    return self.patch * 4 * 2 ** max(len(self.resnet) - 1, 0)

  @property
  def tokens(self) -> int:
    return (self.image_size // self.stride) ** 2 + (1 if self.cls else 0)


B16 = dict(hidden=768, mlp=3072, heads=12, layers=12, patch=16)
# The original R50+ViT-B_16: ResNet stages (3, 4, 9), then 1x1 patches of its 1024 channels.
R50_B16 = dict(hidden=768, mlp=3072, heads=12, layers=12, patch=1, resnet=(3, 4, 9))


def resnet_arrays(spec: Spec, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
  """The ResNet part of a hybrid under the original names (no `ResNet/` scope), and its channels.

  The root is a 7x7 convolution to 64 channels; stage i has units of width 64 * 2^i
  with 1x1, 3x3, 1x1 (to 4x the width) convolutions, none with a bias, each followed
  by a GroupNorm; the first unit of a stage also projects its input (conv_proj, gn_proj).
  """
  out = {}

  def conv(name, k, cin, cout):
    out[f"{name}/kernel"] = rng.normal(0.0, 1.0 / np.sqrt(k * k * cin), (k, k, cin, cout)).astype(
      np.float32
    )

  def norm(name, c):
    shape = (1, 1, 1, c) if spec.gn_4d else (c,)
    out[f"{name}/scale"] = (1 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    out[f"{name}/bias"] = rng.normal(0.0, 0.1, shape).astype(np.float32)

  conv("conv_root", 7, 3, 64)
  norm("gn_root", 64)
  channels = 64
  for s, units in enumerate(spec.resnet, 1):
    width = 64 * 2 ** (s - 1)
    for u in range(1, units + 1):
      unit = f"block{s}/unit{u}"
      if u == 1:
        conv(f"{unit}/conv_proj", 1, channels, 4 * width)
        norm(f"{unit}/gn_proj", 4 * width)
      conv(f"{unit}/conv1", 1, channels, width)
      norm(f"{unit}/gn1", width)
      conv(f"{unit}/conv2", 3, width, width)
      norm(f"{unit}/gn2", width)
      conv(f"{unit}/conv3", 1, width, 4 * width)
      norm(f"{unit}/gn3", 4 * width)
      channels = 4 * width
  return out, channels


def original_arrays(spec: Spec, seed: int = 0, prefix: str = "") -> dict[str, np.ndarray]:
  """Random weights at realistic scales under the original flat key names."""
  rng = np.random.default_rng(seed)
  d, h = spec.hidden, spec.heads
  hd = d // h

  def w(*shape, fan_in):
    return rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape).astype(np.float32)

  def b(*shape):
    return rng.normal(0.0, 0.02, shape).astype(np.float32)

  out, channels = resnet_arrays(spec, rng) if spec.resnet is not None else ({}, 3)
  out.update(
    {
      "embedding/kernel": w(
        spec.patch, spec.patch, channels, d, fan_in=spec.patch * spec.patch * channels
      ),
      "embedding/bias": b(d),
      "Transformer/posembed_input/pos_embedding": rng.normal(0, 0.02, (1, spec.tokens, d)).astype(
        np.float32
      ),
      "Transformer/encoder_norm/scale": (1 + 0.1 * rng.normal(size=d)).astype(np.float32),
      "Transformer/encoder_norm/bias": b(d),
    }
  )
  if spec.cls:
    out["cls"] = rng.normal(0, 0.02, (1, 1, d)).astype(np.float32)
  for i in range(spec.layers):
    blk = f"Transformer/encoderblock_{i}"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      out[f"{blk}/{ln}/scale"] = (1 + 0.1 * rng.normal(size=d)).astype(np.float32)
      out[f"{blk}/{ln}/bias"] = b(d)
    for proj in ("query", "key", "value"):
      out[f"{blk}/MultiHeadDotProductAttention_1/{proj}/kernel"] = w(d, h, hd, fan_in=d)
      out[f"{blk}/MultiHeadDotProductAttention_1/{proj}/bias"] = b(h, hd)
    out[f"{blk}/MultiHeadDotProductAttention_1/out/kernel"] = w(h, hd, d, fan_in=d)
    out[f"{blk}/MultiHeadDotProductAttention_1/out/bias"] = b(d)
    out[f"{blk}/MlpBlock_3/Dense_0/kernel"] = w(d, spec.mlp, fan_in=d)
    out[f"{blk}/MlpBlock_3/Dense_0/bias"] = b(spec.mlp)
    out[f"{blk}/MlpBlock_3/Dense_1/kernel"] = w(spec.mlp, d, fan_in=spec.mlp)
    out[f"{blk}/MlpBlock_3/Dense_1/bias"] = b(d)
  rep = d
  if spec.pre_logits:
    out["pre_logits/kernel"] = w(d, spec.pre_logits, fan_in=d)
    out["pre_logits/bias"] = b(spec.pre_logits)
    rep = spec.pre_logits
  if spec.classes:
    out["head/kernel"] = w(rep, spec.classes, fan_in=rep)
    out["head/bias"] = b(spec.classes)
  return {prefix + k: v for k, v in out.items()}


def write_original(path, spec: Spec, seed: int = 0, prefix: str = "") -> dict[str, np.ndarray]:
  """Writes an original-layout .npz; returns the arrays written."""
  arrays = original_arrays(spec, seed, prefix)
  np.savez(path, **arrays)
  return arrays


def linen_key(key: str) -> str:
  """The Linen name of an original key (the documented four renames)."""
  for old, new in (
    ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"),
    ("LayerNorm_2", "LayerNorm_1"),
    ("MlpBlock_3", "MlpBlock_0"),
  ):
    key = key.replace(f"/{old}/", f"/{new}/")
  return key


def get(tree, key: str):
  """tree['a']['b'] for key 'a/b'."""
  for part in key.split("/"):
    tree = tree[part]
  return tree
