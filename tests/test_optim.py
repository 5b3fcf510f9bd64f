"""Optimizers and schedules: values at given steps, the weight-decay mask, clipping, dtypes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.config import recipes
from vit_jax.config import schema
from vit_jax.training import optim


def _config(**kw):
  c = schema.base()
  c.base_lr, c.warmup_steps, c.total_steps = 0.1, 10, 110
  for k, v in kw.items():
    c[k] = v
  return c


# Hand-computed: warmup is linear from 0 over 10 steps; the decay spans the 100 steps after it.
@pytest.mark.parametrize(
  "decay_type,step,want",
  [
    ("cosine", 0, 0.0),
    ("cosine", 5, 0.05),
    ("cosine", 10, 0.1),
    ("cosine", 60, 0.1 * 0.5 * (1 + math.cos(math.pi * 0.5))),
    ("cosine", 35, 0.1 * 0.5 * (1 + math.cos(math.pi * 0.25))),
    ("cosine", 110, 0.0),
    ("linear", 5, 0.05),
    ("linear", 10, 0.1),
    ("linear", 35, 0.075),
    ("linear", 60, 0.05),
    ("linear", 110, 0.0),
    ("constant", 5, 0.05),
    ("constant", 10, 0.1),
    ("constant", 109, 0.1),
  ],
)
def test_schedule_values(decay_type, step, want):
  lr = optim.schedule(_config(decay_type=decay_type))
  # optax evaluates in float32: a few ulps of 0.1.
  assert float(lr(step)) == pytest.approx(want, abs=1e-7)


# The same schedules ending at end_lr 0.01 instead of 0: the decay spans base - end.
@pytest.mark.parametrize(
  "decay_type,step,want",
  [
    ("cosine", 10, 0.1),
    ("cosine", 60, 0.01 + 0.09 * 0.5),
    ("cosine", 110, 0.01),
    ("linear", 10, 0.1),
    ("linear", 60, 0.055),
    ("linear", 110, 0.01),
    ("constant", 109, 0.1),
  ],
)
def test_schedule_decays_to_end_lr(decay_type, step, want):
  lr = optim.schedule(_config(decay_type=decay_type, end_lr=0.01))
  assert float(lr(step)) == pytest.approx(want, abs=1e-7)  # a few float32 ulps of 0.1


def test_schedule_refuses_bad_settings():
  with pytest.raises(ValueError, match="warmup_steps 110 must be below total_steps 110"):
    optim.schedule(_config(warmup_steps=110))
  with pytest.raises(ValueError, match="decay_type must be cosine, linear or constant, got 'exp'"):
    optim.schedule(_config(decay_type="exp"))
  with pytest.raises(ValueError, match="end_lr 0.2 must be between 0 and base_lr 0.1"):
    optim.schedule(_config(end_lr=0.2))


PARAMS = {
  "dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
  "norm": {"scale": jnp.full((4,), 2.0)},
}


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
  cfg = _config(
    optimizer="adam", weight_decay=0.5, warmup_steps=1, decay_type="constant", grad_clip_norm=0.0
  )
  zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
  # Step 0 has lr 0 (warmup); step 1 runs at lr 0.1.
  params, _ = _step(cfg, zeros, steps=2)
  np.testing.assert_allclose(params["dense"]["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(params["dense"]["bias"], PARAMS["dense"]["bias"])
  np.testing.assert_array_equal(params["norm"]["scale"], PARAMS["norm"]["scale"])


def test_clipping_at_the_global_norm():
  cfg = _config(momentum=0.0, warmup_steps=1, decay_type="constant", grad_clip_norm=1.0)
  # Global norm sqrt(12 * 9 + 4 * 16 + 4 * 0) = sqrt(172): clipped to norm 1.
  grads = {
    "dense": {"kernel": jnp.full((3, 4), 3.0), "bias": jnp.full((4,), 4.0)},
    "norm": {"scale": jnp.zeros((4,))},
  }
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


def test_pretraining_recipe_is_the_released_checkpoints_recipe():
  """vision_transformer issue #2's table, and big_vision's sigmoid loss with a -10 head bias."""
  from vit_jax.training import steps

  c = recipes.read("vit_b16_pretrain_i21k")
  assert (c.optimizer, c.b1, c.b2, c.batch_size, c.base_lr) == ("adam", 0.9, 0.999, 4096, 1e-3)
  assert (c.warmup_steps, c.decay_type, c.end_lr) == (10_000, "linear", 1e-5)
  assert (c.weight_decay, c.grad_clip_norm, c.loss) == (0.03, 1.0, "sigmoid_xent")
  assert (c.model.name, c.model.dropout_rate, c.model.representation_size) == ("ViT-B_16", 0.1, 768)
  assert c.model.head_bias_init == -10.0 and c.pretrained is None and c.image_size == 224
  # About 90 epochs of ImageNet-21k's 14.2M images.
  assert 85 <= c.total_steps * c.batch_size / 14_197_122 <= 95
  lr = optim.schedule(c)
  assert float(lr(10_000)) == pytest.approx(1e-3, rel=1e-6)  # float32 ulps
  assert float(lr(c.total_steps)) == pytest.approx(1e-5, rel=1e-5)
  model = steps.model_from_config(c, 21_843)
  assert model.head_bias_init == -10.0 and model.representation_size == 768


@pytest.mark.slow
@pytest.mark.parametrize(
  "loss,bias", [("sigmoid_xent", -10.0), ("softmax_xent", 0.0), ("auto", 0.0)]
)
def test_the_loss_and_head_bias_fields_reach_the_train_step(loss, bias):
  """At init the head's kernel is zero, so every logit is the head bias: the loss is known.

  sigmoid_xent over C classes: softplus(-b) for the true class plus (C - 1) softplus(b);
  softmax_xent (and auto, on single-label data): log C.
  """
  from vit_jax.training import sharding
  from vit_jax.training import steps

  c = _config(loss=loss, batch_size=4, eval_batch_size=4, image_size=16)
  c.model.update(
    dict(
      name="ViT-Ti_16",
      hidden_size=16,
      mlp_dim=32,
      num_heads=2,
      num_layers=1,
      patch_size=8,
      head_bias_init=bias,
    )
  )
  setup = steps.Setup(c, 7, False, sharding.make_mesh())
  state = setup.init_state(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(
    np.asarray(state.params["head"]["bias"]), np.full(7, bias, np.float32)
  )
  batch = {"image": jnp.zeros((4, 16, 16, 3)), "label": jnp.asarray([0, 1, 2, 6])}
  softplus = lambda x: math.log1p(math.exp(x))
  want = softplus(-bias) + 6 * softplus(bias) if loss == "sigmoid_xent" else math.log(7)
  sums, _ = setup.jit_eval_step()(state.params, dict(batch, mask=jnp.ones(4, bool)))
  assert float(sums["loss_sum"]) == pytest.approx(
    4 * want, rel=1e-6
  )  # the eval loss is the same loss
  _, m = setup.jit_train_step()(state, batch, jax.random.PRNGKey(1))  # (donates `state`)
  assert float(m["loss"]) == pytest.approx(want, rel=1e-6)  # float32 log/exp: a few ulps


def test_softmax_loss_on_multilabel_data_is_refused():
  from vit_jax.training import sharding
  from vit_jax.training import steps

  c = _config(loss="softmax_xent", batch_size=4, eval_batch_size=4, image_size=16)
  c.model.update(
    dict(name="ViT-Ti_16", hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1, patch_size=8)
  )
  with pytest.raises(
    ValueError, match="softmax_xent needs one label per image; this dataset is multi-label"
  ):
    steps.Setup(c, 7, True, sharding.make_mesh())
  c.loss = "hinge"
  with pytest.raises(
    ValueError, match="config.loss must be 'auto' or one of softmax_xent, sigmoid_xent, got 'hinge'"
  ):
    steps.Setup(c, 7, False, sharding.make_mesh())
