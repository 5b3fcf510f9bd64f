"""Post-training int8 quantization with qwix: int8 weights, and int8 activations calibrated.

`quantize(model, params)` gives int8 weights for every matrix multiply (the
`dot_general`s of the Dense and attention projections, the head included);
activations stay in the compute dtype. With `calibration` (batches of preprocessed
images) the activations entering those multiplies are int8 too, each with a
static range measured on the calibration images (absmax over them).

Left in float: the patch embedding (a convolution; qwix 0.1.8 quantizes a
convolution's weights only together with its input, and its calibration then
cannot run under jit), the two attention products (activation times
activation), LayerNorms, softmax, GELU and every bias. `SKIP_ACTIVATIONS`
names the layers whose inputs stay float with activation quantization:
docs/export.md has the measurements that chose them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from vit_jax import errors

SCHEMES = ("int8",)
# Module paths (regexes, qwix's `module_path`) whose input activations stay float when
# activations are quantized; their weights are int8 all the same.
SKIP_ACTIVATIONS: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Setting:
  """Which parts are int8: weights always; activations when calibrated."""

  activations: bool = False  # int8 inputs to the matrix multiplies, static calibrated ranges
  skip_activations: tuple[str, ...] = SKIP_ACTIVATIONS  # module paths whose inputs stay float

  def rules(self) -> list[qwix.QuantizationRule]:
    weights = dict(op_names=("dot_general",), weight_qtype=jnp.int8)
    if not self.activations:
      return [qwix.QuantizationRule(module_path=".*", **weights)]
    skipped = [qwix.QuantizationRule(module_path=p, **weights) for p in self.skip_activations]
    return [
      *skipped,
      qwix.QuantizationRule(
        module_path=".*",
        act_qtype=jnp.int8,
        act_static_scale=True,
        act_calibration_method="absmax",
        **weights,
      ),
    ]

  def describe(self) -> str:
    if not self.activations:
      return "int8 weights (activations float)"
    kept = f"; inputs of {', '.join(self.skip_activations)} float" if self.skip_activations else ""
    return "int8 weights and activations (static ranges)" + kept


def _dummy(model: nn.Module) -> jax.ShapeDtypeStruct:
  return jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)


def calibrate(
  model: nn.Module, params: Any, batches: Iterable[np.ndarray], setting: Setting
) -> Any:
  """qwix's activation statistics of `model` over `batches` of preprocessed images."""
  qt_model = qwix.quantize_model(model, qwix.QtProvider(setting.rules()))
  stats = jax.eval_shape(lambda: qt_model.init(jax.random.PRNGKey(0), _dummy(model), train=False))[
    "quant_stats"
  ]
  stats = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), stats)

  @jax.jit
  def step(stats, x):
    _, state = qt_model.apply(
      {"params": params, "quant_stats": stats}, x, train=False, mutable="quant_stats"
    )
    return state["quant_stats"]

  seen = 0
  for x in batches:
    stats = step(stats, jnp.asarray(x, jnp.float32))
    seen += len(x)
  if not seen:
    raise errors.DataError("no calibration images: activation ranges need at least one")
  return stats


def quantize(
  model: nn.Module,
  params: Any,
  calibration: Iterable[np.ndarray] | None = None,
  setting: Setting | None = None,
) -> tuple[nn.Module, Any, Setting]:
  """(the quantized model, its params, the setting): int8 weights; int8 activations too when
  `calibration` (batches of images [n, S, S, 3] in [-1, 1]) is given."""
  if getattr(model, "scan", False):
    raise errors.ConfigError(
      "int8 needs an unrolled model: qwix 0.1.8 cannot quantize inside nn.scan (scan=True)"
    )
  setting = setting or Setting(activations=calibration is not None)
  if setting.activations and calibration is None:
    raise errors.ConfigError("int8 activations need calibration images")
  params = jax.tree_util.tree_map(jnp.asarray, nn.meta.unbox(params))  # qwix takes jax.Arrays
  stats = calibrate(model, params, calibration, setting) if setting.activations else None
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(setting.rules()))
  abstract = jax.eval_shape(
    lambda: ptq_model.init(jax.random.PRNGKey(0), _dummy(model), train=False)
  )["params"]
  abstract = nn.meta.unbox(abstract)
  qparams = (
    qwix.quantize_params(params, abstract)
    if stats is None
    else qwix.quantize_params(params, abstract, stats)
  )
  return ptq_model, qparams, setting


def int8_layers(qparams: Any) -> list[str]:
  """The params paths that hold int8 arrays (for reports and tests)."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(qparams)[0]:
    if jnp.dtype(leaf.dtype) == jnp.int8:
      out.append(re.sub(r"[\[\]'.]+", "/", jax.tree_util.keystr(path)).strip("/"))
  return out
