"""The model: variants, parameter counts and names, dtypes, dropout, scan and remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import errors
from vit_jax import models
from vit_jax.models import spec
from vit_jax.models import vit


def analytic_params(d, mlp, layers, patch, image_size, classes, rep=None):
  """Parameter count from the architecture, written out term by term."""
  tokens = (image_size // patch) ** 2 + 1
  embed = patch * patch * 3 * d + d + d + tokens * d  # conv, conv bias, cls, posemb
  block = 2 * 2 * d + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)  # 2 LN, q/k/v/out, MLP
  head_in = rep or d
  pre = (d * rep + rep) if rep else 0
  return embed + layers * block + 2 * d + pre + head_in * classes + classes


def test_vit_b16_has_86_567_656_parameters():
  model = models.create_model("ViT-B_16", num_classes=1000, image_size=224)
  assert models.count_params(models.param_shapes(model)) == 86_567_656


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, v in spec.VARIANTS.items() if v.resnet_layers is None])
def test_variant_parameter_counts_match_the_architecture(name):  # hybrids: tests/test_hybrid.py
  v = spec.VARIANTS[name]
  model = models.create_model(name, num_classes=1000, image_size=224)
  want = analytic_params(v.hidden_size, v.mlp_dim, v.num_layers, v.patch_size, 224, 1000)
  assert models.count_params(models.param_shapes(model)) == want


def test_representation_size_adds_pre_logits():
  model = models.create_model("ViT-B_16", num_classes=21843, representation_size=768)
  shapes = models.param_shapes(model)
  assert shapes["pre_logits"]["kernel"].shape == (768, 768)
  assert models.count_params(shapes) == analytic_params(768, 3072, 12, 16, 224, 21843, rep=768)


@pytest.mark.parametrize("alias", ["B/16", "ViT-B/16", "vit_b16", "b_16", "ViT-B_16", "vit-b-16"])
def test_aliases(alias):
  assert spec.canonical_name(alias) == "ViT-B_16"


def test_ti_alias_and_unknown_names():
  assert spec.canonical_name("Ti/16") == "ViT-Ti_16"
  with pytest.raises(ValueError, match="unknown model 'ViT-Q_16'"):
    models.create_model("ViT-Q_16")
  with pytest.raises(ValueError, match="unknown model"):
    models.create_model("B/7")  # not a variant this project defines


def test_unknown_override_and_bad_image_size():
  with pytest.raises(errors.ConfigError, match="unknown model field"):  # a user mistake, one line
    models.create_model("B/16", hiden_size=3)
  with pytest.raises(ValueError, match="not divisible by the patch size 16"):
    models.create_model("B/16", image_size=225)


def test_param_names_are_the_linen_checkpoint_names():
  model = models.create_model(
    "Ti/16", num_classes=10, image_size=32, num_layers=2, representation_size=8
  )
  leaves = jax.tree_util.tree_flatten_with_path(models.param_shapes(model))[0]
  names = {"/".join(k.key for k in path) for path, _ in leaves}
  block = [
    "LayerNorm_0/scale",
    "LayerNorm_0/bias",
    "LayerNorm_1/scale",
    "LayerNorm_1/bias",
    "MlpBlock_0/Dense_0/kernel",
    "MlpBlock_0/Dense_0/bias",
    "MlpBlock_0/Dense_1/kernel",
    "MlpBlock_0/Dense_1/bias",
  ] + [
    f"MultiHeadDotProductAttention_0/{p}/{k}"
    for p in ("query", "key", "value", "out")
    for k in ("kernel", "bias")
  ]
  want = {
    "cls",
    "embedding/kernel",
    "embedding/bias",
    "Transformer/posembed_input/pos_embedding",
    "Transformer/encoder_norm/scale",
    "Transformer/encoder_norm/bias",
    "pre_logits/kernel",
    "pre_logits/bias",
    "head/kernel",
    "head/bias",
  }
  want |= {f"Transformer/encoderblock_{i}/{b}" for i in range(2) for b in block}
  assert names == want


def _tiny(**kw):
  kw = dict(num_classes=5, image_size=32, num_layers=2, **kw)
  return models.create_model("Ti/16", **kw)


def _randomize(params, seed=0):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return tree.unflatten(
    [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
  )


@pytest.mark.slow
def test_input_shape_is_checked():
  model = _tiny()
  params = models.init_params(model)
  with pytest.raises(ValueError, match=r"images must be \[N, 32, 32, 3\], got \(1, 48, 48, 3\)"):
    model.apply({"params": params}, jnp.zeros((1, 48, 48, 3)))


@pytest.mark.slow
def test_bf16_compute_with_fp32_params():
  model = _tiny()
  params = _randomize(models.init_params(model))
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
  # Compiled, as the model runs (op by op, bf16 on CPU takes several times as long).
  ref = jax.jit(model.apply)({"params": params}, x)
  bf = model.clone(dtype=jnp.bfloat16)
  out = jax.jit(bf.apply)({"params": params}, x)
  assert out.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(models.init_params(bf)))
  # bf16 keeps 8 mantissa bits: ~0.4% relative error per op, a few % after 2 blocks
  # (measured 1.6% of the largest logit op by op under every XLA:CPU kernel setting tried;
  # 1.2% compiled, AMD EPYC).
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1 * float(jnp.abs(ref).max()))
  assert not np.allclose(np.asarray(out, np.float32), ref, atol=1e-6)  # bf16 really was used


@pytest.mark.slow
def test_bf16_params():
  model = _tiny(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  params = models.init_params(model)
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert model.apply({"params": params}, jnp.zeros((1, 32, 32, 3))).dtype == jnp.bfloat16


@pytest.mark.slow
def test_dropout_only_in_training():
  model = _tiny(dropout_rate=0.3, attention_dropout_rate=0.3)
  params = _randomize(models.init_params(model))
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
  a = model.apply({"params": params}, x, train=False)
  b = model.apply({"params": params}, x, train=False)
  np.testing.assert_array_equal(a, b)  # the same computation on the same inputs: exact
  t1 = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  t2 = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(t1, t2)
  assert not np.allclose(t1, a)


@pytest.mark.slow
def test_embedding_is_what_the_head_sees():
  model = _tiny(representation_size=16)
  params = _randomize(models.init_params(model))
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 3), minval=-1, maxval=1)
  emb = model.apply({"params": params}, x, return_embedding=True)
  assert emb.shape == (3, 16)
  assert float(jnp.abs(emb).max()) <= 1.0  # pre_logits ends in tanh
  logits = model.apply({"params": params}, x)
  # One 16-long dot, in another program: u * sqrt(16) = 2.4e-7 of |logits| <= 0.3.
  np.testing.assert_allclose(
    emb @ params["head"]["kernel"] + params["head"]["bias"], logits, rtol=1e-5, atol=1e-6
  )
  headless = model.clone(num_classes=None)
  no_head = {k: v for k, v in params.items() if k != "head"}
  # Another program for the same ops (|emb| <= 1): the whole-model bound of
  # test_scan_and_remat_give_the_same_outputs_and_gradients, 2e-5 (measured: bit-equal).
  np.testing.assert_allclose(headless.apply({"params": no_head}, x), emb, rtol=0, atol=2e-5)


def _stack(params, n):
  blocks = [params["Transformer"].pop(f"encoderblock_{i}") for i in range(n)]
  params["Transformer"]["encoderblock"] = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *blocks)
  return params


@pytest.mark.slow
def test_scan_and_remat_give_the_same_outputs_and_gradients():
  model = _tiny()
  params = _randomize(models.init_params(model))
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)

  def loss(m, p):
    return jnp.sum(m.apply({"params": p}, x) ** 2)

  # Compiled, as training runs them (running op by op takes several times as long).
  ref, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  # Scan and remat are other compiled programs, free to sum in other orders. fp32 bound:
  # u * sqrt(K) summed over the 21 matmuls, softmaxes and norms on the path (K = 5 to 768)
  # = 1.6e-5 of the largest value; the backward pass doubles the depth: 4e-5 of the largest
  # gradient in the tree (the key bias's gradient is 0 in exact arithmetic, so both sides
  # hold rounding noise of that scale, not of its own). The loss, 10 squared logits: rtol
  # 1e-5 against 3.6e-7 measured. Measured under 6 XLA:CPU settings (AMD AVX2; YNNPACK,
  # Eigen or oneDNN dots; max ISA SSE4.2 to AVX2): gradients within 1.3e-7 of the largest.
  grad_atol = 4e-5 * max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(ref_grad))
  stacked = _stack(jax.tree_util.tree_map(lambda a: a, params), 2)
  for variant in (model.clone(scan=True), model.clone(scan=True, remat=True)):
    val, grad = jax.jit(jax.value_and_grad(lambda p, m=variant: loss(m, p)))(stacked)
    np.testing.assert_allclose(val, ref, rtol=1e-5)
    np.testing.assert_allclose(
      grad["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"][1],
      ref_grad["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"],
      rtol=0,
      atol=grad_atol,
    )
  val, grad = jax.jit(jax.value_and_grad(lambda p: loss(model.clone(remat=True), p)))(params)
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=grad_atol), grad, ref_grad
  )


@pytest.mark.slow
def test_last_block_on_the_class_token_alone_equals_the_full_block():
  block = vit.Encoder1DBlock(mlp_dim=32, num_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 9, 16))
  params = _randomize(block.init(jax.random.PRNGKey(1), x, True)["params"])
  pruned = block.clone(query_tokens=1)
  assert jax.tree_util.tree_structure(
    pruned.init(jax.random.PRNGKey(1), x, True)["params"]
  ) == jax.tree_util.tree_structure(params)

  def first_token(m, p, x):
    return m.apply({"params": p}, x, True)[:, :1]

  # Compiled, as the model runs (and a tenth of the time of running op by op).
  first_token = jax.jit(first_token, static_argnums=0)

  out = first_token(pruned, params, x)
  assert out.shape == (3, 1, 16)
  # Two programs (1 query row, or 9) for one block: fp32 bound u * sqrt(32) * ~9 ops = 3e-6 of
  # the largest value, 6e-6 for gradients (twice as deep). Measured under 6 XLA:CPU settings
  # (AMD AVX2): 2.1e-7 of the largest output, 5.3e-7 of the largest gradient.
  full = first_token(block, params, x)
  np.testing.assert_allclose(out, full, rtol=0, atol=3e-6 * float(np.abs(full).max()))
  # Every token still reaches the output through the keys and values.
  grads = [
    jax.jit(jax.grad(lambda p, x, m=m: jnp.sum(jnp.sin(first_token(m, p, x))), argnums=(0, 1)))(
      params, x
    )
    for m in (block, pruned)
  ]
  assert float(jnp.abs(grads[1][1][:, 1:]).min()) > 0
  # Relative to the largest gradient anywhere: the key bias's is 0 in exact arithmetic (softmax
  # ignores a shift), so both sides hold only rounding noise of that size.
  grad_atol = 6e-6 * max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads[0]))
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=grad_atol), grads[1], grads[0]
  )


@pytest.mark.slow
def test_a_token_classifier_runs_the_last_block_on_the_class_token_alone():
  model = _tiny()
  params = models.init_params(model)
  x = jnp.zeros((2, 32, 32, 3))
  _, state = model.apply({"params": params}, x, capture_intermediates=True)
  blocks = state["intermediates"]["Transformer"]
  assert blocks["encoderblock_0"]["__call__"][0].shape == (2, 5, 192)
  assert blocks["encoderblock_1"]["__call__"][0].shape == (2, 1, 192)
  gap = _tiny(classifier="gap")
  _, state = gap.apply({"params": models.init_params(gap)}, x, capture_intermediates=True)
  assert state["intermediates"]["Transformer"]["encoderblock_1"]["__call__"][0].shape == (2, 4, 192)


def test_params_carry_logical_axis_names():
  model = _tiny(scan=True)
  boxed = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  )
  specs = nn.get_partition_spec(boxed)
  assert specs["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"][
    "kernel"
  ] == jax.sharding.PartitionSpec("layers", "embed", "mlp")
  assert specs["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]["query"][
    "kernel"
  ] == jax.sharding.PartitionSpec("layers", "embed", "heads", "kv")
  assert specs["head"]["kernel"] == jax.sharding.PartitionSpec(None, "classes")


def test_gap_classifier_has_no_class_token():
  model = _tiny(classifier="gap")
  shapes = models.param_shapes(model)
  assert "cls" not in shapes
  assert shapes["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 4, 192)


def test_default_gelu_is_the_tanh_approximation():
  assert models.create_model("B/16").gelu_approximate is True


def _qkv(seed, shape=(2, 7, 3, 8)):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.normal(k, shape) * 2 for k in keys]


@pytest.mark.slow
def test_attention_matches_flax_attention():
  # The heads-first layout is only a speed choice: values and gradients must be Flax's.
  # Other einsums, so other summation orders (over 8 features, 7 keys) on values up to ~6:
  # measured under 6 XLA:CPU settings (AMD AVX2) <= 4.8e-7 for values and 1.9e-6 for
  # gradients, at most 1.2e-6 beyond the rtol part: 1e-5 leaves 8x.
  q, k, v = _qkv(0)
  np.testing.assert_allclose(
    vit.dot_product_attention(q, k, v), nn.dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5
  )
  mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.7, (2, 3, 7, 7)).at[..., 0].set(True)
  np.testing.assert_allclose(
    vit.dot_product_attention(q, k, v, mask),
    nn.dot_product_attention(q, k, v, mask=mask),
    atol=1e-5,
    rtol=1e-5,
  )
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  ours = jax.grad(loss(vit.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  theirs = jax.grad(loss(nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, theirs, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_attention_dropout_drops_normalized_weights():
  # Dropout zeroes whole attention weights and rescales the rest by 1/keep: with
  # v = one-hot over keys, the output rows are the (dropped) weights themselves.
  q, k, _ = _qkv(1, (1, 6, 2, 4))
  v = jnp.broadcast_to(jnp.eye(6)[None, :, None, :], (1, 6, 2, 6))
  weights = jnp.swapaxes(vit.dot_product_attention(q, k, v), 1, 2)  # [1, heads, q, k]
  dropped = jnp.swapaxes(
    vit.dot_product_attention(
      q, k, v, dropout_rng=jax.random.PRNGKey(0), dropout_rate=0.5, deterministic=False
    ),
    1,
    2,
  )
  kept = np.asarray(dropped) != 0
  assert 0 < kept.mean() < 1
  # The same softmax in another program, times 1/keep = 2 (exact): a few ulps if fused
  # differently (measured bit-equal); rtol 1e-5 is ~100 ulps.
  np.testing.assert_allclose(np.asarray(dropped)[kept], np.asarray(weights)[kept] / 0.5, rtol=1e-5)
  # Deterministic (the default) ignores the rate: the same computation, so exactly equal.
  np.testing.assert_array_equal(
    jnp.swapaxes(vit.dot_product_attention(q, k, v, dropout_rate=0.5), 1, 2), weights
  )
