"""Classifying image files with a checkpoint: what `vit-jax predict` runs."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax import models
from vit_jax.data import preprocess
from vit_jax.models import spec as spec_lib
from vit_jax.platform import jax_setup
from vit_jax.weights import checkpoint
from vit_jax.weights import head_record
from vit_jax.weights import labels as labels_lib
from vit_jax.weights import registry

log = logging.getLogger(__name__)


def pad_batch(images: np.ndarray, size: int) -> np.ndarray:
  """`images` [N <= size, ...] padded with zero images to `size`: one compiled shape per size."""
  n = len(images)
  if n > size:
    raise ValueError(f"{n} images is more than the batch size {size}")
  if n == size:
    return images
  return np.concatenate([images, np.zeros((size - n, *images.shape[1:]), images.dtype)])


@dataclasses.dataclass
class Classifier:
  """A model with its params and class names, and a jitted batch call."""

  model: models.VisionTransformer
  params: Any
  class_names: list[str]
  model_name: str
  batch_size: int = 8  # past 8 images a CPU runs slower per image (cache)
  # A sigmoid head (multi-label): each class's own probability; else a softmax over classes.
  multilabel: bool = False
  threshold: float | None = None  # leave out classes scored below it
  dtype: str = "float32"  # the compute dtype, and the params' (cast once); logits are float32
  quantized: str | None = None  # what is int8 (models.quantize.Setting.describe), or None

  def __post_init__(self):
    if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
      raise errors.ConfigError(f"threshold {self.threshold} is not a probability in [0, 1]")
    # One compiled shape: the last partial batch is padded, never recompiled. Logits are
    # float32 whatever the compute dtype.
    self._logits = jax.jit(
      lambda p, x: self.model.apply({"params": p}, x, train=False).astype(jnp.float32)
    )
    # Serving: the activation inside the compiled call, so that nothing outside it
    # compiles per batch shape.
    self._probs = jax.jit(
      lambda p, x: self.activation(self.model.apply({"params": p}, x, train=False))
    )

  def activation(self, logits: Any) -> jax.Array:
    """Logits to scores: sigmoid per class for a multi-label head, else softmax over classes."""
    logits = jnp.asarray(logits, jnp.float32)
    return jax.nn.sigmoid(logits) if self.multilabel else jax.nn.softmax(logits, axis=-1)

  @property
  def image_size(self) -> int:
    return self.model.image_size

  def logits(self, images: np.ndarray) -> np.ndarray:
    """Logits [N, C] for preprocessed images [N, S, S, 3], in fixed-size batches."""
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start : start + self.batch_size]
      out.append(
        np.asarray(self._logits(self.params, pad_batch(chunk, self.batch_size)))[: len(chunk)]
      )
    return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

  def top_k(self, images: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
    """For each image, the k best classes as {"label", "score", "index"}, best first."""
    return self.rank(np.asarray(self.activation(self.logits(images))), k)

  def rank(self, probs: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
    """For each row of probabilities [N, C], the k best classes (at or above the threshold)."""
    k = min(k, probs.shape[-1])
    result = []
    for row in probs:
      idx = [
        i
        for i in np.argsort(-row, kind="stable")[:k]
        if self.threshold is None or row[i] >= self.threshold
      ]
      result.append(
        [{"label": self.class_names[i], "score": float(row[i]), "index": int(i)} for i in idx]
      )
    return result

  def compile_batches(self, sizes: Sequence[int]) -> None:
    """Compiles the probabilities call at each batch size, so that `probs` never compiles."""
    for n in sorted(set(sizes)):
      shape = (n, self.image_size, self.image_size, 3)
      jax.block_until_ready(self._probs(self.params, np.zeros(shape, np.float32)))

  def probs(self, images: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Probabilities [N, C] for N <= max(sizes) images, padded to the smallest size that holds N."""
    n = len(images)
    fits = [s for s in sizes if s >= n]
    if not fits:
      raise ValueError(f"{n} images is more than the largest compiled batch size {max(sizes)}")
    images = pad_batch(np.asarray(images, np.float32), min(fits))
    return np.asarray(self._probs(self.params, images))[:n]


def load_classifier(
  checkpoint_path: str,
  *,
  model_name: str | None = None,
  image_size: int | None = None,
  labels_path: str | None = None,
  batch_size: int = 8,
  multilabel: bool | None = None,
  threshold: float | None = None,
  dtype: str | None = None,
  quantize: str | None = None,
  calibration: str | None = None,
  calibration_images: int = 64,
  **model_overrides: Any,
) -> Classifier:
  """A Classifier for an original-layout checkpoint; the model is read off the file by default.

  The head's kind and the class names come from the file's head record (NAME.head.json,
  written by training) when there is one; `multilabel` and `labels_path` override it.
  Without either, a head is a softmax over ImageNet's classes (1000) or `class_i`.
  `dtype` ('auto', 'float32', 'bfloat16'; None: $VIT_JAX_DTYPE, else auto) is the compute
  dtype: auto takes bf16 where the hardware multiplies it natively (jax_setup.compute_dtype).
  `quantize` 'int8' quantizes the weights after loading (post-training, qwix), and the
  activations too with `calibration`: images (a directory or a glob) whose first
  `calibration_images`, spread over the sorted list, set the activations' static ranges.
  """
  checkpoint_path = registry.resolve(checkpoint_path)
  tree = checkpoint.load(checkpoint_path)
  found = spec_lib.ModelSpec.from_params(tree, checkpoint_path)
  if found.num_classes is None:
    raise errors.CheckpointError(f"{checkpoint_path}: has no head; it cannot classify")
  # A named variant must match the file: one of another shape fails in the loader, with
  # the key and both shapes.
  model_spec = spec_lib.ModelSpec.from_fields(
    model_name,
    **({} if model_name else dataclasses.asdict(found.variant)),
    num_classes=found.num_classes,
    image_size=image_size or found.image_size,
    representation_size=found.representation_size,
    classifier=found.classifier,
  )
  dtype, why = jax_setup.compute_dtype(dtype)
  if dtype != "float32":  # said once, since results differ from float32's in the last digits
    log.info("computing in %s (%s)", dtype, why)
  # bf16 compute with float32 params would cast every weight on every call: at batch 1 that
  # made a ViT-B/16 slower than float32 (124 against 92 ms on an AVX512-BF16 CPU). The file's
  # float32 weights are cast once instead (64 ms); the logits stay float32.
  model = models.build(
    model_spec, **{"dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(dtype), **model_overrides}
  )
  name = str(model_spec)  # the variant, or "custom ViT (hidden ..., ...)"
  params = checkpoint.load_pretrained(tree, model, source=checkpoint_path)
  quantized = None
  if quantize is not None or calibration is not None:
    model, params, quantized = _quantize(model, params, quantize, calibration, calibration_images)
  record = head_record.read(checkpoint_path)
  names = (
    None if labels_path else head_record.class_names(checkpoint_path, record, model.num_classes)
  )
  names = names or labels_lib.for_classes(model.num_classes, labels_path)
  if multilabel is None:
    multilabel = record is not None and record.multilabel
  return Classifier(
    model=model,
    params=jax.device_put(params),
    class_names=names,
    model_name=name,
    batch_size=batch_size,
    multilabel=multilabel,
    threshold=threshold,
    dtype=str(jnp.dtype(model.dtype)),
    quantized=quantized,
  )


CALIBRATION_BATCH = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def calibration_paths(data: str, count: int) -> list[str]:
  """`count` image files of `data` (a directory, searched recursively, or a glob), spread
  evenly over their sorted list so that every class folder is drawn from."""
  if count < 1:
    raise errors.ConfigError(f"--calibration-images {count}: must be at least 1")
  if os.path.isdir(data):
    found = [
      os.path.join(root, name)
      for root, dirs, names in os.walk(data)
      for name in names
      if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
    ]
  else:
    found = [p for p in glob.glob(data, recursive=True) if os.path.isfile(p)]
  found = sorted(found)
  if not found:
    raise errors.DataError(f"--calibration {data}: no image files (a directory or a glob)")
  n = min(count, len(found))
  return [found[i * len(found) // n] for i in range(n)]


def _quantize(model, params, scheme, calibration, count):
  """(model, params, description) quantized as `scheme` says, calibrated on `calibration`."""
  if scheme is None:
    raise errors.ConfigError("--calibration is for --quantize int8; give both")
  if importlib.util.find_spec("qwix") is None:
    raise errors.MissingExtraError("int8", "qwix")
  from vit_jax.models import quantize as quantize_lib  # noqa: PLC0415  # qwix: the int8 extra

  if scheme not in quantize_lib.SCHEMES:
    raise errors.ConfigError(
      f"--quantize {scheme}: choose one of {', '.join(quantize_lib.SCHEMES)}"
    )
  batches = None
  if calibration is not None:
    paths = calibration_paths(calibration, count)
    images = np.stack(
      [preprocess.eval_resize(preprocess.read_rgb(p), model.image_size) for p in paths]
    )
    # qwix averages each batch's range over the batches: a fixed batch, so that the ranges
    # do not depend on --batch-size (predict's and export's programs must agree).
    batches = [images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
    log.info("calibrating int8 activations on %d images of %s", len(images), calibration)
  model, params, setting = quantize_lib.quantize(model, params, batches)
  return model, params, setting.describe()


@dataclasses.dataclass
class Result:
  """The predictions for one input, or why there are none."""

  image: str
  predictions: list[dict[str, Any]] | None = None
  error: str | None = None


def classify_files(clf: Classifier, paths: Sequence[str], k: int = 5) -> Iterator[Result]:
  """Results for every path, in order; an unreadable file gets an error, the rest go on."""
  for chunk in _chunks(paths, clf.batch_size):
    images, ok, results = [], [], []
    for path in chunk:
      try:
        images.append(preprocess.eval_resize(preprocess.read_rgb(path), clf.image_size))
        ok.append(len(results))
        results.append(Result(path))
      except preprocess.ImageError as e:
        results.append(Result(path, error=str(e)))
    if images:
      for i, preds in zip(ok, clf.top_k(np.stack(images), k), strict=True):
        results[i].predictions = preds
    yield from results


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
  for start in range(0, len(items), size):
    yield items[start : start + size]
