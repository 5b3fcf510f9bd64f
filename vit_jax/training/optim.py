"""Optimizers and learning-rate schedules from optax, as the paper's recipes use them.

Fine-tuning: SGD with momentum 0.9, linear warmup then cosine decay, global-norm
clipping at 1. Pre-training: Adam (b1 0.9, b2 0.999) with decoupled weight
decay on the kernels, 10k warmup steps then linear decay, clipping at 1.
Weight decay is optax's `adamw`: each step subtracts lr * weight_decay * param.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from vit_jax import errors


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `base_lr`, then `decay_type` ('cosine', 'linear' or 'constant') to
  `end_lr`.
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


def _kernels_only(params: Any) -> Any:
  """Weight decay on matrices and conv kernels, not on biases, norms or embeddings' scales."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(
  config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer named by `config.optimizer` ('sgd' or 'adam'), with clipping and schedule."""
  lr = schedule(config)
  name = config.optimizer
  if name == "sgd":
    opt = optax.sgd(
      lr, momentum=config.momentum, nesterov=False, accumulator_dtype=config.accumulator_dtype
    )
  elif name == "adam":
    opt = optax.adamw(
      lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=_kernels_only
    )
  else:
    raise errors.ConfigError(f"optimizer must be 'sgd' or 'adam', got {name!r}")
  clip = config.grad_clip_norm
  chain = [optax.clip_by_global_norm(clip)] if clip else []
  return optax.chain(*chain, opt), lr
