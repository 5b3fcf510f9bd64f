"""How a ViT's params are laid out: flat `/`-joined keys, scanned blocks, position embeddings.

Shared by the file formats (`checkpoint.py`, `convert.py`) and the model: these
change the arrangement of params, never their meaning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.ndimage

from vit_jax import errors

POSEMB = "Transformer/posembed_input/pos_embedding"
_BLOCK = "Transformer/encoderblock_"
_SCANNED = "Transformer/encoderblock/"


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update({f"{k}/{kk}": vv for kk, vv in flatten(v).items()})
    else:
      out[k] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def stack_blocks(flat: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """encoderblock_{i}/... -> encoderblock/... stacked on a leading axis (the nn.scan layout)."""
  out = {k: v for k, v in flat.items() if not k.startswith(_BLOCK)}
  suffixes = {k.split("/", 2)[2] for k in flat if k.startswith(f"{_BLOCK}0/")}
  for s in suffixes:
    out[f"{_SCANNED}{s}"] = np.stack([flat[f"{_BLOCK}{i}/{s}"] for i in range(num_layers)])
  return out


def unstack_blocks(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `stack_blocks`; unscanned params pass through unchanged."""
  out = {}
  for k, v in flat.items():
    if k.startswith(_SCANNED):
      for i in range(v.shape[0]):
        out[f"{_BLOCK}{i}/{k[len(_SCANNED) :]}"] = v[i]
    else:
      out[k] = v
  return out


def resize_posemb(posemb: np.ndarray, num_tokens: int, has_cls: bool) -> np.ndarray:
  """Resizes [1, (1+)g*g, D] position embeddings to `num_tokens` tokens.

  The class-token row is kept as is; the square grid of patch embeddings is
  resized with first-order (bilinear, corner-aligned) zoom, as the original does.
  """
  n_extra = 1 if has_cls else 0
  tok, grid = posemb[:, :n_extra], posemb[0, n_extra:]
  g_old, g_new = math.isqrt(len(grid)), math.isqrt(max(num_tokens - n_extra, 0))
  if g_old * g_old != len(grid):
    raise errors.CheckpointError(f"{POSEMB}: {len(grid)} patch positions do not form a square grid")
  if g_new * g_new != num_tokens - n_extra:
    raise errors.CheckpointError(
      f"{POSEMB}: cannot resize to {num_tokens - n_extra} patch positions (not a square grid)"
    )
  grid = grid.reshape(g_old, g_old, -1)
  grid = scipy.ndimage.zoom(grid, (g_new / g_old, g_new / g_old, 1), order=1)
  return np.concatenate([tok, grid.reshape(1, g_new * g_new, -1)], axis=1).astype(posemb.dtype)
