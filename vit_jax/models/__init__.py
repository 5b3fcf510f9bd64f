"""The Vision Transformer and which model a name, a file or a config means.

`vit` holds the Flax modules, `spec` the model's identity (`ModelSpec`), `layout` how its
params are arranged, and `resnet` the hybrids' ResNet;
`nnx` gives the same model as a `flax.nnx` module. The names below are the model API.
"""

from typing import Any

from vit_jax.models.vit import RUNTIME_FIELDS
from vit_jax.models.vit import VisionTransformer
from vit_jax.models.vit import attention_weights
from vit_jax.models.vit import build
from vit_jax.models.vit import count_params
from vit_jax.models.vit import create_model
from vit_jax.models.vit import init_params
from vit_jax.models.vit import param_shapes


def to_nnx(model: VisionTransformer, params: Any, *, seed: int = 0) -> Any:
  """`model` with `params` as a `flax.nnx` module (`vit_jax.models.nnx.to_nnx`)."""
  from vit_jax.models import nnx  # noqa: PLC0415  # flax.nnx loads for its users only (0.15 s)

  return nnx.to_nnx(model, params, seed=seed)


__all__ = [
  "RUNTIME_FIELDS",
  "VisionTransformer",
  "attention_weights",
  "build",
  "count_params",
  "create_model",
  "init_params",
  "param_shapes",
  "to_nnx",
]
