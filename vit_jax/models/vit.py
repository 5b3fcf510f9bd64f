"""The Vision Transformer (Dosovitskiy et al., 2020) in Flax Linen.

Module names follow the Linen form of the original checkpoint names, so that
loading a `gs://vit_models/...` file is a rename (see `checkpoint.py`).
Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, ...)
that `sharding.py` maps onto a device mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax.models import resnet
from vit_jax.models import spec as spec_lib

Dtype = Any
Array = jax.Array


def _init(init: Callable, names: tuple[str | None, ...]) -> Callable:
  """An initializer whose parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, names)


def dot_product_attention(
  query: Array,
  key: Array,
  value: Array,
  mask: Array | None = None,
  *,
  dropout_rng: Array | None = None,
  dropout_rate: float = 0.0,
  deterministic: bool = True,
  precision: Any = None,
  module: nn.Module | None = None,
) -> Array:
  """Softmax attention as Flax's, for [..., tokens, heads, head_dim] inputs, laid out for speed.

  With `module` (Flax passes it when asked to sow), the normalised weights
  [..., heads, queries, keys] are sown into its `intermediates` collection.
  """
  # Heads go before tokens: the two batched matmuls then multiply contiguous
  # [tokens, head_dim] blocks, which XLA:CPU runs 2-4x faster than Flax's
  # [..., tokens, heads, head_dim] layout (more so as the batch grows).
  q, k, v = (jnp.swapaxes(t, -3, -2) for t in (query, key, value))
  q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  logits = jnp.einsum("...hqd,...hkd->...hqk", q, k, precision=precision)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  # The row max only keeps exp in range; the result does not depend on it.
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  denominator = weights.sum(-1, keepdims=True)
  if not deterministic and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = weights * (
      keep.astype(weights.dtype) / jnp.asarray(1.0 - dropout_rate, weights.dtype)
    )
  # Normalizing after the second matmul divides [q, head_dim] values instead of [q, k].
  out = jnp.einsum("...hqk,...hkd->...hqd", weights, v, precision=precision) / denominator
  if module is not None:
    module.sow("intermediates", "attention_weights", weights / denominator)
  return jnp.swapaxes(out, -3, -2)


class MlpBlock(nn.Module):
  """Dense, GELU, dropout, Dense, dropout."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    out_dim = x.shape[-1]
    dense = lambda features, names: nn.Dense(
      features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_init(nn.initializers.xavier_uniform(), names),
      bias_init=_init(nn.initializers.normal(stddev=1e-6), names[1:]),
    )
    x = dense(self.mlp_dim, ("embed", "mlp"))(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_mlp"))
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim, ("mlp", "embed"))(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  gelu_approximate: bool = True
  scan_carry: bool = False  # return (x, None), the signature nn.scan wants
  # Outputs only the first `query_tokens` tokens (all when None): they attend
  # to every token, but the rest of the block runs on these alone.
  query_tokens: int | None = None
  drop_path: bool = False  # stochastic depth on both residual branches, at `drop_rate`

  def _drop_path(self, branch: Array, rate: Any, deterministic: bool, name: str) -> Array:
    """Stochastic depth (Huang et al., 2016; timm's drop_path): each example's branch is kept
    with probability 1 - rate, and scaled by 1 / (1 - rate) when kept."""
    if not self.drop_path or deterministic:
      return branch
    keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
    shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
    keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", f"{name}_kept", keep.reshape(-1))
    return branch * (keep / keep_prob).astype(branch.dtype)

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool, drop_rate: Any = 0.0) -> Any:
    # eps 1e-6 is what the original checkpoints were trained with.
    norm = lambda: nn.LayerNorm(
      epsilon=1e-6,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      scale_init=_init(nn.initializers.ones, ("embed",)),
      bias_init=_init(nn.initializers.zeros, ("embed",)),
    )
    x = kv = norm()(inputs)
    if self.query_tokens is not None:
      # LayerNorm is per token, so the queries' rows of `kv` are their LN(x).
      inputs, x = inputs[:, : self.query_tokens], kv[:, : self.query_tokens]
    x = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_init(nn.initializers.xavier_uniform(), ("embed", "heads", "kv")),
      bias_init=_init(nn.initializers.zeros, ("heads", "kv")),
      out_kernel_init=_init(nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
      out_bias_init=_init(nn.initializers.zeros, ("embed",)),
      broadcast_dropout=False,
      dropout_rate=self.attention_dropout_rate,
      deterministic=deterministic,
      attention_fn=dot_product_attention,
    )(x, kv, sow_weights=self.is_mutable_collection("intermediates"))
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = self._drop_path(x, drop_rate, deterministic, "attention") + inputs
    y = norm()(x)
    y = MlpBlock(
      mlp_dim=self.mlp_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      dropout_rate=self.dropout_rate,
      gelu_approximate=self.gelu_approximate,
    )(y, deterministic=deterministic)
    y = self._drop_path(y, drop_rate, deterministic, "mlp")
    out = nn.with_logical_constraint(x + y, ("batch", "length", "act_embed"))
    return (out, None) if self.scan_carry else out


def posemb_sincos_2d(
  h: int, w: int, width: int, temperature: float = 10_000.0, dtype: Dtype = jnp.float32
) -> Array:
  """The fixed 2-D sin-cos position embedding [1, h * w, width] of MoCo v3 and big_vision
  (big_vision/models/vit.py `posemb_sincos_2d`): token k is at row k // w, column k % w;
  frequencies temperature^(-d / (width/4 - 1)) for d < width/4; channels
  [sin(column f), cos(column f), sin(row f), cos(row f)]."""
  if width % 4:
    raise errors.ConfigError(
      f"a sin-cos position embedding needs a width divisible by 4, not {width}"
    )
  y, x = jnp.mgrid[:h, :w]
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
  y = jnp.einsum("m,d->md", y.flatten(), omega)
  x = jnp.einsum("m,d->md", x.flatten(), omega)
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None]


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding over all tokens (class token included)."""

  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    shape = (1, inputs.shape[1], inputs.shape[2])
    pe = self.param(
      "pos_embedding",
      _init(nn.initializers.normal(stddev=0.02), (None, "length", "embed")),
      shape,
      self.param_dtype,
    )
    return inputs + pe.astype(inputs.dtype)


class Encoder(nn.Module):
  """Position embedding, the stack of blocks, and the final LayerNorm."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  gelu_approximate: bool = True
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan: bool = False
  # Compute only the first `output_tokens` tokens of the output (all when
  # None). The classifier reads only the class token, so the last block's
  # MLP, output projection and queries need only run on it: 7% of ViT-B/16.
  output_tokens: int | None = None
  learned_posemb: bool = True  # False: the caller has added a fixed one
  drop_path_rate: float = 0.0
  drop_path_schedule: str = "linear"

  def drop_path_rates(self) -> np.ndarray:
    """Stochastic depth per block: rising linearly from 0 to the rate (timm's rule), or constant."""
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise errors.ConfigError(f"drop_path_rate {self.drop_path_rate} must be in [0, 1)")
    if self.drop_path_schedule == "linear":
      return np.linspace(0.0, self.drop_path_rate, self.num_layers, dtype=np.float32)
    if self.drop_path_schedule == "constant":
      return np.full(self.num_layers, self.drop_path_rate, np.float32)
    raise errors.ConfigError(
      f"drop_path_schedule must be linear or constant, got {self.drop_path_schedule!r}"
    )

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if self.learned_posemb:
      x = AddPositionEmbs(param_dtype=self.param_dtype, name="posembed_input")(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    rates = self.drop_path_rates()
    kw = dict(
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      gelu_approximate=self.gelu_approximate,
      drop_path=self.drop_path_rate > 0,
    )
    block = Encoder1DBlock
    if self.remat:
      # Recompute each block's activations in the backward pass: memory per
      # block drops to its input, at the cost of about one more forward.
      block = nn.remat(
        block,
        policy=getattr(jax.checkpoint_policies, self.remat_policy),
        prevent_cse=not self.scan,
        static_argnums=(2,),
      )
    if self.scan:
      # One compiled block for all layers: params are stacked on a leading
      # `layers` axis under `encoderblock` (checkpoint.py stacks and unstacks).
      stack = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, 0),  # deterministic, and each layer's drop-path rate
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(name="encoderblock", scan_carry=True, **kw)(x, not train, jnp.asarray(rates))
      # Every scanned layer has the same shape, so all tokens run to the end.
      x = x if self.output_tokens is None else x[:, : self.output_tokens]
    else:
      for i in range(self.num_layers):
        last = i == self.num_layers - 1
        x = block(
          name=f"encoderblock_{i}", query_tokens=self.output_tokens if last else None, **kw
        )(x, not train, float(rates[i]))
    return nn.LayerNorm(
      epsilon=1e-6,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      scale_init=_init(nn.initializers.ones, ("embed",)),
      bias_init=_init(nn.initializers.zeros, ("embed",)),
      name="encoder_norm",
    )(x)


class VisionTransformer(nn.Module):
  """ViT classifier: images [N, H, W, 3] in [-1, 1] to logits [N, num_classes].

  With `resnet_layers` it is the paper's hybrid: a ResNet (`resnet.py`) turns the
  image into a feature map, and the patches are cut from that.
  """

  num_classes: int | None
  patch_size: int
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  image_size: int = 224
  representation_size: int | None = None
  classifier: str = "token"  # "token" (class token) or "gap" (mean of patch tokens)
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan: bool = False
  head_bias_init: float = 0.0  # the head's initial bias, every class alike
  # Units per ResNet stage before the patches ((3, 4, 9) for R50+ViT-B_16; () the root
  # alone); None: patches of the image itself.
  resnet_layers: tuple[int, ...] | None = None
  # "learn": a learned position embedding over every token, class token included (the
  # original); "sincos2d": big_vision's fixed one, added to the patch tokens alone.
  posemb: str = "learn"
  drop_path_rate: float = 0.0  # stochastic depth of the last block (or of every block)
  drop_path_schedule: str = "linear"  # linear: from 0 at the first block; constant

  @property
  def spec(self) -> spec_lib.ModelSpec:
    """Which model this is, apart from how it runs."""
    return spec_lib.ModelSpec.of(self)

  @property
  def grid_size(self) -> int:
    return self.image_size // (self.patch_size * resnet.stride(self.resnet_layers))

  @nn.compact
  def __call__(
    self, images: Array, *, train: bool = False, return_embedding: bool = False
  ) -> Array:
    """Logits, or with `return_embedding` the representation the head sees."""
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(
        f"images must be [N, {self.image_size}, {self.image_size}, 3], got {tuple(images.shape)}"
      )
    x = images.astype(self.dtype)
    if self.resnet_layers is not None:
      x = resnet.root_and_stages(x, self.resnet_layers, self.dtype, self.param_dtype)
    x = nn.Conv(
      self.hidden_size,
      (self.patch_size,) * 2,
      strides=(self.patch_size,) * 2,
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_init(nn.initializers.lecun_normal(), (None, None, None, "embed")),
      bias_init=_init(nn.initializers.zeros, ("embed",)),
      name="embedding",
    )(x)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    if self.posemb == "sincos2d":
      # Before the class token is added, as big_vision adds it: the class token has none.
      x = x + posemb_sincos_2d(h, w, c, dtype=x.dtype)
    elif self.posemb != "learn":
      raise errors.ConfigError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
    if self.classifier == "token":
      cls = self.param(
        "cls", _init(nn.initializers.zeros, (None, None, "embed")), (1, 1, c), self.param_dtype
      )
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
    elif self.classifier != "gap":
      raise errors.ConfigError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    x = Encoder(
      num_layers=self.num_layers,
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      gelu_approximate=self.gelu_approximate,
      remat=self.remat,
      remat_policy=self.remat_policy,
      scan=self.scan,
      output_tokens=1 if self.classifier == "token" else None,
      learned_posemb=self.posemb == "learn",
      drop_path_rate=self.drop_path_rate,
      drop_path_schedule=self.drop_path_schedule,
      name="Transformer",
    )(x, train=train)
    x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = nn.Dense(
        self.representation_size,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=_init(nn.initializers.lecun_normal(), ("embed", "mlp")),
        bias_init=_init(nn.initializers.zeros, ("mlp",)),
        name="pre_logits",
      )(x)
      x = jnp.tanh(x)
    if return_embedding or self.num_classes is None:
      return x
    # A zero head makes the first fine-tuning steps start from uniform predictions. For
    # pre-training with a sigmoid loss over 21k classes, a bias of -10 starts every class
    # near probability 0, where almost all of them belong.
    return nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_init(nn.initializers.zeros, (None, "classes")),
      bias_init=_init(nn.initializers.constant(self.head_bias_init), ("classes",)),
      name="head",
    )(x)


# How a model runs, as opposed to which model it is (`spec.ModelSpec`).
RUNTIME_FIELDS = (
  "dropout_rate",
  "attention_dropout_rate",
  "dtype",
  "param_dtype",
  "remat",
  "remat_policy",
  "scan",
  "head_bias_init",
  "drop_path_rate",
  "drop_path_schedule",
)


def build(model_spec: spec_lib.ModelSpec, **options: Any) -> VisionTransformer:
  """The VisionTransformer of `model_spec`; keyword `options` say how it runs (RUNTIME_FIELDS)."""
  unknown = set(options) - set(RUNTIME_FIELDS)
  if unknown:
    raise errors.ConfigError(
      f"unknown model option(s) {sorted(unknown)}; known: {list(RUNTIME_FIELDS)}"
    )
  return VisionTransformer(**model_spec.asdict(), **options)


def create_model(
  name: str | None, num_classes: int | None = 1000, image_size: int = 224, **fields: Any
) -> VisionTransformer:
  """A VisionTransformer by variant name, with keyword fields overriding any model field."""
  options = {k: fields.pop(k) for k in RUNTIME_FIELDS if k in fields}
  return build(
    spec_lib.ModelSpec.from_fields(name, num_classes=num_classes, image_size=image_size, **fields),
    **options,
  )


def attention_weights(
  model: VisionTransformer, params: Any, images: Array
) -> tuple[Array, list[Array]]:
  """(logits, the attention weights of each layer [batch, heads, queries, keys], first first).

  The last layer of an unrolled token model runs its queries on the class token
  alone, so its weights are [batch, heads, 1, keys]; the scanned encoder's are
  over every token.
  """
  logits, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
  encoder = state["intermediates"]["Transformer"]
  sown = lambda block: next(
    v["attention_weights"][0]
    for v in block.values()  # noqa: E731
    if isinstance(v, dict) and "attention_weights" in v
  )
  if model.scan:
    return logits, list(sown(encoder["encoderblock"]))
  return logits, [sown(encoder[f"encoderblock_{i}"]) for i in range(model.num_layers)]


def init_params(model: VisionTransformer, rng: Array | int = 0, *, boxed: bool = False) -> dict:
  """Freshly initialised params as a plain pytree; with `boxed`, each still carries its logical
  axis names (`nn.LogicallyPartitioned`), which `sharding.logical_shardings` reads."""
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  params = model.init(rng, dummy, train=False)["params"]
  return params if boxed else nn.meta.unbox(params)


def param_shapes(model: VisionTransformer) -> dict:
  """The params' shapes and dtypes (jax.ShapeDtypeStruct), without computing anything."""
  return jax.eval_shape(lambda: init_params(model))


def count_params(params: Any) -> int:
  """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
