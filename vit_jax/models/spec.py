"""Which ViT a name, a set of fields, a checkpoint's arrays or a transformers config means.

`ModelSpec` holds the fields that decide a ViT's parameters and outputs; how
it runs (dtypes, dropout, remat, scan) is left to `models.build`. Every module
that needs to know which model it has asks this one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from vit_jax import errors
from vit_jax.models import layout
from vit_jax.models import resnet


@dataclasses.dataclass(frozen=True)
class Variant:
  """Width, depth and patch size of one ViT variant, and the ResNet of a hybrid."""

  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  patch_size: int  # of the image, or of a hybrid's ResNet feature map
  resnet_layers: tuple[int, ...] | None = None  # units per ResNet stage; () the root alone


# Table 1 of the ViT paper, plus Ti/S from "How to train your ViT" (AugReg), and the
# hybrids as the original configs define them (`vit_jax/configs/models.py`).
VARIANTS: dict[str, Variant] = {
  "ViT-Ti_16": Variant(192, 768, 3, 12, 16),
  "ViT-S_16": Variant(384, 1536, 6, 12, 16),
  "ViT-S_32": Variant(384, 1536, 6, 12, 32),
  "ViT-B_8": Variant(768, 3072, 12, 12, 8),
  "ViT-B_16": Variant(768, 3072, 12, 12, 16),
  "ViT-B_32": Variant(768, 3072, 12, 12, 32),
  "ViT-L_16": Variant(1024, 4096, 16, 24, 16),
  "ViT-L_32": Variant(1024, 4096, 16, 24, 32),
  "ViT-H_14": Variant(1280, 5120, 16, 32, 14),
  # The ResNet root divides by 4 and each stage after the first by 2; the patches are cut
  # from its output. R50 for B/16 is (3, 4, 9), not ResNet-50's (3, 4, 6, 3), for a /16 grid.
  "R+ViT-Ti_16": Variant(192, 768, 3, 12, 8, ()),  # /32 despite its name: root /4, patch 8
  "R26+ViT-S_32": Variant(384, 1536, 6, 12, 1, (2, 2, 2, 2)),
  "R26+ViT-B_32": Variant(768, 3072, 12, 12, 1, (2, 2, 2, 2)),
  "R50+ViT-B_16": Variant(768, 3072, 12, 12, 1, (3, 4, 9)),
  "R50+ViT-L_32": Variant(1024, 4096, 16, 24, 1, (3, 4, 6, 3)),
}
# The fields every model gives (a hybrid also gives resnet_layers).
ARCHITECTURE = ("hidden_size", "mlp_dim", "num_heads", "num_layers", "patch_size")


def augreg_name(name: str) -> str:
  """The AugReg file prefix of a variant: `R26+ViT-S_32` -> `R26_S_32`, `ViT-B_16` -> `B_16`."""
  return name.replace("ViT-", "").replace("+", "_")


_ALIASES = {alias.lower(): name for name in VARIANTS for alias in (name, augreg_name(name))}

# transformers' hidden_act values and whether they are the tanh-approximate GELU.
GELU_FROM_HF = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True, "gelu": False}


def canonical_name(name: str) -> str:
  """Maps `B/16`, `ViT-B/16`, `vit_b16`, `b_16` ... to `ViT-B_16`, and `R50+ViT-B_16` or AugReg's
  `R26_S_32` to the hybrid."""
  if name.strip().lower() in _ALIASES:
    return _ALIASES[name.strip().lower()]
  m = re.fullmatch(r"(?:vit[-_]?)?(ti|s|b|l|h)[-_/]?(\d+)", name.strip(), re.I)
  if m:
    size = "Ti" if m.group(1).lower() == "ti" else m.group(1).upper()
    canon = f"ViT-{size}_{m.group(2)}"
    if canon in VARIANTS:
      return canon
  raise errors.ConfigError(
    f"unknown model {name!r}; known: {', '.join(VARIANTS)} (or B/16-style aliases)"
  )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The fields a ViT's parameters and outputs depend on; checked when made."""

  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  patch_size: int
  image_size: int = 224
  num_classes: int | None = 1000  # None: no head, the model outputs its representation
  representation_size: int | None = None  # a tanh pre_logits layer of this width
  classifier: str = "token"  # "token" (class token) or "gap" (mean of patch tokens)
  gelu_approximate: bool = True  # tanh GELU, as the original checkpoints
  resnet_layers: tuple[int, ...] | None = None  # a hybrid's ResNet stages; None: plain ViT
  posemb: str = "learn"  # "learn" (a parameter) or "sincos2d" (fixed, none in the file)

  def __post_init__(self):
    if self.resnet_layers is not None:
      layers = self.resnet_layers
      if not isinstance(layers, (tuple, list)) or not all(
        isinstance(n, int) and n >= 1 for n in layers
      ):
        raise errors.ConfigError(
          f"resnet_layers must be a tuple of positive unit counts, got {layers!r}"
        )
      object.__setattr__(self, "resnet_layers", tuple(layers))
    sizes = {f: getattr(self, f) for f in (*ARCHITECTURE, "image_size")}
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 1}
    if bad:
      raise errors.ConfigError(f"model fields must be positive integers, got {bad}")
    for key in ("num_classes", "representation_size"):
      value = getattr(self, key)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise errors.ConfigError(f"model {key} must be a positive integer or None, got {value!r}")
    if self.hidden_size % self.num_heads:
      raise errors.ConfigError(
        f"hidden size {self.hidden_size} does not split into {self.num_heads} heads"
      )
    if self.posemb not in ("learn", "sincos2d"):
      raise errors.ConfigError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
    if self.posemb == "sincos2d" and self.hidden_size % 4:
      raise errors.ConfigError(
        f"a sin-cos position embedding needs a hidden size divisible by 4, not {self.hidden_size}"
      )
    if self.classifier not in ("token", "gap"):
      raise errors.ConfigError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
    if self.image_size % self.stride:
      per_patch = (
        f"the patch size {self.patch_size}"
        if self.resnet_layers is None
        else f"{self.stride} pixels per patch (the ResNet's reduction "
        f"{resnet.stride(self.resnet_layers)} x patch size {self.patch_size})"
      )
      raise errors.ConfigError(
        f"image size {self.image_size} is not divisible by {per_patch} of {self}"
      )

  @classmethod
  def from_fields(cls, name: str | None = None, **fields: Any) -> ModelSpec:
    """A variant by name with fields overriding it, or (name None) every architecture field."""
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise errors.ConfigError(
        f"unknown model field(s) {sorted(unknown)}; known: "
        f"{[f.name for f in dataclasses.fields(cls)]}"
      )
    if name is not None:
      fields = {**dataclasses.asdict(VARIANTS[canonical_name(name)]), **fields}
    missing = [k for k in ARCHITECTURE if k not in fields]
    if missing:
      raise errors.ConfigError(
        f"a model without a variant name needs every architecture field; missing {missing}"
      )
    return cls(**fields)

  @classmethod
  def of(cls, model: Any) -> ModelSpec:
    """The spec of a built model (any object with these fields, e.g. a VisionTransformer)."""
    return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(cls)})

  @classmethod
  def from_params(
    cls, tree: Mapping[str, Any], path: str = "checkpoint", image_size: int | None = None
  ) -> ModelSpec:
    """The model a checkpoint's params fit (Linen names, unscanned), read off their shapes.

    A file without a position embedding holds a fixed sin-cos one (`posemb="sincos2d"`), and
    so no image size: `image_size`, else 224.
    """
    flat = layout.flatten(tree)
    shape = lambda key: tuple(int(d) for d in flat[key].shape)
    layers = None
    if "conv_root/kernel" in flat:  # a hybrid: units per stage, read off the names
      units = {}
      for key in flat:
        m = re.match(r"block(\d+)/unit(\d+)/", key)
        if m:
          units[int(m.group(1))] = max(units.get(int(m.group(1)), 0), int(m.group(2)))
      layers = tuple(units.get(i, 0) for i in range(1, len(units) + 1))
      if 0 in layers:
        raise errors.CheckpointError(
          f"{path}: ResNet stages {sorted(units)} are not numbered 1, 2, ..."
        )
    try:
      patch, _, channels, hidden = shape("embedding/kernel")
      blocks = {k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")}
      _, heads, _ = shape("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
      mlp = shape("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel")[1]
      tokens = shape(layout.POSEMB)[1] if layout.POSEMB in flat else None
    except (KeyError, ValueError, IndexError) as e:
      raise errors.CheckpointError(
        f"{path}: cannot tell the model from the file (missing or odd {e})"
      ) from None
    if min(patch, hidden, heads, mlp) < 1 or hidden % heads:
      raise errors.CheckpointError(
        f"{path}: inconsistent shapes: patch {patch}, hidden size "
        f"{hidden}, {heads} heads, MLP size {mlp}"
      )
    want_channels = 3 if layers is None else resnet.out_channels(layers)
    if channels != want_channels:
      raise errors.CheckpointError(
        f"{path}: embedding/kernel takes {channels} channels; "
        + ("an image has 3" if layers is None else f"ResNet stages {layers} give {want_channels}")
      )
    has_cls = "cls" in flat
    if tokens is None:  # sin-cos: nothing in the file tells the size
      size = image_size or 224
      tokens = (size // (patch * resnet.stride(layers))) ** 2 + has_cls
    grid = math.isqrt(max(tokens - has_cls, 0))
    if grid < 1 or grid * grid != tokens - has_cls:
      raise errors.CheckpointError(
        f"{path}: {layout.POSEMB} has {tokens} tokens, not a square "
        f"grid{' plus a class token' if has_cls else ''}"
      )
    outputs = {}
    for key in ("head/kernel", "pre_logits/kernel"):
      if key in flat:
        if len(shape(key)) != 2 or min(shape(key)) < 1:
          raise errors.CheckpointError(
            f"{path}: {key} has shape {shape(key)}, expected [inputs, outputs]"
          )
        outputs[key] = shape(key)[1]
    return cls(
      hidden_size=hidden,
      mlp_dim=mlp,
      num_heads=heads,
      num_layers=len(blocks),
      patch_size=patch,
      image_size=grid * patch * resnet.stride(layers),
      num_classes=outputs.get("head/kernel"),
      representation_size=outputs.get("pre_logits/kernel"),
      classifier="token" if has_cls else "gap",
      resnet_layers=layers,
      posemb="learn" if layout.POSEMB in flat else "sincos2d",
    )

  @classmethod
  def from_hf_config(cls, hf: Any) -> ModelSpec:
    """The model of a transformers ViTConfig (or any object with its attributes)."""
    if hf.hidden_act not in GELU_FROM_HF:
      raise errors.ConfigError(
        f"hidden_act {hf.hidden_act!r} has no counterpart here (supported: {sorted(GELU_FROM_HF)})"
      )
    if hf.num_channels != 3 or not hf.qkv_bias:
      raise errors.ConfigError("only 3-channel ViTs with qkv biases are supported")
    return cls(
      hidden_size=hf.hidden_size,
      mlp_dim=hf.intermediate_size,
      num_heads=hf.num_attention_heads,
      num_layers=hf.num_hidden_layers,
      patch_size=hf.patch_size,
      image_size=hf.image_size,
      num_classes=hf.num_labels,
      gelu_approximate=GELU_FROM_HF[hf.hidden_act],
    )

  @property
  def variant(self) -> Variant:
    return Variant(**{k: getattr(self, k) for k in (*ARCHITECTURE, "resnet_layers")})

  @property
  def stride(self) -> int:
    """Pixels per patch side: the patch size, times the ResNet's reduction for a hybrid."""
    return self.patch_size * resnet.stride(self.resnet_layers)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.stride

  @property
  def name(self) -> str | None:
    """The variant these architecture fields are (`ViT-B_16`), or None when none is."""
    return next((n for n, v in VARIANTS.items() if v == self.variant), None)

  def __str__(self) -> str:
    if self.name:
      return self.name
    hybrid = "" if self.resnet_layers is None else f", ResNet stages {self.resnet_layers}"
    return (
      f"custom ViT (hidden {self.hidden_size}, MLP {self.mlp_dim}, {self.num_heads} "
      f"heads, {self.num_layers} layers, patch {self.patch_size}{hybrid})"
    )

  def replace(self, **fields: Any) -> ModelSpec:
    """A copy with `fields` changed, checked again."""
    return dataclasses.replace(self, **fields)

  def asdict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
