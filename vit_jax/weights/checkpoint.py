"""The original ViT `.npz` checkpoints: strict loading, adaptation, and saving.

The files in `gs://vit_models/` are flat `np.savez` archives keyed by
`/`-joined paths in the pre-Linen naming. Inside each encoder block the
pre-Linen names number submodules by position in the block, Linen by type:

    pre-Linen (file)                  Linen (our modules)
    LayerNorm_0                       LayerNorm_0
    MultiHeadDotProductAttention_1    MultiHeadDotProductAttention_0
    LayerNorm_2                       LayerNorm_1
    MlpBlock_3                        MlpBlock_0

Every other name is the same in both. All kernels are stored in the layout
Flax uses, so no array is transposed or reshaped on the way in or out.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vit_jax import errors
from vit_jax import models
from vit_jax.models import layout
from vit_jax.platform import files

log = logging.getLogger(__name__)

# Block-level submodule names: file (pre-Linen) -> model (Linen).
PRE_LINEN_TO_LINEN = {
  "LayerNorm_0": "LayerNorm_0",
  "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
  "LayerNorm_2": "LayerNorm_1",
  "MlpBlock_3": "MlpBlock_0",
}
LINEN_TO_PRE_LINEN = {v: k for k, v in PRE_LINEN_TO_LINEN.items()}

_BLOCK = re.compile(r"^(Transformer/encoderblock_\d+)/([^/]+)(/.*)$")
# A hybrid's GroupNorm scales and biases: files written with Flax before 0.3.6 hold them as
# [1, 1, 1, C], the original loader squeezes them to [C] (Flax's shape), and so do we.
_GROUPNORM = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")
_PREFIXES = ("opt/target/",)  # checkpoints saved with the optimizer wrap params like this


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in x.shape)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an .npz file, or a CheckpointError that says what is wrong."""
  try:
    data = files.read_bytes(path)
  except FileNotFoundError as e:
    raise errors.CheckpointError(str(e)) from None
  except OSError as e:
    raise errors.CheckpointError(f"{path}: cannot read ({e})") from None
  if data[:2] == b"\x80\x02" or data[:1] == b"\x80":
    raise errors.CheckpointError(
      f"{path}: is a pickle, not an .npz archive; pickles are never loaded"
    )
  if not data.startswith(b"PK"):
    kind = "a single .npy array" if data.startswith(b"\x93NUMPY") else "not an .npz (zip) archive"
    raise errors.CheckpointError(f"{path}: {kind}; expected an np.savez checkpoint")
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except ValueError as e:
    if "pickle" in str(e):
      raise errors.CheckpointError(
        f"{path}: holds pickled (object) arrays; pickles are never loaded"
      ) from None
    raise errors.CheckpointError(f"{path}: corrupt .npz archive ({e})") from None
  except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
    raise errors.CheckpointError(f"{path}: truncated or corrupt .npz archive ({e})") from None
  except Exception as e:
    # Corrupt members fail deeper in zlib and numpy's header parser, with their own types.
    raise errors.CheckpointError(
      f"{path}: corrupt .npz archive ({e.__class__.__name__}: {e})"
    ) from None


def _to_linen(flat: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
  """Strips `opt/target/` and renames pre-Linen block submodules to Linen names."""
  out: dict[str, np.ndarray] = {}
  unwrapped: list[tuple[str, np.ndarray]] = []
  for key, value in flat.items():
    for prefix in _PREFIXES:
      if key.startswith(prefix):
        key = key[len(prefix) :]
    unwrapped.append((key, value))
  # Decided on the unwrapped keys: the original training code saves `opt/target/` and
  # pre-Linen names together.
  pre_linen_blocks = {
    m.group(1)
    for k, _ in unwrapped
    if (m := _BLOCK.match(k))
    and m.group(2) in ("MlpBlock_3", "MultiHeadDotProductAttention_1", "LayerNorm_2")
  }
  for key, value in unwrapped:
    if _GROUPNORM.search(key) and value.ndim == 4 and value.shape[:3] == (1, 1, 1):
      value = value.reshape(value.shape[-1])
    m = _BLOCK.match(key)
    if m and m.group(1) in pre_linen_blocks and m.group(2) in PRE_LINEN_TO_LINEN:
      key = f"{m.group(1)}/{PRE_LINEN_TO_LINEN[m.group(2)]}{m.group(3)}"
    if key in out:
      raise errors.CheckpointError(
        f"{path}: key {key!r} appears twice (mixed pre-Linen and Linen names)"
      )
    out[key] = value
  for key in out:  # 'a' and 'a/b' cannot both be arrays of one tree
    parts = key.split("/")
    clash = next((p for p in ("/".join(parts[:i]) for i in range(1, len(parts))) if p in out), None)
    if clash is not None:
      raise errors.CheckpointError(f"{path}: key {clash!r} is an array and also holds {key!r}")
  if "embedding/kernel" not in out or not any(k.startswith("Transformer/") for k in out):
    raise errors.CheckpointError(
      f"{path}: not a ViT checkpoint (no 'embedding/kernel' and "
      f"'Transformer/...' keys; found {sorted(out)[:5]}...)"
    )
  return out


def load(path: str) -> dict[str, Any]:
  """The raw nested tree of an original `.npz` checkpoint, with Linen names."""
  return layout.unflatten(_to_linen(_read_npz(path), path))


def load_pretrained(
  path: str | Mapping[str, Any],
  model: models.VisionTransformer,
  image_size: int | None = None,
  *,
  reset_head: bool = False,
  source: str = "checkpoint",
) -> dict[str, Any]:
  """Params for `model` from an original checkpoint, adapted and strictly checked.

  Position embeddings are resized when the grid differs; the head is kept when
  its shape matches and re-initialised as the model initialises it (a zero kernel, biases at
  `model.head_bias_init`) when the class count differs (or `reset_head`);
  `pre_logits` is dropped when the model has no `representation_size`. Every
  file key is used or dropped for a logged reason, every model parameter is
  filled, every shape checked. Returns host (numpy) arrays in the model's
  `param_dtype`, ready for `model.apply` or for placement with shardings.
  `path` may also be a tree that `load` returned, to avoid reading a file twice;
  errors then name `source` (the file it came from).
  """
  if image_size is not None and image_size != model.image_size:
    raise errors.CheckpointError(
      f"image_size={image_size} differs from the model's image_size="
      f"{model.image_size}; create the model at the size you want"
    )
  if isinstance(path, Mapping):
    path, have = source, _to_linen(layout.flatten(path), source)
  else:
    have = _to_linen(_read_npz(path), path)
  want = layout.flatten(models.param_shapes(model.clone(scan=False)))
  out: dict[str, np.ndarray] = {}
  for key, spec in want.items():
    expected = _shape(spec)
    if key.startswith("head/") and (reset_head or key not in have or _shape(have[key]) != expected):
      why = (
        "asked to"
        if reset_head
        else "not in the file"
        if key not in have
        else f"class count differs: file {_shape(have[key])}, model {expected}"
      )
      # As the model initialises a head: a zero kernel, every bias at head_bias_init.
      value = model.head_bias_init if key == "head/bias" else 0.0
      log.info("checkpoint: %s re-initialised to %g (%s)", key, value, why)
      out[key] = np.full(expected, value, np.float32)
      continue
    if key not in have:
      raise errors.CheckpointError(
        f"{path}: missing key {key!r} (shape {expected}) that the model needs"
      )
    value = have[key]
    if key == layout.POSEMB and _shape(value) != expected:
      if value.ndim != 3 or value.shape[-1] != expected[-1]:
        raise errors.CheckpointError(
          f"{path}: {key} has shape {_shape(value)}, expected {expected}"
        )
      log.info("checkpoint: resizing %s from %s to %s", key, _shape(value), expected)
      value = layout.resize_posemb(value, expected[1], has_cls=model.classifier == "token")
    if _shape(value) != expected:
      raise errors.CheckpointError(f"{path}: {key} has shape {_shape(value)}, expected {expected}")
    if not np.issubdtype(value.dtype, np.floating):
      raise errors.CheckpointError(f"{path}: {key} has dtype {value.dtype}, expected a float array")
    out[key] = value
  for key in sorted(set(have) - set(want)):
    if key.startswith("pre_logits/") and model.representation_size is None:
      log.info("checkpoint: dropping %s (the model has no representation_size)", key)
      if (
        key == "pre_logits/kernel"
        and "head/kernel" in have
        and not reset_head
        and _shape(have["head/kernel"]) == _shape(want.get("head/kernel", ()))
      ):
        log.warning(
          "checkpoint: keeping a head trained on pre_logits features without them; "
          "pass reset_head=True to fine-tune from a fresh head"
        )
    elif key == layout.POSEMB and model.posemb != "learn":
      log.info(
        "checkpoint: dropping %s (the model's position embedding is fixed: %s)", key, model.posemb
      )
    elif key.startswith("head/") and model.num_classes is None:
      log.info("checkpoint: dropping %s (the model has no head: num_classes=None)", key)
    else:
      raise errors.CheckpointError(
        f"{path}: unexpected key {key!r} (shape {_shape(have[key])}) "
        "that the model has no place for"
      )
  dtype = np.dtype(model.param_dtype)
  out = {k: np.asarray(v, dtype=dtype) for k, v in out.items()}
  if model.scan:
    out = layout.stack_blocks(out, model.num_layers)
  return layout.unflatten(out)


def save(params: Mapping[str, Any], path: str) -> None:
  """Writes params in the original flat pre-Linen `.npz` layout (float32).

  The file loads in the original vision_transformer code, in timm, and here.
  The write is atomic: a failure leaves any existing file at `path` intact.
  """
  flat = layout.unstack_blocks(layout.flatten(nn.meta.unbox(params)))
  out = {}
  for key, value in flat.items():
    m = _BLOCK.match(key)
    if m and m.group(2) in LINEN_TO_PRE_LINEN:
      key = f"{m.group(1)}/{LINEN_TO_PRE_LINEN[m.group(2)]}{m.group(3)}"
    out[key] = np.asarray(jax.device_get(value), dtype=np.float32)
  buf = io.BytesIO()  # gfile writers cannot seek, which zipfile needs
  np.savez(buf, **out)
  with files.atomic_write(path) as f:
    f.write(buf.getvalue())
