"""`vit_jax.models.to_nnx`: the Linen ViT as a flax.nnx module, exact and trainable."""

import ckpt_fixtures as cf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vit_jax import errors
from vit_jax import models
from vit_jax.weights import checkpoint


def _images(n=4, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize(
  "spec, options",
  [
    (cf.Spec(classes=5), {}),
    (cf.Spec(classes=5), {"scan": True}),
    (cf.Spec(classes=5, pre_logits=24, cls=False), {}),  # gap classifier, pre_logits
    (cf.Spec(classes=5, hidden=32, mlp=64, heads=2, patch=1, resnet=(1,)), {}),  # a hybrid
  ],
  ids=["unrolled", "scanned", "gap+pre_logits", "hybrid"],
)
def test_the_nnx_module_holds_the_params_and_equals_linen_exactly(tmp_path, spec, options):
  path = tmp_path / "m.npz"
  cf.write_original(path, spec)
  tree = checkpoint.load(str(path))
  from vit_jax.models import spec as spec_lib

  found = spec_lib.ModelSpec.from_params(tree, str(path))
  model = models.build(found, **options)
  params = checkpoint.load_pretrained(tree, model, source=str(path))
  module = models.to_nnx(model, params)
  x = _images()
  # The same Linen apply runs under the bridge: bit for bit, not within a tolerance.
  np.testing.assert_array_equal(
    np.asarray(module(x, train=False)), np.asarray(model.apply({"params": params}, x, train=False))
  )
  # The params are the given arrays (no second copy), with their logical axis names.
  state = nnx.state(module, nnx.Param)
  leaves = jax.tree_util.tree_leaves(params)
  got = jax.tree_util.tree_leaves(nnx.to_pure_dict(state))
  assert len(got) == len(leaves) and all(a is b for a, b in zip(got, leaves, strict=True))
  kernel = module.Transformer["encoder_norm"]["scale"]
  assert kernel.out_sharding == ("embed",)


@pytest.mark.slow
def test_params_that_do_not_fit_are_one_line():
  model = models.create_model("Ti/16", num_classes=3, image_size=32, num_layers=1)
  params = models.init_params(model)
  params["head"]["kernel"] = jnp.zeros((7, 3))
  with pytest.raises(errors.CheckpointError, match=r"head/kernel is \(\(7, 3\)"):
    models.to_nnx(model, params)
  del params["head"]
  with pytest.raises(errors.CheckpointError, match="missing head/bias"):
    models.to_nnx(model, params)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_the_nnx_module_fine_tunes_with_nnx_optimizer(scan):
  """A few Adam steps on a fixed batch: the loss falls, and Linen sees the trained params."""
  model = models.create_model(
    None,
    num_classes=3,
    image_size=16,
    patch_size=8,
    hidden_size=32,
    mlp_dim=64,
    num_heads=2,
    num_layers=2,
    dropout_rate=0.1,
    scan=scan,
  )
  params = models.init_params(model, 1)
  module = models.to_nnx(model, params, seed=3)
  x, y = _images(8, 16, seed=1), jnp.arange(8) % 3
  optimizer = nnx.Optimizer(module, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(module, optimizer, x, y):
    def loss_fn(module):
      logits = module(x, train=True)  # dropout draws from the module's stream
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(module)
    optimizer.update(module, grads)
    return loss

  eval_loss = lambda p: float(
    optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x, train=False), y
    ).mean()
  )
  before = eval_loss(params)
  losses = [float(step(module, optimizer, x, y)) for _ in range(8)]
  trained = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  after = eval_loss(trained)
  # The zero head starts at ln(3) = 1.0986; 8 steps on 8 images take it well below.
  assert before == pytest.approx(np.log(3), abs=1e-6)
  assert after < before - 0.1 and losses[-1] < losses[0], (before, after, losses)
  assert int(optimizer.step[...]) == 8
  # The trained params are a Linen params tree: the module and Linen agree on them.
  np.testing.assert_array_equal(
    np.asarray(module(x, train=False)),
    np.asarray(model.apply({"params": trained}, x, train=False)),
  )
