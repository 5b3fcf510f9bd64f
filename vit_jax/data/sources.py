"""Where examples come from: TFDS datasets, image folders and multi-label lists.

A source resolves split names (with the presets), counts examples, names the
classes, and hands the pipeline either in-memory records (folders and lists:
random access, so every epoch is a full permutation and resuming is free) or
a TFDS record stream (read shard by shard, in a per-epoch shard order).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from vit_jax import errors
from vit_jax.platform import files
from vit_jax.platform import tf_setup
from vit_jax.weights import labels

log = logging.getLogger("vit_jax.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLIT_KEYS = ("train", "eval", "test")
LABELS_FILE = "labels.txt"

# The original fine-tuning presets: a held-out slice of train for validation.
TFDS_PRESETS = {
  "cifar10": {"train": "train[:98%]", "eval": "train[98%:]", "test": "test"},
  "cifar100": {"train": "train[:98%]", "eval": "train[98%:]", "test": "test"},
  "imagenet2012": {"train": "train[:99%]", "eval": "train[99%:]", "test": "validation"},
}
# Indexed (folder, list) datasets: the split names used when the config gives none.
INDEXED_DEFAULTS = {"train": "train", "eval": "val", "test": "test"}


@dataclasses.dataclass
class DatasetInfo:
  num_classes: int
  class_names: list[str] | None
  multilabel: bool
  num_examples: dict[str, int]  # per split key: 'train', 'eval', 'test' (0: no such split)


@dataclasses.dataclass(frozen=True)
class Records:
  """One split held in memory: image paths and targets, in a fixed order."""

  paths: np.ndarray  # UTF-8 bytes [N]
  labels: np.ndarray  # int32 [N], or float32 [N, C] multi-hot

  def __len__(self) -> int:
    return len(self.paths)

  def take(self, idx: np.ndarray) -> Records:
    return Records(self.paths[idx], self.labels[idx])


def _path_array(paths: Sequence[str]) -> np.ndarray:
  """Paths as UTF-8 bytes: one byte a character where a numpy str array takes four."""
  return np.array([p.encode("utf-8") for p in paths], dtype=bytes)


_SPLIT_RE = re.compile(r"\s*([\w.\-]+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*")


def parse_split(spec: str) -> tuple[str, tuple[str | None, str | None] | None]:
  """'train[10%:]' -> ('train', ('10%', None)); 'val' -> ('val', None)."""
  m = _SPLIT_RE.fullmatch(spec)
  if not m:
    raise errors.ConfigError(f"split {spec!r} is not NAME or NAME[a:b] (a, b: counts or percents)")
  name, lo, hi = m.groups()
  return name, (None if "[" not in spec else (lo, hi))


def _bound(b: str | None, n: int, default: int) -> int:
  if b is None:
    return default
  v = round(n * int(b[:-1]) / 100) if b.endswith("%") else int(b)
  return max(0, min(n, v + n if v < 0 else v))


def slice_records(
  records: Records, bounds: tuple[str | None, str | None] | None, keys: Sequence[str]
) -> Records:
  """A TFDS-style slice of a split, taken in a fixed pseudo-random order (a hash of each key).

  Folders list images class by class; slicing that order would cut whole
  classes off, so slices follow an order that mixes classes yet never changes.
  """
  if bounds is None:
    return records
  n = len(records)
  order = np.argsort([hashlib.md5(k.encode()).digest() for k in keys], kind="stable")
  lo, hi = _bound(bounds[0], n, 0), _bound(bounds[1], n, n)
  return records.take(order[lo : max(lo, hi)])


# -- image files ------------------------------------------------------------------


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


# -- sources ----------------------------------------------------------------------


class FolderSource:
  """ROOT/{train,val,test}/{class_name}/*.{jpg,jpeg,png,bmp,webp}; classes are train's folders,
  sorted.
  """

  indexed = True
  multilabel = False

  def __init__(self, root: str | None):
    if not root:
      raise errors.ConfigError(
        "config.folder is not set (dataset 'folder' reads ROOT/{train,val,test}/CLASS/*.jpg)"
      )
    self.root = str(root).rstrip("/") or "/"
    if not files.isdir(self.root):
      raise errors.MissingFileError(f"{self.root}: no such folder (config.folder)")
    train = files.join(self.root, "train")
    if not files.isdir(train):
      raise errors.MissingFileError(
        f"{train}: no such folder; a folder dataset is ROOT/train/CLASS/*.jpg "
        "(plus ROOT/val and ROOT/test)"
      )
    self.class_names = files.list_dir(train)[0]
    if not self.class_names:
      raise errors.DataError(f"{train}: no class folders in it (expected {train}/CLASS_NAME/*.jpg)")
    self._ids = {c: i for i, c in enumerate(self.class_names)}
    self.num_classes = len(self.class_names)
    self._listed: dict[str, Records] = {}  # a split is listed once per source, i.e. per run

  def default_split(self, key: str) -> str:
    return INDEXED_DEFAULTS[key]

  def has_split(self, spec: str) -> bool:
    return files.isdir(files.join(self.root, parse_split(spec)[0]))

  def records(self, spec: str) -> Records:
    if spec not in self._listed:
      self._listed[spec] = self._list(spec)
    return self._listed[spec]

  def _list(self, spec: str) -> Records:
    name, bounds = parse_split(spec)
    split_dir = files.join(self.root, name)
    if not files.isdir(split_dir):
      raise errors.MissingFileError(f"{split_dir}: no such folder (split {spec!r})")
    paths, labels, keys = [], [], []
    for cls in files.list_dir(split_dir)[0]:
      class_dir = files.join(split_dir, cls)
      if cls not in self._ids:
        raise errors.DataError(f"{class_dir}: class {cls!r} has no folder in {self.root}/train")
      images = [n for n in files.list_dir(class_dir)[1] if _is_image(n)]
      if not images and name == "train":
        raise errors.DataError(
          f"{class_dir}: no images ({', '.join('*' + e for e in IMAGE_EXTENSIONS)})"
        )
      paths += [files.join(class_dir, n) for n in images]
      keys += [f"{cls}/{n}" for n in images]
      labels += [self._ids[cls]] * len(images)
    if not paths:
      raise errors.DataError(f"{split_dir}: no images in its class folders")
    records = Records(_path_array(paths), np.array(labels, np.int32))
    return slice_records(records, bounds, keys)


class ListSource:
  """A multi-label list: CSV rows `path,labels[,split]` (labels separated by ';' or '|') or JSON.

  JSON is a list of {"path", "labels", "split"?} objects, or {"classes": [...],
  "items": [...]}. Relative paths are taken from `root` (default: the list's
  folder). Items without a split belong to 'train'. Classes: the file's
  "classes", else integer labels with `num_classes`, else the sorted label names.
  """

  indexed = True
  multilabel = True

  def __init__(
    self,
    list_file: str | None,
    root: str | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
  ):
    if not list_file:
      raise errors.ConfigError(
        "config.multilabel_file is not set (dataset 'multilabel' reads a CSV/JSON "
        "list of path,labels)"
      )
    self.list_file = str(list_file)
    try:
      text = files.read_bytes(self.list_file).decode("utf-8-sig")
    except FileNotFoundError:
      raise errors.MissingFileError(
        f"{self.list_file}: no such file (config.multilabel_file)"
      ) from None
    if self.list_file.lower().endswith(".json"):
      items, file_classes = self._parse_json(text)
    else:
      items, file_classes = self._parse_csv(text), None
    if not items:
      raise errors.DataError(f"{self.list_file}: no items")
    if root:
      base = str(root)
    elif files.is_remote(self.list_file):
      base = posixpath.dirname(self.list_file)
    else:
      base = os.path.dirname(os.path.abspath(self.list_file))
    names = list(file_classes or class_names or [])
    all_labels = [str(lab) for _, labs, _ in items for lab in labs]
    if names:
      ids = {str(n): i for i, n in enumerate(names)}
    elif num_classes and all(lab.lstrip("-").isdigit() for lab in all_labels):
      names = [str(i) for i in range(num_classes)]
      ids = {n: i for i, n in enumerate(names)}
    else:
      names = sorted(set(all_labels))
      ids = {n: i for i, n in enumerate(names)}
    if num_classes and num_classes != len(names):
      raise errors.DataError(
        f"{self.list_file}: {len(names)} classes, but config.num_classes is {num_classes}"
      )
    if not names:
      raise errors.DataError(f"{self.list_file}: no labels in any item, and no class list")
    self.class_names, self.num_classes = names, len(names)
    self._items: dict[str, list[tuple[str, list[int]]]] = {}
    for path, labs, split in items:
      try:
        target = [ids[str(lab)] for lab in labs]
      except KeyError as e:
        raise errors.DataError(
          f"{self.list_file}: {path}: label {e.args[0]!r} is not one of the {len(names)} classes"
        ) from None
      full = path if (files.is_remote(path) or os.path.isabs(path)) else files.join(base, path)
      self._items.setdefault(split or "train", []).append((full, target))

  def _parse_json(self, text: str) -> tuple[list[tuple[str, list, str | None]], list[str] | None]:
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise errors.DataError(f"{self.list_file}: not valid JSON ({e})") from None
    classes = None
    if isinstance(data, dict):
      classes, data = data.get("classes"), data.get("items", [])
    out = []
    for i, it in enumerate(data):
      if not isinstance(it, dict) or "path" not in it:
        raise errors.DataError(f"{self.list_file}: item {i} is not an object with a 'path'")
      labels = it.get("labels", [])
      out.append(
        (str(it["path"]), list(labels) if isinstance(labels, list) else [labels], it.get("split"))
      )
    return out, classes

  def _parse_csv(self, text: str) -> list[tuple[str, list, str | None]]:
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    cols = {"path": 0, "labels": 1, "split": 2}
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
      header = [c.strip().lower() for c in rows.pop(0)]
      cols = {
        "path": 0,
        "labels": next((header.index(k) for k in ("labels", "label", "tags") if k in header), 1),
        "split": header.index("split") if "split" in header else None,
      }
    out = []
    for n, row in enumerate(rows, start=1):
      cell = row[cols["labels"]] if len(row) > cols["labels"] else ""
      labels = [lab.strip() for lab in re.split(r"[;|]", cell) if lab.strip()]
      split = (
        row[cols["split"]].strip()
        if cols["split"] is not None and len(row) > cols["split"]
        else None
      )
      if not row[0].strip():
        raise errors.DataError(f"{self.list_file}: row {n} has no path")
      out.append((row[0].strip(), labels, split or None))
    return out

  def default_split(self, key: str) -> str:
    return INDEXED_DEFAULTS[key]

  def has_split(self, spec: str) -> bool:
    return parse_split(spec)[0] in self._items

  def records(self, spec: str) -> Records:
    name, bounds = parse_split(spec)
    if name not in self._items:
      raise errors.DataError(
        f"{self.list_file}: no items in split {name!r} (splits: {sorted(self._items)})"
      )
    items = self._items[name]
    multi_hot = np.zeros((len(items), self.num_classes), np.float32)
    for row, (_, target) in enumerate(items):
      multi_hot[row, target] = 1.0
    paths = [p for p, _ in items]
    return slice_records(Records(_path_array(paths), multi_hot), bounds, paths)


class TfdsSource:
  """A prepared TFDS dataset (never downloaded): name[:version][/config], optional data_dir."""

  indexed = False

  def __init__(
    self, name: str, data_dir: str | None = None, image_key: str = "image", label_key: str = "label"
  ):
    tf_setup.tf()  # TF with accelerators hidden, before TFDS imports it
    import tensorflow_datasets as tfds  # noqa: PLC0415  # loads TensorFlow; only TFDS sources need it
    from tensorflow_datasets.core import registered  # noqa: PLC0415  # loads TensorFlow; only TFDS sources need it

    self.name, self.image_key, self.label_key = name, image_key, label_key
    where = f" in {data_dir}" if data_dir else ""
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except registered.DatasetNotFoundError:
      raise errors.ConfigError(
        f"unknown dataset {name!r}: no TFDS dataset of that name is registered or "
        f"prepared{where}, and it is not 'folder' or 'multilabel'"
      ) from None
    if not self.builder.is_prepared():
      raise errors.MissingFileError(
        f"TFDS dataset {name!r} is not prepared in {self.builder.data_dir}: run `tfds build {name} "
        "--data_dir DIR` where there is network and set config.tfds_data_dir=DIR (this never "
        "downloads)"
      )
    info = self.builder.info
    if str(info.file_format.value) != "tfrecord":
      raise errors.DataError(
        f"{name}: stored as {info.file_format.value}; the pipeline reads tfrecord "
        "datasets (tfds build --file_format=tfrecord)"
      )
    features = info.features
    if image_key not in features:
      raise errors.DataError(
        f"{name}: no image feature {image_key!r} (features: {sorted(features.keys())}); "
        "set config.tfds_image_key"
      )
    if label_key not in features:
      raise errors.DataError(
        f"{name}: no label feature {label_key!r} (features: {sorted(features.keys())}); "
        "set config.tfds_label_key"
      )
    label = features[label_key]
    if isinstance(label, tfds.features.ClassLabel):
      self.multilabel, classes = False, label
    elif isinstance(label, tfds.features.Sequence) and isinstance(
      label.feature, tfds.features.ClassLabel
    ):
      self.multilabel, classes = True, label.feature
    else:
      raise errors.DataError(
        f"{name}: feature {label_key!r} is {type(label).__name__}, not a ClassLabel "
        "or a Sequence of ClassLabel"
      )
    self.num_classes = classes.num_classes
    self.class_names = list(classes.names)
    base = name.split(":")[0].split("/")[0]
    if base == "imagenet2012" and self.num_classes == 1000:
      self.class_names = list(
        labels.imagenet2012()
      )  # readable names, same (sorted WordNet id) order
    self._preset = TFDS_PRESETS.get(base, {})
    self._offsets = {}  # shard file name -> index of its first example in its split
    for split_info in info.splits.values():
      start = 0
      for path, n in zip(split_info.filepaths, split_info.shard_lengths, strict=True):
        self._offsets[posixpath.basename(str(path))] = start
        start += n

  def default_split(self, key: str) -> str:
    if key in self._preset:
      return self._preset[key]
    splits = self.builder.info.splits
    if key == "train":
      return "train"
    if key == "eval":
      return "validation" if "validation" in splits else "test"
    return "test"

  def has_split(self, spec: str) -> bool:
    try:
      self.builder.info.splits[spec]
    except (KeyError, ValueError):
      return False
    return True

  def _split_info(self, split: Any):
    try:
      return self.builder.info.splits[split]
    except (KeyError, ValueError) as e:
      raise errors.ConfigError(
        f"{self.name}: bad split {split!r} ({e}); splits: {sorted(self.builder.info.splits.keys())}"
      ) from None

  def num_examples(self, split: Any) -> int:
    return int(self._split_info(split).num_examples)

  def host_split(self, split: str, index: int, count: int) -> Any:
    """This process's contiguous share of `split`."""
    import tensorflow_datasets as tfds  # noqa: PLC0415  # loads TensorFlow; only TFDS sources need it

    self._split_info(split)
    return tfds.even_splits(split, count, drop_remainder=False)[index]

  def _instructions(self, split: Any) -> tuple[list[str], list[int], list[int], list[int]]:
    table: tuple[list, list, list, list] = ([], [], [], [])
    for fi in self._split_info(split).file_instructions:
      take = fi.take if fi.take >= 0 else fi.examples_in_shard - fi.skip  # -1: to the shard's end
      if take <= 0:
        continue
      first = self._offsets.get(posixpath.basename(fi.filename), 0) + fi.skip
      for col, v in zip(table, (fi.filename, fi.skip, take, first), strict=True):
        col.append(v)
    return table

  def _parse(self, serialized):
    tf = tf_setup.tf()
    spec = {
      self.image_key: tf.io.FixedLenFeature([], tf.string),
      self.label_key: (
        tf.io.VarLenFeature(tf.int64) if self.multilabel else tf.io.FixedLenFeature([], tf.int64)
      ),
    }
    ex = tf.io.parse_single_example(serialized, spec)
    label = ex[self.label_key]
    if self.multilabel:
      ids = tf.sparse.to_dense(label)
      label = tf.minimum(tf.reduce_sum(tf.one_hot(ids, self.num_classes), axis=0), 1.0)
    else:
      label = tf.cast(label, tf.int32)
    return ex[self.image_key], label

  def stream(self, split: Any, shard_seed=None, cycle_length: int = 16):
    """{'index', 'encoded', 'label'} of `split`; shards in a seeded order if `shard_seed` ([2]
    int64).
    """
    tf = tf_setup.tf()
    names, skips, takes, firsts = self._instructions(split)
    columns = (
      tf.constant(names, tf.string),
      tf.constant(skips, tf.int64),
      tf.constant(takes, tf.int64),
      tf.constant(firsts, tf.int64),
    )
    if shard_seed is not None and len(names) > 1:
      n = len(names)
      order = tf.random.experimental.index_shuffle(
        tf.range(n, dtype=tf.int64), shard_seed, tf.constant(n - 1, tf.int64)
      )
      columns = tuple(tf.gather(c, order) for c in columns)
    table = tf.data.Dataset.from_tensor_slices(columns)

    @tf.autograph.experimental.do_not_convert
    def shard(name, skip, take, first):
      return tf.data.TFRecordDataset(name).skip(skip).take(take).enumerate(first)

    parallel = shard_seed is not None and len(names) > 1
    if parallel:
      records = table.interleave(
        shard,
        cycle_length=min(cycle_length, len(names)),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
      )
    else:
      records = table.flat_map(shard)

    def parse(index, serialized):
      encoded, label = self._parse(serialized)
      return {"index": index, "encoded": encoded, "label": label}

    return records.map(
      tf.autograph.experimental.do_not_convert(parse), num_parallel_calls=tf.data.AUTOTUNE
    )

  def labels(self, split: Any) -> np.ndarray:
    """Every label of `split` in one pass (images not decoded): for class balancing."""
    ds = self.stream(split).map(lambda x: x["label"]).batch(4096).prefetch(2)
    parts = [b for b in ds.as_numpy_iterator()]
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def make_source(config: Any) -> FolderSource | ListSource | TfdsSource:
  """The source `config.dataset` names."""
  name = config.dataset
  if not name:
    raise errors.ConfigError("config.dataset is not set (a TFDS name, 'folder' or 'multilabel')")
  if name == "folder":
    return FolderSource(config.folder)
  if name == "multilabel":
    names = config.class_names
    return ListSource(
      config.multilabel_file,
      config.multilabel_root,
      config.num_classes,
      list(names) if names else None,
    )
  return TfdsSource(name, config.tfds_data_dir, config.tfds_image_key, config.tfds_label_key)


def split_spec(source: Any, config: Any, split: str) -> str:
  """'train'/'eval'/'test' -> the configured or preset split string; anything else is used as is."""
  if split in SPLIT_KEYS:
    return config[f"{split}_split"] or source.default_split(split)
  return split


def dataset_info(source: Any, config: Any) -> DatasetInfo:
  """Classes, label kind and split sizes of `source` with `config`'s splits."""
  counts = {}
  for key in SPLIT_KEYS:
    spec = split_spec(source, config, key)
    explicit = bool(config[f"{key}_split"])
    if key == "test" and not explicit and not source.has_split(spec):
      counts[key] = 0  # no test split: fine, the training code skips the test evaluation
      continue
    counts[key] = source.num_examples(spec) if not source.indexed else len(source.records(spec))
  return DatasetInfo(
    num_classes=source.num_classes,
    class_names=source.class_names,
    multilabel=source.multilabel,
    num_examples=counts,
  )


def write_class_names(info: DatasetInfo, workdir: str) -> None:
  """WORKDIR/labels.txt: one class name per line, index order (for `vit-jax predict --labels`)."""
  names = info.class_names or [f"class_{i}" for i in range(info.num_classes)]
  bad = [n for n in names if "\n" in n or "\r" in n]
  if bad:
    raise errors.DataError(
      f"class name {bad[0]!r} has a line break; labels.txt holds one name per line"
    )
  with files.atomic_write(files.join(str(workdir), LABELS_FILE)) as f:
    f.write(("\n".join(names) + "\n").encode("utf-8"))
