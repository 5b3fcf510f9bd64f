"""Today's ViT training pieces in the model: stochastic depth and the fixed sin-cos embedding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import layout
from vit_jax.models import spec
from vit_jax.models import vit
from vit_jax.weights import checkpoint

FIELDS = dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=4, patch_size=4)


def _kept(model, params, x, rng=1):
  """The sown per-example masks of each layer: {(layer, branch): bool [N]}."""
  _, state = model.apply(
    {"params": params},
    x,
    train=True,
    rngs={"dropout": jax.random.PRNGKey(rng)},
    mutable=["intermediates"],
  )
  encoder = state["intermediates"]["Transformer"]
  out = {}
  if model.scan:
    block = encoder["encoderblock"]
    for branch in ("attention", "mlp"):
      stacked = np.asarray(block[f"{branch}_kept"][0])  # [layers, N]
      out |= {(i, branch): stacked[i] for i in range(model.num_layers)}
  else:
    for i in range(model.num_layers):
      for branch in ("attention", "mlp"):
        out[(i, branch)] = np.asarray(encoder[f"encoderblock_{i}"][f"{branch}_kept"][0])
  return out


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_drop_path_drops_each_layer_at_its_rate(scan, schedule):
  """timm's rule: rates rise linearly from 0 at the first block to the given rate at the last
  (torch.linspace(0, rate, depth)), or stay constant; each branch draws its own examples."""
  rate, n = 0.4, 4000
  model = models.create_model(
    None,
    num_classes=3,
    image_size=8,
    drop_path_rate=rate,
    drop_path_schedule=schedule,
    scan=scan,
    **FIELDS,
  )
  params = models.init_params(model)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (n, 8, 8, 3)), jnp.float32)
  kept = _kept(model, params, x)
  want = [rate * i / 3 for i in range(4)] if schedule == "linear" else [rate] * 4
  for (layer, _branch), mask in kept.items():
    p = want[layer]
    # A binomial count of n draws: within 5 standard deviations (1 in 1.7 million).
    assert abs((1 - mask.mean()) - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (layer, p)
  assert not np.array_equal(kept[(3, "attention")], kept[(3, "mlp")])  # drawn apart


@pytest.mark.slow
def test_a_kept_branch_is_scaled_by_one_over_keep_probability():
  """With the MLP branch zeroed, a block's training output is x + kept / (1 - rate) * a, where
  x + a is its output at evaluation."""
  rate = 0.25
  block = vit.Encoder1DBlock(mlp_dim=64, num_heads=4, drop_path=True)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(512, 5, 32)), jnp.float32)
  params = block.init(jax.random.PRNGKey(0), x, True)["params"]
  dense = params["MlpBlock_0"]["Dense_1"]
  params["MlpBlock_0"]["Dense_1"] = jax.tree_util.tree_map(jnp.zeros_like, dense)
  evaluated = block.apply({"params": params}, x, True, rate)
  trained, state = block.apply(
    {"params": params},
    x,
    False,
    rate,
    rngs={"dropout": jax.random.PRNGKey(3)},
    mutable=["intermediates"],
  )
  kept = np.asarray(state["intermediates"]["attention_kept"][0])
  assert 0 < kept.sum() < len(kept)
  want = x + (kept[:, None, None] / (1 - rate)) * (evaluated - x)
  # One float32 multiply and add apart: a few ulps of values of order 1.
  np.testing.assert_allclose(trained, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_evaluation_is_deterministic_and_drop_path_free():
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
  plain = models.create_model(None, num_classes=3, image_size=8, **FIELDS)
  dropped = plain.clone(drop_path_rate=0.5)
  params = jax.tree_util.tree_map(
    lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(4), p.shape), models.init_params(plain)
  )
  a = dropped.apply({"params": params}, x, train=False)
  np.testing.assert_array_equal(a, dropped.apply({"params": params}, x, train=False))
  np.testing.assert_array_equal(a, plain.apply({"params": params}, x, train=False))
  trained = dropped.apply(
    {"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(5)}
  )
  assert not np.array_equal(a, trained)


def test_sincos_embedding_is_the_formula():
  """MoCo v3's and big_vision's: token k at row k // w, column k % w; frequencies
  10000^(-d / (width/4 - 1)); channels sin(col), cos(col), sin(row), cos(row)."""
  h, w, width = 3, 5, 8
  got = np.asarray(vit.posemb_sincos_2d(h, w, width))
  assert got.shape == (1, h * w, width)
  quarter = width // 4
  for k in range(h * w):
    row, col = k // w, k % w
    for d in range(quarter):
      omega = 10_000.0 ** (-d / (quarter - 1))
      want = [
        math.sin(col * omega),
        math.cos(col * omega),
        math.sin(row * omega),
        math.cos(row * omega),
      ]
      # float32 sin and cos of arguments up to 4: within 2 ulps of 4, 1e-6.
      np.testing.assert_allclose(got[0, k, d::quarter], want, atol=1e-6, err_msg=(k, d))


@pytest.mark.slow
def test_a_sincos_model_adds_it_to_the_patches_not_the_class_token():
  """The same outputs as a learned-embedding model whose table is the sin-cos one with a zero
  row for the class token: big_vision adds it before the class token joins."""
  fixed = models.create_model(None, num_classes=3, image_size=8, posemb="sincos2d", **FIELDS)
  learned = fixed.clone(posemb="learn")
  params = jax.tree_util.tree_map(
    lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(6), p.shape), models.init_params(fixed)
  )
  assert "posembed_input" not in params["Transformer"]  # no parameter for a fixed embedding
  table = np.concatenate([np.zeros((1, 1, 32)), np.asarray(vit.posemb_sincos_2d(2, 2, 32))], 1)
  with_table = {
    **params,
    "Transformer": {**params["Transformer"], "posembed_input": {"pos_embedding": table}},
  }
  x = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  np.testing.assert_allclose(
    fixed.apply({"params": params}, x),
    learned.apply({"params": with_table}, x),
    rtol=1e-6,
    atol=1e-6,  # the same float32 sums, the embedding added at another point
  )


@pytest.mark.slow
def test_a_sincos_model_saves_to_and_loads_from_npz(tmp_path):
  model = models.create_model(None, num_classes=3, image_size=16, posemb="sincos2d", **FIELDS)
  params = jax.tree_util.tree_map(
    lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(8), p.shape), models.init_params(model)
  )
  path = str(tmp_path / "sincos.npz")
  checkpoint.save(params, path)
  with np.load(path) as saved:
    assert layout.POSEMB not in saved.files
  found = spec.ModelSpec.from_params(checkpoint.load(path), path, image_size=16)
  assert found.posemb == "sincos2d" and found.image_size == 16
  loaded = checkpoint.load_pretrained(path, models.build(found))
  x = jnp.asarray(np.random.default_rng(9).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  np.testing.assert_array_equal(
    model.apply({"params": loaded}, x), model.apply({"params": params}, x)
  )
  # A learned-embedding checkpoint fine-tunes into a sin-cos model: its table is dropped.
  learned = models.create_model(None, num_classes=3, image_size=16, **FIELDS)
  checkpoint.save(models.init_params(learned), str(tmp_path / "learned.npz"))
  assert (
    "posembed_input"
    not in checkpoint.load_pretrained(str(tmp_path / "learned.npz"), model)["Transformer"]
  )
