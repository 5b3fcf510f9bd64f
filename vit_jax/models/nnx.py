"""The Linen ViT as a `flax.nnx` module, through `flax.nnx.bridge`: one model code, two APIs.

`to_nnx(model, params)` wraps the Linen module (`vit.VisionTransformer`, any variant:
unrolled or `scan=True`, with or without the hybrids' ResNet) in `bridge.ToNNX`. Its
calls run the Linen module's own `apply`, so its outputs are Linen's exactly; its
`nnx.Param`s hold the given arrays (no copy) with their logical axis names, and train
with `nnx.Optimizer(module, tx, wrt=nnx.Param)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge

from vit_jax import errors
from vit_jax.models import vit


def to_nnx(model: vit.VisionTransformer, params: Any, *, seed: int = 0) -> bridge.ToNNX:
  """An `nnx` module that runs `model` with `params`: call it as `module(images, train=False)`.

  `params` is the Linen params tree (plain arrays or logical-axis boxes); every one of the
  model's params must be there, with its shape. `seed` seeds the dropout stream that a
  `train=True` call draws from.
  """
  params = nn.meta.unbox(params)
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)

  def build() -> bridge.ToNNX:
    # The params carry logical axis names (for sharding), not shardings: no mesh is needed.
    with nnx.use_eager_sharding(False):
      module = bridge.ToNNX(model, rngs=nnx.Rngs(params=0, dropout=seed))
      return module.lazy_init(jnp.zeros(images.shape, images.dtype), train=False)

  # The params' shapes only: nothing is initialised that `params` then replaces.
  module = nnx.eval_shape(build)
  want = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  got_shapes = jax.tree_util.tree_map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), params)
  want_shapes = jax.tree_util.tree_map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), want)
  if got_shapes != want_shapes:
    raise errors.CheckpointError(
      "the params do not fit the model: " + _first_difference(_flat(want_shapes), _flat(got_shapes))
    )
  nnx.update(module, params)
  # eval_shape left the random streams abstract too: real ones for train=True calls.
  module.to_nnx__rngs = nnx.Rngs(params=0, dropout=seed)
  return module


def _flat(tree: Any) -> dict[str, Any]:
  """{'a/b': (shape, dtype)} for a tree of (shape, dtype) leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in leaves}


def _first_difference(want: dict[str, Any], got: dict[str, Any]) -> str:
  for key in sorted(set(want) | set(got)):
    if key not in got:
      return f"missing {key} {want[key]}"
    if key not in want:
      return f"unexpected {key} {got[key]}"
    if want[key] != got[key]:
      return f"{key} is {got[key]}, the model wants {want[key]}"
  return "the trees differ"
