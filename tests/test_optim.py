"""Optimizers and schedules: values at given steps, the weight-decay mask, clipping, dtypes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import configs
from vit_jax import optim


def _config(**kw):
  c = configs.base()
  c.base_lr, c.warmup_steps, c.total_steps = 0.1, 10, 110
  for k, v in kw.items():
    c[k] = v
  return c


# Hand-computed: warmup is linear from 0 over 10 steps; the decay spans the 100 steps after it.
@pytest.mark.parametrize("decay_type,step,want", [
    ("cosine", 0, 0.0), ("cosine", 5, 0.05), ("cosine", 10, 0.1),
    ("cosine", 60, 0.1 * 0.5 * (1 + math.cos(math.pi * 0.5))), ("cosine", 35, 0.1 * 0.5 * (1 + math.cos(math.pi * 0.25))),
    ("cosine", 110, 0.0),
    ("linear", 5, 0.05), ("linear", 10, 0.1), ("linear", 35, 0.075), ("linear", 60, 0.05), ("linear", 110, 0.0),
    ("constant", 5, 0.05), ("constant", 10, 0.1), ("constant", 109, 0.1),
])
def test_schedule_values(decay_type, step, want):
  lr = optim.schedule(_config(decay_type=decay_type))
  # optax evaluates in float32: a few ulps of 0.1.
  assert float(lr(step)) == pytest.approx(want, abs=1e-7)


def test_schedule_refuses_bad_settings():
  with pytest.raises(ValueError, match="warmup_steps 110 must be below total_steps 110"):
    optim.schedule(_config(warmup_steps=110))
  with pytest.raises(ValueError, match="decay_type must be cosine, linear or constant, got 'exp'"):
    optim.schedule(_config(decay_type="exp"))


PARAMS = {"dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
          "norm": {"scale": jnp.full((4,), 2.0)}}


def _step(config, grads, params=PARAMS, steps=1):
  tx, _ = optim.make_optimizer(config)
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
  return params, state


def test_adamw_decays_kernels_only():
  # Zero gradients: Adam's own update is 0, so what moves is the decoupled decay alone,
  # lr * weight_decay * param, and only on the kernel.
  cfg = _config(optimizer="adam", weight_decay=0.5, warmup_steps=1, decay_type="constant",
                grad_clip_norm=0.0)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
  # Step 0 has lr 0 (warmup); step 1 runs at lr 0.1.
  params, _ = _step(cfg, zeros, steps=2)
  np.testing.assert_allclose(params["dense"]["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(params["dense"]["bias"], PARAMS["dense"]["bias"])
  np.testing.assert_array_equal(params["norm"]["scale"], PARAMS["norm"]["scale"])


def test_clipping_at_the_global_norm():
  cfg = _config(momentum=0.0, warmup_steps=1, decay_type="constant", grad_clip_norm=1.0)
  # Global norm sqrt(12 * 9 + 4 * 16 + 4 * 0) = sqrt(172): clipped to norm 1.
  grads = {"dense": {"kernel": jnp.full((3, 4), 3.0), "bias": jnp.full((4,), 4.0)},
           "norm": {"scale": jnp.zeros((4,))}}
  params, _ = _step(cfg, grads, steps=2)  # the first step runs at lr 0
  norm = math.sqrt(12 * 9 + 4 * 16)
  np.testing.assert_allclose(params["dense"]["kernel"], 2.0 - 0.1 * 3.0 / norm, rtol=1e-6)
  np.testing.assert_allclose(params["dense"]["bias"], 2.0 - 0.1 * 4.0 / norm, rtol=1e-6)
  # A gradient under the norm is left as it is.
  small = jax.tree_util.tree_map(lambda g: g / 100, grads)
  params, _ = _step(cfg, small, steps=2)
  np.testing.assert_allclose(params["dense"]["kernel"], 2.0 - 0.1 * 0.03, rtol=1e-6)


def test_sgd_momentum_and_its_accumulator_dtype():
  grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
  cfg = _config(warmup_steps=1, decay_type="constant", grad_clip_norm=0.0)
  params, state = _step(cfg, grads, steps=3)
  # lr 0 at step 0 (the trace still gathers it), then 0.1 * (1 + 0.9) and 0.1 * (1 + 0.9 + 0.81).
  np.testing.assert_allclose(params["dense"]["bias"], 2.0 - 0.1 * (1.9 + 2.71), rtol=1e-6)
  traces = [x for x in jax.tree_util.tree_leaves(state) if getattr(x, "shape", None) == (3, 4)]
  assert traces and all(t.dtype == jnp.float32 for t in traces)
  cfg.accumulator_dtype = "bfloat16"
  _, state = _step(cfg, grads)
  traces = [x for x in jax.tree_util.tree_leaves(state) if getattr(x, "shape", None) == (3, 4)]
  assert traces and all(t.dtype == jnp.bfloat16 for t in traces)


def test_unknown_optimizer():
  with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam', got 'lion'"):
    optim.make_optimizer(_config(optimizer="lion"))
