"""The model, train state, shardings and jitted steps a config describes.

`Setup` is shared by training, evaluation and the ahead-of-time compile check
(`vit-jax aot`), so that all three run exactly the same sharded computation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import errors
from vit_jax import models
from vit_jax.models import spec as spec_lib
from vit_jax.training import metrics
from vit_jax.training import optim
from vit_jax.training import sharding

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # An exponential moving average of the params after each step (config.ema_decay), else None.
  ema_params: Any = None


def model_from_config(
  config: ml_collections.ConfigDict, num_classes: int
) -> models.VisionTransformer:
  """The model of `config.model` at `config.image_size`: a variant name and/or its fields."""
  # Unset (None) fields keep the variant's value.
  m = {k: v for k, v in config.model.to_dict().items() if v is not None}
  name = m.pop("name", None)
  arch = {k: m.pop(k) for k in list(m) if k not in models.RUNTIME_FIELDS}
  for key in ("dtype", "param_dtype"):
    if key in m:
      if m[key] not in _DTYPES:
        raise errors.ConfigError(
          f"config.model.{key} must be one of {sorted(_DTYPES)}, got {m[key]!r}"
        )
      m[key] = _DTYPES[m[key]]
  model_spec = spec_lib.ModelSpec.from_fields(
    name, num_classes=num_classes, image_size=config.image_size, **arch
  )
  return models.build(model_spec, **m)


@dataclasses.dataclass
class Setup:
  """Everything derived from (config, num_classes, mesh) that the steps need."""

  config: ml_collections.ConfigDict
  num_classes: int
  multilabel: bool
  mesh: Mesh

  def __post_init__(self):
    c = self.config
    self.model = model_from_config(c, self.num_classes)
    self.sigmoid_loss = _sigmoid_loss(c.loss, self.multilabel)
    self.accum_steps = int(c.accum_steps)
    sharding.check_divisible(c.batch_size, self.mesh, "config.batch_size")
    if c.batch_size % self.accum_steps or (c.batch_size // self.accum_steps) % _data_size(
      self.mesh
    ):
      raise errors.ConfigError(
        f"config.batch_size {c.batch_size} with accum_steps {self.accum_steps} gives "
        f"micro-batches that do not split over {_data_size(self.mesh)} data-parallel devices"
      )
    sharding.check_divisible(c.eval_batch_size, self.mesh, "config.eval_batch_size")
    self.rules = list(c.logical_rules or sharding.LOGICAL_RULES)
    boxed = jax.eval_shape(lambda: models.init_params(self.model, 0, boxed=True))
    self.param_shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
    self.param_shapes = nn.meta.unbox(boxed)
    self.tx, self.lr_schedule = optim.make_optimizer(c, self.param_shapes)
    self.ema_decay = c.ema_decay
    if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
      raise errors.ConfigError(f"config.ema_decay {self.ema_decay} must be in (0, 1), or None")
    self.frozen = optim.frozen(self.param_shapes, c)
    opt_shapes = jax.eval_shape(self.tx.init, self.param_shapes)
    # Optimizer state mirrors the params it belongs to; scalars (counts) are replicated.
    self.state_shardings = TrainState(
      step=sharding.replicated(self.mesh),
      params=self.param_shardings,
      opt_state=_opt_shardings(opt_shapes, self.param_shapes, self.param_shardings, self.mesh),
      ema_params=None if self.ema_decay is None else self.param_shardings,
    )
    self.batch_sharding = sharding.batch_sharding(self.mesh)

  # -- state ---------------------------------------------------------------

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings, e.g. the target of an Orbax restore."""
    shapes = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params=self.param_shapes,
      opt_state=jax.eval_shape(self.tx.init, self.param_shapes),
      ema_params=None if self.ema_decay is None else self.param_shapes,
    )
    return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes,
      self.state_shardings,
    )

  def init_state(self, rng: jax.Array, params: Any | None = None) -> TrainState:
    """A fresh state, created already sharded; `params` (host arrays) replace the random init."""
    if params is not None:
      params = sharding.put_global(params, self.param_shardings)

    def init(rng, params):
      if params is None:
        params = models.init_params(self.model, rng)
      return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self.tx.init(params),
        ema_params=None if self.ema_decay is None else params,
      )

    return jax.jit(init, out_shardings=self.state_shardings, static_argnums=())(rng, params)

  # -- steps ---------------------------------------------------------------

  def train_step_fn(self) -> Callable:
    """(state, batch, rng) -> (state, metrics); accumulation over micro-batches inside."""
    model, tx, accum = self.model, self.tx, self.accum_steps
    smoothing = self.config.label_smoothing
    sigmoid = self.sigmoid_loss
    micro_sharding = NamedSharding(self.mesh, P(None, sharding.BATCH_AXES))
    frozen = self.frozen

    def loss(params, images, labels, rng):
      # No gradient flows into frozen parameters: their backward pass is not computed at all
      # (a linear probe runs the backbone forward only).
      params = jax.tree_util.tree_map(
        lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen
      )
      logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
      return metrics.loss_fn(logits, labels, sigmoid=sigmoid, label_smoothing=smoothing).mean()

    grad_fn = jax.value_and_grad(loss)

    def step(state: TrainState, batch: dict, rng: jax.Array):
      rng = jax.random.fold_in(rng, state.step)
      images, labels = batch["image"], batch["label"]
      if accum == 1:
        value, grads = grad_fn(state.params, images, labels, rng)
      else:
        # Micro-batch i takes every accum-th example, so that each micro-batch
        # is spread evenly over the devices that hold the batch.
        def split(x):
          x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
          return jax.lax.with_sharding_constraint(x, micro_sharding)

        def body(carry, xs):
          g_sum, l_sum = carry
          i, imgs, lbls = xs
          value, g = grad_fn(state.params, imgs, lbls, jax.random.fold_in(rng, i))
          return (jax.tree_util.tree_map(jnp.add, g_sum, g), l_sum + value), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (g_sum, l_sum), _ = jax.lax.scan(
          body, (zeros, 0.0), (jnp.arange(accum), split(images), split(labels))
        )
        grads = jax.tree_util.tree_map(lambda g: g / accum, g_sum)
        value = l_sum / accum
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema = state.ema_params
      if ema is not None:  # timm's ModelEmaV2: decay * ema + (1 - decay) * params
        ema = optax.incremental_update(params, ema, step_size=1.0 - self.ema_decay)
      new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
      return new, {
        "loss": value,
        "grad_norm": optax.tree.norm(grads),
        "lr": self.lr_schedule(state.step),
      }

    return step

  def jit_train_step(self) -> Callable:
    rep = sharding.replicated(self.mesh)
    return jax.jit(
      self.train_step_fn(),
      in_shardings=(self.state_shardings, self.batch_sharding, rep),
      out_shardings=(self.state_shardings, rep),
      donate_argnums=(0,),
    )

  def eval_step_fn(self, labels: str | None = None) -> Callable:
    """(params, batch) -> (sums, logits or None); sums over the valid (mask) examples only.

    `labels` is the evaluation data's kind, by default the training data's: "single" (class
    indices), "multilabel" (multi-hot, scored by the sigmoid head), or "sets" (multi-hot
    sets of correct classes for a single-label model, as ImageNet's ReaL labels: right when
    the top class is in the set). Logits leave the step only for multi-label data, whose
    mAP needs every score.
    """
    model, sigmoid = self.model, self.sigmoid_loss
    labels = labels or ("multilabel" if self.multilabel else "single")

    def step(params, batch):
      logits = model.apply({"params": params}, batch["image"], train=False)
      if labels == "sets":
        return metrics.label_set_sums(logits, batch["label"], batch["mask"]), None
      multilabel = labels == "multilabel"
      sums = metrics.batch_sums(
        logits, batch["label"], batch["mask"], multilabel=multilabel, sigmoid=sigmoid
      )
      return sums, (logits if multilabel else None)

    return step

  def jit_eval_step(self, labels: str | None = None) -> Callable:
    rep = sharding.replicated(self.mesh)
    multilabel = (labels or ("multilabel" if self.multilabel else "single")) == "multilabel"
    return jax.jit(
      self.eval_step_fn(labels),
      in_shardings=(self.param_shardings, self.batch_sharding),
      out_shardings=(rep, self.batch_sharding if multilabel else None),
    )

  def jit_predict(self, embedding: bool = False) -> Callable:
    """(params, images) -> logits or embeddings, sharded like the batch."""
    model = self.model
    return jax.jit(
      lambda p, x: model.apply({"params": p}, x, train=False, return_embedding=embedding),
      in_shardings=(self.param_shardings, self.batch_sharding),
      out_shardings=self.batch_sharding,
    )


def _sigmoid_loss(loss: str, multilabel: bool) -> bool:
  """Whether `config.loss` ('auto': by the data) is the sigmoid cross-entropy."""
  if loss == "auto":
    return multilabel
  if loss not in metrics.LOSSES:
    raise errors.ConfigError(
      f"config.loss must be 'auto' or one of {', '.join(metrics.LOSSES)}, got {loss!r}"
    )
  if multilabel and loss == "softmax_xent":
    raise errors.ConfigError(
      "config.loss softmax_xent needs one label per image; this dataset is "
      "multi-label (use sigmoid_xent or auto)"
    )
  return loss == "sigmoid_xent"


def _data_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _opt_shardings(opt_shapes: Any, param_shapes: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for optimizer state: a leaf that belongs to a parameter (its path ends with the
  parameter's path and it has its shape) gets the parameter's sharding; the rest (counts,
  empty states) are replicated. Matching paths, not tree structures, also finds the state of
  a multi_transform, whose inner trees hold MaskedNodes for the other group's parameters.
  """
  rep = sharding.replicated(mesh)
  by_path = {
    tuple(_key_name(k) for k in path): (leaf.shape, s)
    for (path, leaf), s in zip(
      jax.tree_util.tree_flatten_with_path(param_shapes)[0],
      jax.tree_util.tree_leaves(param_shardings),
      strict=True,
    )
  }
  longest = max((len(p) for p in by_path), default=0)

  def assign(path, leaf):
    keys = tuple(_key_name(k) for k in path)
    for n in range(min(longest, len(keys)), 0, -1):
      found = by_path.get(keys[-n:])
      if found is not None and found[0] == leaf.shape:
        return found[1]
    return rep

  return jax.tree_util.tree_map_with_path(assign, opt_shapes)


def _key_name(key: Any) -> Any:
  """A path entry as a hashable name: a dict key's key, an attribute's name, an index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)
