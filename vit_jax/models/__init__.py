"""The Vision Transformer and which model a name, a file or a config means.

`vit` holds the Flax modules, `spec` the model's identity (`ModelSpec`), `layout` how its
params are arranged, and `resnet` the hybrids' ResNet. The names below are the model API.
"""

from vit_jax.models.vit import RUNTIME_FIELDS
from vit_jax.models.vit import VisionTransformer
from vit_jax.models.vit import attention_weights
from vit_jax.models.vit import build
from vit_jax.models.vit import count_params
from vit_jax.models.vit import create_model
from vit_jax.models.vit import init_params
from vit_jax.models.vit import param_shapes

__all__ = [
  "RUNTIME_FIELDS",
  "VisionTransformer",
  "attention_weights",
  "build",
  "count_params",
  "create_model",
  "init_params",
  "param_shapes",
]
