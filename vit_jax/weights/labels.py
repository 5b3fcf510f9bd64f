"""Class names: the ImageNet-2012 list shipped with the package, or a user's file.

`imagenet2012_labels.txt` holds the 1000 ILSVRC-2012 class names in
class-index order (WordNet lemmas, e.g. "tench, Tinca tinca"). It was written
from `tensorflow_datasets.datasets.siscore.labels.IMAGENET_LABELS_LIST`, which
tensorflow-datasets installs; a test keeps the two equal.
"""

from __future__ import annotations

import functools
from importlib import resources

from vit_jax import errors
from vit_jax.platform import files


@functools.cache
def imagenet2012() -> tuple[str, ...]:
  """The 1000 ImageNet-2012 class names, index order."""
  text = resources.files("vit_jax.weights").joinpath("imagenet2012_labels.txt").read_text("utf-8")
  return tuple(text.splitlines())


def read(path: str) -> list[str]:
  """A labels file: one class name per line, index order; blank trailing lines ignored."""
  try:
    text = files.read_bytes(path).decode("utf-8")
  except UnicodeDecodeError:
    raise errors.DataError(f"{path}: labels file is not UTF-8 text") from None
  names = text.rstrip("\n").split("\n") if text.strip() else []
  if not names:
    raise errors.DataError(f"{path}: labels file is empty")
  return [n.rstrip("\r") for n in names]


def for_classes(num_classes: int, path: str | None = None) -> list[str]:
  """Names for a head of `num_classes`: from `path`, else ImageNet-2012 for 1000 classes."""
  if path is not None:
    names = read(path)
    if len(names) != num_classes:
      raise errors.DataError(f"{path}: {len(names)} labels for a model with {num_classes} classes")
    return names
  if num_classes == 1000:
    return list(imagenet2012())
  # ImageNet-21k (21843 classes) and custom heads: indices until --labels is given.
  return [f"class_{i}" for i in range(num_classes)]
