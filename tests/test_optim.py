"""Optimizers and schedules: values at given steps, the weight-decay mask, clipping, dtypes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.config import recipes
from vit_jax.config import schema
from vit_jax.models import layout
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
  tx, _ = optim.make_optimizer(config, params)
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
  return params, state


def _vit(**kw):
  """A real ViT's parameter tree (2 blocks, pre_logits, a head), every value 2."""
  fields = dict(hidden_size=8, mlp_dim=16, num_heads=2, num_layers=2, patch_size=4)
  model = models.create_model(
    None, num_classes=3, image_size=8, representation_size=8, **{**fields, **kw}
  )
  return model, jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 2.0), models.param_shapes(model))


# The ViT's parameters that decay by default, written out (big_vision's `.*/kernel$`): every
# Dense and Conv kernel. Not the query/key/value biases (2-D: [heads, head_dim]), the class
# token or the position embedding, which a mask by rank would have decayed.
DECAYED = {
  "embedding/kernel",
  "pre_logits/kernel",
  "head/kernel",
  *(
    f"Transformer/encoderblock_{i}/{m}/kernel"
    for i in range(2)
    for m in (
      "MultiHeadDotProductAttention_0/query",
      "MultiHeadDotProductAttention_0/key",
      "MultiHeadDotProductAttention_0/value",
      "MultiHeadDotProductAttention_0/out",
      "MlpBlock_0/Dense_0",
      "MlpBlock_0/Dense_1",
    )
  ),
}


@pytest.mark.slow
def test_adamw_decays_the_real_models_kernels_and_nothing_else():
  # Zero gradients: Adam's own update is 0, so what moves is the decoupled decay alone,
  # lr * weight_decay * param, on the decayed parameters only.
  cfg = _config(
    optimizer="adam", weight_decay=0.5, warmup_steps=1, decay_type="constant", grad_clip_norm=0.0
  )
  _, params = _vit()
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  # Step 0 has lr 0 (warmup); step 1 runs at lr 0.1.
  after = layout.flatten(_step(cfg, zeros, params=params, steps=2)[0])
  assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/bias" in after
  assert {"cls", "Transformer/posembed_input/pos_embedding"} <= set(after)
  for name, value in after.items():
    want = 2.0 - 0.1 * 0.5 * 2.0 if name in DECAYED else 2.0
    np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=name)  # float32 ulps


def test_wd_mults_choose_by_name_first_match_wins():
  cfg = _config(
    optimizer="adam", weight_decay=0.5, warmup_steps=1, decay_type="constant", grad_clip_norm=0.0
  )
  cfg.wd_mults = (("head/kernel", 2.0), (".*/kernel$", 0.5), ("cls", 1.0))
  _, params = _vit()
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  after = layout.flatten(_step(cfg, zeros, params=params, steps=2)[0])
  np.testing.assert_allclose(after["head/kernel"], 2.0 - 0.1 * 0.5 * 2.0 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(after["embedding/kernel"], 2.0 - 0.1 * 0.5 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(after["cls"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(after["head/bias"], 2.0)


def test_a_zero_lr_multiplier_freezes_with_no_optimizer_state():
  cfg = _config(optimizer="adam", warmup_steps=1, decay_type="constant", weight_decay=0.5)
  cfg.lr_mults = (("head/.*", 1.0), (".*", 0.0))  # a linear probe: the head alone trains
  _, params = _vit()
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  after, state = _step(cfg, grads, params=params, steps=3)
  after = layout.flatten(after)
  for name, value in after.items():
    moved = not np.array_equal(value, np.full(value.shape, 2.0))
    assert moved == name.startswith("head/"), name
  # Adam keeps two moments of the head alone: 2 x (3 x 8 + 3) floats, not the whole model's.
  floats = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.dtype == jnp.float32)
  assert floats == 2 * (3 * 8 + 3)


def test_frozen_gradients_do_not_count_towards_clipping():
  # Only the head trains: its gradient (norm 3) is clipped to 1 whatever the frozen ones are.
  cfg = _config(momentum=0.0, warmup_steps=1, decay_type="constant", grad_clip_norm=1.0)
  cfg.lr_mults = (("head/bias", 1.0), (".*", 0.0))
  _, params = _vit()
  grads = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 100.0), params)
  grads["head"]["bias"] = jnp.asarray([1.0, 2.0, 2.0])
  after = _step(cfg, grads, params=params, steps=2)[0]
  np.testing.assert_allclose(after["head"]["bias"], 2.0 - 0.1 * np.array([1, 2, 2]) / 3, rtol=1e-6)


def test_layer_decay_is_timms_grouping():
  """With L = 2 blocks and decay d: embeddings d^3, block 0 d^2, block 1 d, the final norm d
  (timm's group_matcher puts it with the last block), pre_logits and the head 1."""
  d = 0.5
  cfg = _config(layer_decay=d)
  _, params = _vit()
  mults = optim.lr_multipliers(params, cfg)
  want = {
    "embedding/": d**3,
    "cls": d**3,
    "Transformer/posembed_input/": d**3,
    "Transformer/encoderblock_0/": d**2,
    "Transformer/encoderblock_1/": d,
    "Transformer/encoder_norm/": d,
    "pre_logits/": 1.0,
    "head/": 1.0,
  }
  for name, m in mults.items():
    prefix = next(p for p in want if name.startswith(p))
    assert m == pytest.approx(want[prefix]), name
  # lr_mults multiply the layer's factor.
  cfg.lr_mults = (("Transformer/encoderblock_0/.*", 4.0),)
  mults = optim.lr_multipliers(params, cfg)
  assert mults["Transformer/encoderblock_0/LayerNorm_0/scale"] == pytest.approx(4 * d**2)


@pytest.mark.slow
def test_layer_decay_gives_the_same_update_scanned():
  """The scanned model stacks the blocks on a first axis: each layer's slice gets its own factor."""
  cfg = _config(
    optimizer="adam", layer_decay=0.6, warmup_steps=1, decay_type="constant", weight_decay=0.1
  )
  model, params = _vit()
  rng = np.random.default_rng(0)
  grads = jax.tree_util.tree_map(
    lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
  )
  plain = layout.flatten(_step(cfg, grads, params=params, steps=3)[0])
  stack = lambda tree: layout.unflatten(layout.stack_blocks(layout.flatten(tree), 2))
  scanned = _step(cfg, stack(grads), params=stack(params), steps=3)[0]
  scanned = layout.unstack_blocks(layout.flatten(scanned))
  assert scanned.keys() == plain.keys()
  for name in plain:
    np.testing.assert_allclose(scanned[name], plain[name], rtol=1e-6, err_msg=name)  # float32


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("wd_mults", (("[unclosed", 1.0),), r"config.wd_mults: '\[unclosed' is not a regex"),
    ("lr_mults", (("head/.*",),), r"config.lr_mults: \('head/.\*',\) is not a \(regex"),
    ("lr_mults", (("head/.*", -1.0),), "the multiplier of 'head/.\\*' must be >= 0"),
    ("lr_mults", ((".*", 0.0),), "freezes every parameter"),
    ("layer_decay", 1.5, "config.layer_decay 1.5 must be in"),
  ],
)
def test_bad_rules_are_one_line_errors(key, value, message):
  cfg = _config()
  cfg[key] = value
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(cfg, _vit()[1])


@pytest.mark.slow
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
    optim.make_optimizer(_config(optimizer="lion"), PARAMS)


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
