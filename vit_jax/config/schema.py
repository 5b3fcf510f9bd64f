"""The training config's schema: every key, declared once, with its type, default and meaning.

Every recipe in `vit_jax/config/recipes/` starts from `base()`, which is locked: a recipe
or a `--config.key=value` can change a declared key, never add one, and modules
read declared keys only (tests/test_configs.py checks both). Optional keys
default to None and take `--config.key=None`. `vit-jax train --help-config`
prints this table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict


@dataclasses.dataclass(frozen=True)
class Field:
  """One config key: `model.dtype` is the key `dtype` of the `model` sub-dict."""

  key: str
  type: type
  default: Any
  help: str
  nullable: bool = False  # a key with a default that None may still unset

  @property
  def optional(self) -> bool:
    """Optional keys default to None or are nullable; None unsets them."""
    return self.default is None or self.nullable


_f = Field
# Sections follow the code: data (input_pipeline/), model (models.py), optimizer (optim.py),
# loop (train.py, steps.py) and mesh (sharding.py).
SCHEMA: dict[str, tuple[Field, ...]] = {
  "data": (
    _f("dataset", str, "cifar10", "a TFDS name, 'folder' or 'multilabel'"),
    _f("tfds_data_dir", str, None, "TFDS data_dir (local or gs://); None: TFDS's default"),
    _f("tfds_image_key", str, "image", "the TFDS feature holding the image"),
    _f("tfds_label_key", str, "label", "the TFDS feature holding the label(s)"),
    _f("tfds_cycle_length", int, 16, "TFDS shards read at once"),
    _f("folder", str, None, "ROOT/{train,val,test}/{class}/*.jpg for dataset 'folder'"),
    _f("multilabel_file", str, None, "CSV/JSON of path,labels[,split] for dataset 'multilabel'"),
    _f("multilabel_root", str, None, "directory the list's relative paths start from"),
    _f("class_names", tuple, None, "the classes of a multi-label list, in index order"),
    _f("num_classes", int, None, "classes of a multi-label list with integer labels"),
    _f("train_split", str, None, "TFDS split spec; None: the dataset's preset"),
    _f("eval_split", str, None, "held-out split evaluated during training; None: preset"),
    _f("test_split", str, None, "split evaluated at the end; None: preset"),
    _f("image_size", int, 384, "the model's input size in pixels"),
    _f(
      "eval_crop",
      float,
      0.0,
      "0: plain resize, as the original evaluation; r in (0, 1]: "
      "short side to image_size / r, then the centre (1: short side to image_size)",
    ),
    _f("shuffle_buffer", int, 50_000, "examples per host in the shuffle buffer"),
    _f("balance_classes", bool, False, "sample every class equally often"),
    _f("prefetch", int, 2, "batches kept ahead on the devices"),
    _f("data_threads", int, None, "tf.data threads; None: all CPUs"),
    _f("augment.inception_crop", bool, True, "random crop of 5-100% area, aspect 3/4-4/3"),
    _f("augment.hflip", float, 0.5, "probability of a left-right flip"),
    _f("augment.vflip", float, 0.0, "probability of an up-down flip"),
    _f("augment.rot90", float, 0.0, "probability of a random quarter turn"),
    _f("augment.rrc_prob", float, 0.0, "probability of a RandomResizedCrop"),
    _f("augment.rrc_scale", tuple, (0.05, 1.0), "RandomResizedCrop's area range"),
    _f("augment.mixup_alpha", float, 0.0, "mixup's Beta(alpha, alpha); 0 turns it off"),
    _f("augment.randaug_layers", int, 0, "RandAugment's ops per image; 0 turns it off"),
    _f("augment.randaug_magnitude", float, 10.0, "RandAugment's magnitude (AugReg: 0, 10, 15, 20)"),
    _f("augment.cutmix_alpha", float, 0.0, "CutMix's Beta(alpha, alpha); 0 turns it off"),
    _f("augment.mix_switch_prob", float, 0.5, "mixup and CutMix both on: CutMix's probability"),
    _f("augment.erase_prob", float, 0.0, "probability of random erasing (a box of noise)"),
  ),
  "model": (
    _f(
      "model.name",
      str,
      "ViT-B_16",
      "a variant (ViT-B_16, B/16, ...) the fields below "
      "override; None: no variant, the five fields below are all given",
      nullable=True,
    ),
    _f("model.hidden_size", int, None, "width; None: the variant's"),
    _f("model.mlp_dim", int, None, "MLP hidden width; None: the variant's"),
    _f("model.num_heads", int, None, "attention heads; None: the variant's"),
    _f("model.num_layers", int, None, "blocks; None: the variant's"),
    _f("model.patch_size", int, None, "patch size in pixels; None: the variant's"),
    _f("model.classifier", str, None, "token (class token) or gap (mean of patches); None: token"),
    _f("model.dtype", str, "float32", "compute dtype: float32 or bfloat16"),
    _f("model.param_dtype", str, "float32", "parameter dtype: float32 or bfloat16"),
    _f("model.remat", bool, False, "rematerialise each block in the backward pass"),
    _f("model.remat_policy", str, "nothing_saveable", "a jax.checkpoint_policies name"),
    _f("model.scan", bool, False, "one compiled block scanned over the layers"),
    _f("model.dropout_rate", float, 0.0, "dropout after attention and in the MLP"),
    _f("model.attention_dropout_rate", float, 0.0, "dropout on the attention weights"),
    _f(
      "model.drop_path_rate",
      float,
      0.0,
      "stochastic depth on both residual branches of each block (0: off)",
    ),
    _f(
      "model.drop_path_schedule",
      str,
      "linear",
      "linear: from 0 at the first block to the rate at the last (timm's); constant",
    ),
    _f(
      "model.posemb",
      str,
      "learn",
      "learn (a parameter, the original) or sincos2d (fixed, big_vision's; no parameter)",
    ),
    _f("model.gelu_approximate", bool, True, "tanh GELU, as the original checkpoints"),
    _f("model.representation_size", int, None, "a pre_logits layer of this width; None: none"),
    _f(
      "model.head_bias_init", float, 0.0, "the head's initial bias (-10 for sigmoid pre-training)"
    ),
    _f(
      "pretrained",
      str,
      None,
      "original-layout .npz to start from (local, gs://, or a "
      "checkpoint name: vit-jax checkpoints)",
    ),
    _f("reset_head", bool, True, "start the head from zeros even when the classes match"),
  ),
  "optimizer": (
    _f("optimizer", str, "sgd", "sgd (with momentum) or adam (decoupled weight decay)"),
    _f("momentum", float, 0.9, "SGD momentum"),
    _f("accumulator_dtype", str, None, "SGD momentum dtype (e.g. bfloat16); None: the params'"),
    _f("b1", float, 0.9, "Adam beta1"),
    _f("b2", float, 0.999, "Adam beta2"),
    _f(
      "weight_decay",
      float,
      0.0,
      "decoupled decay: each step subtracts lr * weight_decay * wd_mult * param",
    ),
    _f(
      "wd_mults",
      tuple,
      ((".*/kernel$", 1.0),),
      "weight decay by parameter name: (regex, multiplier) pairs over /-joined names, "
      "the first full match decides; no match: no decay",
    ),
    _f(
      "lr_mults",
      tuple,
      (),
      "learning-rate multipliers by parameter name, pairs as wd_mults; no match: 1; "
      "0 freezes (no update, no optimizer state)",
    ),
    _f(
      "layer_decay",
      float,
      None,
      "layer-wise lr decay (timm's): block i of L at decay^(L-i), embeddings decay^(L+1), "
      "final norm decay, head 1",
    ),
    _f("mu_dtype", str, None, "Adam's first-moment dtype (e.g. bfloat16); None: the params'"),
    _f("base_lr", float, 0.03, "learning rate after warmup"),
    _f("warmup_steps", int, 500, "linear warmup from 0"),
    _f("decay_type", str, "cosine", "cosine, linear or constant"),
    _f("end_lr", float, 0.0, "the learning rate the decay ends at (cosine and linear)"),
    _f("grad_clip_norm", float, 1.0, "global-norm clipping; 0 turns it off"),
    _f("label_smoothing", float, 0.0, "label smoothing (softmax and sigmoid losses)"),
    _f("loss", str, "auto", "softmax_xent or sigmoid_xent; auto: sigmoid for multi-label data"),
  ),
  "loop": (
    _f("batch_size", int, 512, "global batch, split over all devices and hosts"),
    _f("eval_batch_size", int, 512, "global evaluation batch"),
    _f("accum_steps", int, 1, "micro-batches per step, accumulated inside the jitted step"),
    _f("total_steps", int, 10_000, "training steps"),
    _f("seed", int, 0, "initialisation, dropout, shuffling and augmentation"),
    _f("log_every", int, 50, "steps between training-metric lines"),
    _f("eval_every", int, 1000, "steps between evaluations"),
    _f("checkpoint_every", int, 1000, "steps between Orbax checkpoints"),
    _f("keep_checkpoints", int, 2, "Orbax checkpoints kept"),
    _f("async_checkpointing", bool, True, "write checkpoints while training goes on"),
    _f(
      "best_metric",
      str,
      "loss",
      "what best.npz is chosen by: a metric of the eval split (loss, accuracy, macro_f1, mAP, "
      "...) or NAME/metric of an `evals` set",
    ),
    _f(
      "evals",
      tuple,
      (),
      "more evaluation sets, each (name, dataset, split, label_key); None in a field: the "
      "run's own (dataset, eval split, label key)",
    ),
    _f(
      "ema_decay",
      float,
      None,
      "keep an exponential moving average of the params (e.g. 0.9999); None: off",
    ),
    _f(
      "export_params",
      str,
      "raw",
      "what best.npz and final.npz hold, and best_metric scores: raw or ema params",
    ),
    _f(
      "profile_steps",
      int,
      0,
      "trace this many training steps with jax.profiler into "
      "WORKDIR/profile, from the 5th step after (re)start; 0: no trace",
    ),
  ),
  "mesh": (
    _f("mesh.data", int, -1, "devices on the data-parallel axis (-1: the rest)"),
    _f("mesh.fsdp", int, 1, "devices splitting every weight's embedding dimension"),
    _f("mesh.model", int, 1, "devices splitting attention heads and the MLP"),
    _f(
      "logical_rules", tuple, None, "(logical axis, mesh axis) pairs; None: sharding.LOGICAL_RULES"
    ),
  ),
}
FIELDS: dict[str, Field] = {f.key: f for section in SCHEMA.values() for f in section}
SUBDICTS = ("augment", "model", "mesh")


def base() -> ml_collections.ConfigDict:
  """Every declared key at its default, locked."""
  c = ml_collections.ConfigDict({name: ml_collections.ConfigDict() for name in SUBDICTS})
  for f in FIELDS.values():
    parent, _, name = f.key.rpartition(".")
    target = c[parent] if parent else c
    if f.nullable:
      target[name] = ml_collections.FieldReference(f.default, field_type=f.type)
    else:
      target[name] = config_dict.placeholder(f.type) if f.optional else f.default
  c.lock()
  return c


def section(
  config: ml_collections.ConfigDict, name: str, *also: str
) -> ml_collections.FrozenConfigDict:
  """The keys of one schema section (plus the keys `also`), read-only: all that one part reads."""
  out = ml_collections.ConfigDict()
  for key in [f.key for f in SCHEMA[name]] + list(also):
    parent, _, leaf = key.rpartition(".")
    if parent and parent not in out:
      out[parent] = ml_collections.ConfigDict()
    (out[parent] if parent else out)[leaf] = (config[parent] if parent else config)[leaf]
  return ml_collections.FrozenConfigDict(out)


def describe(config: ml_collections.ConfigDict | None = None) -> str:
  """The schema as text, by section: key, type, value (`config`'s, else the default), meaning."""
  lines = []
  for section, fields in SCHEMA.items():
    lines.append(f"{section}:")
    for f in fields:
      value = f.default
      if config is not None:
        parent, _, name = f.key.rpartition(".")
        value = (config[parent] if parent else config)[name]
      shown = repr(value) + (" (optional)" if f.optional else "")
      lines.append(f"  {f.key:28} {f.type.__name__:6} {shown:22} {f.help}")
  return "\n".join(lines)
