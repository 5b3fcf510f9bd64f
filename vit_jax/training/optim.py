"""The optimizer and its learning-rate schedule, on optax, with decisions by parameter name.

Fine-tuning (the paper's): SGD with momentum 0.9, linear warmup then cosine decay,
global-norm clipping at 1. Pre-training: Adam (b1 0.9, b2 0.999) with decoupled
weight decay, 10k warmup steps then linear decay, clipping at 1.

Which parameters decay, learn faster or slower, or stay frozen is decided by their
names, as big_vision decides it (big_vision/optax.py): `/`-joined paths such as
`Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel` (a scanned model has
`Transformer/encoderblock/...`, one array for every layer), matched by lists of
(regex, multiplier) pairs in which the first full match decides:

- `wd_mults`: weight decay (default `.*/kernel$` at 1: every Dense and Conv
  kernel, the head's included; no bias, norm, class token or position
  embedding). Decoupled, as optax's `adamw` and PyTorch's `AdamW`: each step
  subtracts lr * weight_decay * mult * param.
- `lr_mults`: learning-rate multipliers (no match: 1). A multiplier of 0
  freezes the parameter: its update is zero, it has no optimizer state, and its
  gradient does not count towards the clipping norm (as PyTorch's
  `requires_grad=False`).
- `layer_decay`: timm's layer-wise decay (`--layer-decay`,
  timm/optim/_param_groups.py): with L blocks, block i (from 0) learns at
  decay^(L - i), the embeddings (patch embedding, class token, position
  embedding, a hybrid's ResNet) at decay^(L + 1), the final norm with the last
  block at decay, the head (and `pre_logits`) at 1. timm's `group_matcher`
  puts the final norm in the last block's group. For a scanned model the
  multiplier of a stacked array is one per layer, along its first axis.

The optax pieces: `multi_transform` with `set_to_zero` freezes, `masked`
`add_decayed_weights` decay each group. optax has no transform that scales each
element of an array by its own factor, which a stacked layer's multipliers
need, so `scale_by_multipliers` below does that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import errors
from vit_jax.models import layout

Rules = Sequence[tuple[str, float]]
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
_SCANNED = "Transformer/encoderblock/"
# Everything the patches pass through before the first block: layer 0 of timm's grouping.
_EMBEDDINGS = re.compile(
  r"^(embedding|cls|Transformer/posembed_input|conv_root|gn_root|block\d+)(/|$)"
)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `base_lr`, then `decay_type` (cosine, linear, constant) to `end_lr`.

  Step 0 trains at lr 0, and the decay reaches `end_lr` at `total_steps`, one step
  after the last, as in the original code (vit_jax/utils.py there).
  """
  base, warmup, total = config.base_lr, config.warmup_steps, config.total_steps
  end = config.end_lr
  if warmup >= total:
    raise errors.ConfigError(f"warmup_steps {warmup} must be below total_steps {total}")
  if not 0.0 <= end <= base:
    raise errors.ConfigError(f"end_lr {end} must be between 0 and base_lr {base}")
  decay_type = config.decay_type
  if decay_type == "cosine":
    decay = optax.cosine_decay_schedule(base, total - warmup, alpha=end / base if base else 0.0)
  elif decay_type == "linear":
    decay = optax.linear_schedule(base, end, total - warmup)
  elif decay_type == "constant":
    decay = optax.constant_schedule(base)
  else:
    raise errors.ConfigError(f"decay_type must be cosine, linear or constant, got {decay_type!r}")
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), decay], [warmup])


def names(params: Any) -> dict[str, Any]:
  """The params' `/`-joined names and leaves (arrays or shapes)."""
  return layout.flatten(params)


def _rules(value: Any, key: str) -> list[tuple[re.Pattern, float]]:
  """A config's (regex, multiplier) pairs, compiled; a one-line error naming the bad one."""
  out = []
  for item in value or ():
    if not isinstance(item, (tuple, list)) or len(item) != 2:
      raise errors.ConfigError(f"config.{key}: {item!r} is not a (regex, multiplier) pair")
    pattern, mult = item
    try:
      compiled = re.compile(pattern)
    except (re.error, TypeError) as e:
      raise errors.ConfigError(f"config.{key}: {pattern!r} is not a regex ({e})") from None
    if not isinstance(mult, (int, float)) or mult < 0:
      raise errors.ConfigError(
        f"config.{key}: the multiplier of {pattern!r} must be >= 0, got {mult!r}"
      )
    out.append((compiled, float(mult)))
  return out


def match(name: str, rules: list[tuple[re.Pattern, float]], default: float) -> float:
  """The multiplier of the first rule whose regex matches all of `name`, else `default`."""
  return next((mult for pattern, mult in rules if pattern.fullmatch(name)), default)


def num_layers(flat: dict[str, Any]) -> int:
  """The encoder's blocks, from the names (or a scanned array's first axis)."""
  scanned = [v for k, v in flat.items() if k.startswith(_SCANNED)]
  if scanned:
    return int(scanned[0].shape[0])
  blocks = {int(m.group(1)) for k in flat if (m := _BLOCK.match(k))}
  return max(blocks) + 1 if blocks else 0


def layer_scale(name: str, shape: tuple[int, ...], layers: int, decay: float) -> float | np.ndarray:
  """timm's layer-wise multiplier of one parameter (an array of one per layer when scanned)."""
  if name.startswith(_SCANNED):
    return (decay ** (layers - np.arange(shape[0], dtype=np.float64))).reshape(
      (-1,) + (1,) * (len(shape) - 1)
    )
  if m := _BLOCK.match(name):
    return decay ** (layers - int(m.group(1)))
  if _EMBEDDINGS.match(name):
    return decay ** (layers + 1)
  if name.startswith("Transformer/encoder_norm/"):
    return decay
  return 1.0  # the head and pre_logits


def lr_multipliers(params: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Each parameter's learning-rate multiplier by name: `lr_mults` times the layer decay."""
  flat = names(params)
  rules = _rules(config.lr_mults, "lr_mults")
  decay = config.layer_decay
  if decay is not None and not 0.0 < decay <= 1.0:
    raise errors.ConfigError(f"config.layer_decay {decay} must be in (0, 1]")
  layers = num_layers(flat)
  out = {}
  for name, leaf in flat.items():
    mult = match(name, rules, 1.0)
    if decay is not None and mult:
      mult = mult * layer_scale(name, tuple(leaf.shape), layers, decay)
    out[name] = mult
  return out


def frozen(params: Any, config: ml_collections.ConfigDict) -> Any:
  """A tree of bools like `params`: True where the learning-rate multiplier is 0 throughout."""
  mults = lr_multipliers(params, config)
  return layout.unflatten({k: bool(np.all(np.asarray(m) == 0)) for k, m in mults.items()})


def wd_multipliers(params: Any, config: ml_collections.ConfigDict) -> dict[str, float]:
  """Each parameter's weight-decay multiplier by name (`wd_mults`; no match: no decay)."""
  rules = _rules(config.wd_mults, "wd_mults")
  return {name: match(name, rules, 0.0) for name in names(params)}


class ScaleByMultipliersState(NamedTuple):
  """No state: the multipliers are constants."""


def scale_by_multipliers(mults: Any) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's multiplier (a scalar, or an array that broadcasts
  along the first axis)."""

  def init(params):
    del params
    return ScaleByMultipliersState()

  def update(updates, state, params=None):
    del params
    # Inside multi_transform, frozen parameters' updates are MaskedNodes: passed on as they are.
    scaled = jax.tree_util.tree_map(
      lambda m, u: u if isinstance(u, optax.MaskedNode) else u * jnp.asarray(m, u.dtype),
      mults,
      updates,
    )
    return scaled, state

  return optax.GradientTransformation(init, update)


def _base(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer's own rule, before weight decay and the learning rate."""
  name = config.optimizer
  if name == "sgd":
    return optax.trace(decay=config.momentum, accumulator_dtype=config.accumulator_dtype)
  if name == "adam":
    mu_dtype = config.mu_dtype
    if mu_dtype is not None and mu_dtype not in _DTYPES:
      raise errors.ConfigError(
        f"config.mu_dtype must be one of {sorted(_DTYPES)}, got {mu_dtype!r}"
      )
    return optax.scale_by_adam(
      b1=config.b1, b2=config.b2, mu_dtype=_DTYPES[mu_dtype] if mu_dtype else None
    )
  raise errors.ConfigError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def make_optimizer(
  config: ml_collections.ConfigDict, params: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer `config` describes for `params` (arrays or shapes: only names and shapes are
  read), and its learning-rate schedule.

  Clipping, the optimizer's rule, decoupled weight decay, the learning rate, then the
  per-parameter multipliers; frozen parameters (a multiplier of 0) get none of it.
  """
  lr = schedule(config)
  flat = names(params)
  lr_mults = lr_multipliers(params, config)
  wd_mults = wd_multipliers(params, config)
  frozen = {k for k, m in lr_mults.items() if np.all(np.asarray(m) == 0)}
  if len(frozen) == len(flat):
    raise errors.ConfigError("config.lr_mults freezes every parameter: nothing would train")
  chain = []
  if config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(_base(config))
  if config.weight_decay:
    for mult in sorted({m for k, m in wd_mults.items() if m and k not in frozen}):
      mask = layout.unflatten({k: wd_mults[k] == mult and k not in frozen for k in flat})
      chain.append(optax.masked(optax.add_decayed_weights(config.weight_decay * mult), mask))
  chain.append(optax.scale_by_learning_rate(lr))
  if any(np.any(np.asarray(m) != 1) for k, m in lr_mults.items() if k not in frozen):
    chain.append(scale_by_multipliers(layout.unflatten(lr_mults)))
  tx = optax.chain(*chain)
  if frozen:
    labels = layout.unflatten({k: "frozen" if k in frozen else "train" for k in flat})
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, lr


def describe(params: Any, config: ml_collections.ConfigDict) -> list[tuple[str, Any, float]]:
  """(name, lr multiplier, weight-decay multiplier) of every parameter, for logs and docs."""
  lr_mults, wd_mults = lr_multipliers(params, config), wd_multipliers(params, config)
  return [(k, lr_mults[k], wd_mults[k] if config.weight_decay else 0.0) for k in names(params)]
