"""Conversion between our params and Hugging Face `transformers` ViTForImageClassification.

The PyTorch parameter names are those of the pinned transformers (5.23; names
changed in 5.9). Older Hub directories still load: transformers renames their
keys itself in `from_pretrained`, and we read the model's own `state_dict`.

Transposes, explicitly (D = hidden size, H = heads, d = head size, p = patch):

    ours (Flax)                             PyTorch                     op
    embedding/kernel        [p, p, 3, D]    projection.weight [D,3,p,p]  permute(3, 2, 0, 1)
    .../{query,key,value}/kernel [D, H, d]  {q,k,v}_proj.weight [H*d, D] reshape(D, H*d).T
    .../{query,key,value}/bias   [H, d]     {q,k,v}_proj.bias [H*d]      reshape(H*d)
    .../out/kernel          [H, d, D]       o_proj.weight [D, H*d]       reshape(H*d, D).T
    Dense kernels           [in, out]       Linear.weight [out, in]      .T
    LayerNorm scale/bias, cls, pos_embedding, other biases               as is
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from vit_jax import errors
from vit_jax import models
from vit_jax.models import layout
from vit_jax.models import spec as spec_lib
from vit_jax.platform import files
from vit_jax.weights import checkpoint
from vit_jax.weights import head_record
from vit_jax.weights import labels as labels_lib
from vit_jax.weights import registry

log = logging.getLogger(__name__)

# Per-parameter transforms between our layout and PyTorch's: (to_torch, from_torch).
# `h` is the number of heads, needed to split [H*d] back into [H, d].
_Op = tuple[Callable[[np.ndarray, int], np.ndarray], Callable[[np.ndarray, int], np.ndarray]]
_COPY: _Op = (lambda x, h: x, lambda x, h: x)
_LINEAR: _Op = (lambda x, h: x.T, lambda x, h: x.T)
_CONV: _Op = (lambda x, h: x.transpose(3, 2, 0, 1), lambda x, h: x.transpose(2, 3, 1, 0))
_QKV_KERNEL: _Op = (
  lambda x, h: x.reshape(x.shape[0], -1).T,
  lambda x, h: x.T.reshape(x.shape[1], h, -1),
)
_QKV_BIAS: _Op = (lambda x, h: x.reshape(-1), lambda x, h: x.reshape(h, -1))
_OUT_KERNEL: _Op = (
  lambda x, h: x.reshape(-1, x.shape[-1]).T,
  lambda x, h: x.T.reshape(h, -1, x.shape[0]),
)

# The name-mapping table: our key, PyTorch key, transform. `{i}` is the block.
MODEL_KEYS: list[tuple[str, str, _Op]] = [
  ("cls", "vit.embeddings.cls_token", _COPY),
  ("Transformer/posembed_input/pos_embedding", "vit.embeddings.position_embeddings", _COPY),
  ("embedding/kernel", "vit.embeddings.patch_embeddings.projection.weight", _CONV),
  ("embedding/bias", "vit.embeddings.patch_embeddings.projection.bias", _COPY),
  ("Transformer/encoder_norm/scale", "vit.layernorm.weight", _COPY),
  ("Transformer/encoder_norm/bias", "vit.layernorm.bias", _COPY),
  ("head/kernel", "classifier.weight", _LINEAR),
  ("head/bias", "classifier.bias", _COPY),
]
BLOCK_KEYS: list[tuple[str, str, _Op]] = [
  ("LayerNorm_0/scale", "layernorm_before.weight", _COPY),
  ("LayerNorm_0/bias", "layernorm_before.bias", _COPY),
  *[
    (f"MultiHeadDotProductAttention_0/{ours}/{kind}", f"attention.{pt}_proj.{pt_kind}", op)
    for ours, pt in (("query", "q"), ("key", "k"), ("value", "v"))
    for kind, pt_kind, op in (("kernel", "weight", _QKV_KERNEL), ("bias", "bias", _QKV_BIAS))
  ],
  ("MultiHeadDotProductAttention_0/out/kernel", "attention.o_proj.weight", _OUT_KERNEL),
  ("MultiHeadDotProductAttention_0/out/bias", "attention.o_proj.bias", _COPY),
  ("LayerNorm_1/scale", "layernorm_after.weight", _COPY),
  ("LayerNorm_1/bias", "layernorm_after.bias", _COPY),
  ("MlpBlock_0/Dense_0/kernel", "mlp.fc1.weight", _LINEAR),
  ("MlpBlock_0/Dense_0/bias", "mlp.fc1.bias", _COPY),
  ("MlpBlock_0/Dense_1/kernel", "mlp.fc2.weight", _LINEAR),
  ("MlpBlock_0/Dense_1/bias", "mlp.fc2.bias", _COPY),
]

_GELU = {True: "gelu_pytorch_tanh", False: "gelu"}
_MULTI_LABEL = "multi_label_classification"  # transformers' problem_type of a sigmoid head


class ConversionError(errors.UserError, ValueError):
  """Params or a model that have no counterpart on the other side."""


def key_table(num_layers: int) -> list[tuple[str, str, _Op]]:
  """Every (ours, PyTorch, transform) row for a model with `num_layers` blocks."""
  rows = list(MODEL_KEYS)
  for i in range(num_layers):
    rows += [
      (f"Transformer/encoderblock_{i}/{a}", f"vit.layers.{i}.{b}", op) for a, b, op in BLOCK_KEYS
    ]
  return rows


def to_torch_state_dict(params: dict[str, Any], num_heads: int) -> dict[str, np.ndarray]:
  """Our params (unscanned) to a ViTForImageClassification state dict of numpy arrays."""
  flat = layout.unstack_blocks(layout.flatten(params))
  if any(k.startswith("pre_logits/") for k in flat):
    raise ConversionError(
      "the params have pre_logits (a representation layer), which "
      "ViTForImageClassification has no place for; load the checkpoint "
      "into a model without representation_size (it is dropped) first"
    )
  num_layers = len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
  rows = key_table(num_layers)
  missing = [ours for ours, _, _ in rows if ours not in flat]
  extra = sorted(set(flat) - {ours for ours, _, _ in rows})
  if missing or extra:
    raise ConversionError(
      f"params do not form a ViT classifier: missing {missing[:5]}, unexpected {extra[:5]}"
    )
  return {
    pt: np.ascontiguousarray(op[0](np.asarray(flat[ours], np.float32), num_heads))
    for ours, pt, op in rows
  }


def from_torch_state_dict(state: dict[str, np.ndarray], num_heads: int) -> dict[str, Any]:
  """A ViTForImageClassification state dict (numpy arrays) to our nested params."""
  num_layers = len({k.split(".")[2] for k in state if k.startswith("vit.layers.")})
  rows = key_table(num_layers)
  missing = [pt for _, pt, _ in rows if pt not in state]
  extra = sorted(set(state) - {pt for _, pt, _ in rows})
  if missing or extra:
    raise ConversionError(
      f"not a ViTForImageClassification state dict of this transformers "
      f"version: missing {missing[:5]}, unexpected {extra[:5]}"
    )
  return layout.unflatten(
    {ours: np.asarray(op[1](np.asarray(state[pt], np.float32), num_heads)) for ours, pt, op in rows}
  )


def hf_config(
  model: models.VisionTransformer, labels: list[str] | None = None, multilabel: bool = False
):
  """The transformers ViTConfig of `model` (GELU and LayerNorm eps matched).

  A multi-label (sigmoid) head gets problem_type "multi_label_classification", with which
  transformers' pipeline() applies a sigmoid rather than a softmax.
  """
  from transformers import ViTConfig  # noqa: PLC0415  # the torch extra

  if (
    model.representation_size is not None
    or model.classifier != "token"
    or model.num_classes is None
  ):
    raise ConversionError(
      "only class-token classifiers without pre_logits have a ViTForImageClassification counterpart"
    )
  kw = {}
  if labels is not None:
    if len(labels) != model.num_classes:
      raise ConversionError(f"{len(labels)} labels for {model.num_classes} classes")
    kw = dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
  if multilabel:
    kw["problem_type"] = _MULTI_LABEL
  return ViTConfig(
    hidden_size=model.hidden_size,
    num_hidden_layers=model.num_layers,
    num_attention_heads=model.num_heads,
    intermediate_size=model.mlp_dim,
    hidden_act=_GELU[model.gelu_approximate],
    layer_norm_eps=1e-6,
    image_size=model.image_size,
    patch_size=model.patch_size,
    num_channels=3,
    qkv_bias=True,
    num_labels=model.num_classes,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    **kw,
  )


def load_torch() -> None:
  """Imports PyTorch and transformers' ViT now, before anything loads TensorFlow.

  PyTorch's default build ships triton, and importing triton segfaults once TensorFlow's
  libraries are in the process (a gs:// read loads them); in the other order both work.
  """
  import torch  # noqa: F401, PLC0415  # the torch extra
  import transformers.models.vit.modeling_vit  # noqa: F401, PLC0415  # the torch extra


def to_transformers(
  params: dict[str, Any],
  model: models.VisionTransformer,
  out_dir: str,
  labels: list[str] | None = None,
  multilabel: bool = False,
):
  """Writes a directory that ViTForImageClassification.from_pretrained loads; returns the model."""
  import torch  # noqa: PLC0415  # the torch extra
  from transformers import ViTForImageClassification  # noqa: PLC0415  # the torch extra

  config = hf_config(model, labels, multilabel)
  state = to_torch_state_dict(params, model.num_heads)
  pt = ViTForImageClassification(config)
  pt.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  pt.eval()
  if files.is_remote(out_dir):
    with tempfile.TemporaryDirectory() as local:
      _save_pretrained(pt, model, local)
      files.copy_dir(local, out_dir)
  else:
    _save_pretrained(pt, model, out_dir)
  return pt


def _save_pretrained(pt, model: models.VisionTransformer, out_dir: str) -> None:
  """The weights and config, and the image processor's config that `pipeline()` needs."""
  pt.save_pretrained(out_dir, safe_serialization=True)
  with files.atomic_write(os.path.join(out_dir, "preprocessor_config.json")) as f:
    f.write(json.dumps(preprocessor_config(model.image_size), indent=2).encode())


def preprocessor_config(image_size: int) -> dict[str, Any]:
  """The transformers image-processor settings that reproduce the original preprocessing.

  RGB, a bilinear resize to the model's size, then x / 255 normalised with mean and std
  0.5, i.e. (x - 127.5) / 127.5 in [-1, 1]. At the model's size nothing is resized, and the
  pixels the model sees are ours; at other sizes transformers' resize differs from ours
  (PIL's bilinear filter widens when it downscales, an antialias; TensorFlow's does not).
  """
  return {
    "image_processor_type": "ViTImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"height": image_size, "width": image_size},
    "resample": 2,  # PIL.Image.BILINEAR
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
  }


def model_from_hf_config(hf) -> models.VisionTransformer:
  """Our VisionTransformer for a transformers ViTConfig `hf`."""
  try:
    model_spec = spec_lib.ModelSpec.from_hf_config(hf)
  except errors.ConfigError as e:
    raise ConversionError(str(e)) from None
  if abs(hf.layer_norm_eps - 1e-6) > 1e-9:
    log.warning(
      "layer_norm_eps %g differs from this model's 1e-6; outputs differ slightly", hf.layer_norm_eps
    )
  return models.build(model_spec)


def from_transformers(
  src: str,
) -> tuple[models.VisionTransformer, dict[str, Any], list[str] | None]:
  """A transformers ViTForImageClassification directory (local or gs://) to (our model, params,
  labels).
  """
  if not files.exists(os.path.join(src, "config.json")):
    raise ConversionError(f"{src}: not a transformers model directory (no config.json)")
  if files.is_remote(src):
    with tempfile.TemporaryDirectory() as local:
      files.copy_dir(src, local)
      return from_transformers(local)
  from transformers import ViTConfig  # noqa: PLC0415  # the torch extra
  from transformers import ViTForImageClassification  # noqa: PLC0415  # the torch extra

  model = model_from_hf_config(ViTConfig.from_pretrained(src))  # refuses before loading weights
  pt = ViTForImageClassification.from_pretrained(src)
  state = {k: v.detach().cpu().numpy() for k, v in pt.state_dict().items()}
  params = from_torch_state_dict(state, model.num_heads)
  id2label = pt.config.id2label or {}
  labels = [id2label[i] for i in range(len(id2label))] if id2label else None
  if labels and all(name == f"LABEL_{i}" for i, name in enumerate(labels)):
    labels = None
  return model, params, labels


def write_labels(labels: list[str], path: str) -> None:
  """One class name per line, in index order (what `--labels` reads)."""
  with files.atomic_write(path) as f:
    f.write(("\n".join(labels) + "\n").encode("utf-8"))


def transformers_to_npz(src: str, dst: str) -> tuple[models.VisionTransformer, list[str]]:
  """Converts a transformers directory to an original-layout .npz; returns the model and the
  files written beside `dst`: the head record (kind and class names), and a labels file when
  the directory names its classes."""
  model, params, names = from_transformers(src)
  problem = json.loads(files.read_bytes(files.join(src, "config.json"))).get("problem_type")
  checkpoint.save(params, dst)
  record = head_record.HeadRecord(
    "sigmoid" if problem == _MULTI_LABEL else "softmax", tuple(names) if names else None
  )
  written = [head_record.write(dst, record)]
  if names:
    written.append(os.path.splitext(dst)[0] + ".labels.txt")
    write_labels(names, written[-1])
  return model, written


def _transformers_version() -> str:
  from importlib import metadata  # noqa: PLC0415  # the torch extra

  return metadata.version("transformers")


def npz_to_transformers(
  src: str, dst: str, labels: str | None = None, drop_pre_logits: bool = False
) -> models.VisionTransformer:
  """Converts an original-layout .npz (local or gs://) to a transformers directory.

  The class names are the `labels` file's, else the head record's (NAME.head.json, which
  also says whether the head is a sigmoid), else ImageNet's for 1000-class heads.
  """
  tree = checkpoint.load(src)
  found = models.build(spec_lib.ModelSpec.from_params(tree, src))
  if found.resnet_layers is not None:
    # transformers' ViTHybrid classes were deprecated in 4.42 and are gone from 5.x.
    raise ConversionError(
      f"{src} is a hybrid ({found.spec}); transformers {_transformers_version()} "
      "has no class for ResNet+ViT hybrids (timm's vit_base_r50_s16_384 and "
      "friends load the .npz itself)"
    )
  if found.posemb != "learn":
    raise ConversionError(
      f"{src} has a fixed {found.posemb} position embedding (none in the file); "
      "ViTForImageClassification has only a learned one"
    )
  if found.representation_size and not drop_pre_logits:
    raise ConversionError(
      f"{src} has a pre_logits layer, which ViTForImageClassification "
      "cannot hold; pass --drop-pre-logits to drop it (outputs change)"
    )
  if found.num_classes is None:
    raise ConversionError(f"{src} has no head; ViTForImageClassification needs one")
  model = found.clone(representation_size=None)
  params = checkpoint.load_pretrained(tree, model, source=src)
  record = head_record.read(src)
  names = None if labels else head_record.class_names(src, record, model.num_classes)
  if names is None and (labels or model.num_classes == 1000):
    names = labels_lib.for_classes(model.num_classes, labels)
  to_transformers(
    params, model, dst, labels=names, multilabel=record is not None and record.multilabel
  )
  return model


def convert(
  src: str, dst: str, *, labels: str | None = None, drop_pre_logits: bool = False
) -> list[str]:
  """Converts either way, as SRC is: a transformers directory to an .npz, else an .npz to a
  transformers directory. Returns what was written, a line each."""
  load_torch()
  src = registry.resolve(src)
  if files.isdir(src):
    model, beside = transformers_to_npz(src, dst)
    return [
      f"{dst} ({model.num_layers} layers, {model.num_classes} classes, {model.image_size}px)",
      *beside,
    ]
  npz_to_transformers(src, dst, labels, drop_pre_logits)
  return [f"{dst} (load with transformers.ViTForImageClassification.from_pretrained)"]
