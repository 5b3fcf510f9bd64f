"""The per-host tf.data streams, and their delivery as globally sharded, prefetched jax.Arrays.

Positions. Every example a host draws has a stream position: for training,
epoch * epoch_length + place in the epoch; for evaluation, its place in this
host's share. The epoch order, the augmentation seeds and the mixup seeds are
functions of (config.seed, position) only, so a run restarted at step k sees
exactly the batches an uninterrupted run saw from step k: it starts the
position counter at k * per-host batch instead of replaying the stream.
Positions also reveal undecodable images: decoding errors drop the element
(`ignore_errors`), leaving a gap in the otherwise consecutive positions.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from vit_jax import errors
from vit_jax.config import schema
from vit_jax.data import devices
from vit_jax.data import sources
from vit_jax.data import transforms
from vit_jax.platform import files
from vit_jax.platform import tf_setup

log = logging.getLogger("vit_jax.data")

_END = 2**62  # the training stream has no end
# Independent random streams of one run, each keyed by (seed, salt).
_SALT_ORDER, _SALT_AUG, _SALT_MIX, _SALT_BALANCE = 1, 2, 3, 4
_NAMED_SKIPS = 10  # undecodable files named in the log per process; the rest are only counted


def _key(seed: int, salt: int) -> int:
  """A 63-bit key for one of the run's random streams."""
  return int(np.random.SeedSequence([int(seed) % 2**63, salt]).generate_state(1, np.uint64)[0] >> 1)


# -- undecodable images ------------------------------------------------------------


class _DecodeErrors:
  """One pipeline's count of undecodable images (training and evaluation), and how many of them
  the log has named; its streams' threads add to it."""

  def __init__(self):
    self.lock = threading.Lock()
    self.skipped = 0
    self.named = 0

  def add(self, n: int) -> int:
    """Counts `n` more; returns how many of them to name in the log."""
    with self.lock:
      self.skipped += n
      to_name = max(0, min(n, _NAMED_SKIPS - self.named))
      self.named += to_name
      return to_name


class _SkipCounter:
  """Counts the positions missing from an ordered stream: the images that failed to decode."""

  def __init__(
    self,
    start: int,
    what: str,
    errors: _DecodeErrors,
    epoch_length: int | None = None,
    describe: Callable[[int], str] | None = None,
  ):
    self.next, self.what, self.epoch_length, self.describe = start, what, epoch_length, describe
    self.errors = errors
    self.per_epoch: collections.Counter[int] = collections.Counter()
    self.epoch = start // epoch_length if epoch_length else 0

  def see(self, positions: np.ndarray) -> None:
    pos = positions[positions >= 0]
    if not len(pos):
      return
    prev = np.concatenate([[self.next - 1], pos[:-1]])
    for p, gap in zip(pos, pos - prev - 1, strict=True):
      if gap > 0:
        self._missing(int(p) - int(gap), int(p))
    self.next = int(pos[-1]) + 1
    if self.epoch_length:
      done = (self.next - 1) // self.epoch_length
      for e in range(self.epoch, done):
        if self.per_epoch.get(e):
          log.warning(
            "%s epoch %d: %d undecodable images skipped (%d in this pipeline so far)",
            self.what,
            e,
            self.per_epoch.pop(e),
            self.errors.skipped,
          )
      self.epoch = max(self.epoch, done)

  def finish(self, end: int) -> None:
    """The stream ended; positions up to `end` (exclusive) were due."""
    if end > self.next:
      self._missing(self.next, end)
    total = sum(self.per_epoch.values())
    if total:
      log.warning("%s: %d undecodable images skipped", self.what, total)

  def _missing(self, lo: int, hi: int) -> None:
    to_name = self.errors.add(hi - lo)
    for p in range(lo, lo + to_name):
      log.warning(
        "%s: skipped an undecodable image%s",
        self.what,
        f" ({self.describe(p)})" if self.describe else f" (position {p})",
      )
    if self.epoch_length:
      for e in range(lo // self.epoch_length, (hi - 1) // self.epoch_length + 1):
        a, b = max(lo, e * self.epoch_length), min(hi, (e + 1) * self.epoch_length)
        self.per_epoch[e] += b - a
    else:
      self.per_epoch[0] += hi - lo


# -- config ------------------------------------------------------------------------


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  count = jax.process_count() if process_count is None else int(process_count)
  index = jax.process_index() if process_index is None else int(process_index)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, process_count={count})")
  return index, count


def _host_batch(global_batch: Any, count: int, what: str) -> int:
  if not global_batch or int(global_batch) < 1:
    raise errors.ConfigError(f"config.{what} must be a positive integer, not {global_batch!r}")
  if int(global_batch) % count:
    raise errors.ConfigError(f"config.{what} {global_batch} does not divide over {count} processes")
  return int(global_batch) // count


def _image_size(config: Any) -> int:
  size = config.image_size
  if not size or int(size) < 1:
    raise errors.ConfigError(f"config.image_size must be a positive integer, not {size!r}")
  return int(size)


def _crop_ratio(config: Any) -> float | None:
  """config.eval_crop: False -> plain resize; True -> short side to size; r in (0, 1] -> to size /
  r.
  """
  v = config.eval_crop
  if v is True:
    return 1.0
  if not v:
    return None
  if not 0.0 < float(v) <= 1.0:
    raise errors.ConfigError(f"config.eval_crop {v!r} is not a bool or a crop fraction in (0, 1]")
  return float(v)


def _threads(config: Any) -> int:
  n = config.data_threads
  return (
    int(n)
    if n
    else len(os.sched_getaffinity(0))
    if hasattr(os, "sched_getaffinity")
    else (os.cpu_count() or 1)
  )


def _options(config: Any):
  tf = tf_setup.tf()
  options = tf.data.Options()
  options.deterministic = True
  # Parallelism comes from many images at once; one thread per op avoids oversubscription.
  options.threading.private_threadpool_size = _threads(config)
  options.threading.max_intra_op_parallelism = 1
  return options


# -- streams -----------------------------------------------------------------------


@dataclasses.dataclass
class _Stream:
  """A tf.data dataset of per-host batches (each with positions), and its skip counter."""

  dataset: Any
  counter: _SkipCounter
  end: int | None = None  # evaluation: the positions due on this host
  owner: Any = None  # the Pipeline: alive while its streams are, to close them at exit

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    gen = self._batches()
    if self.owner is not None:
      self.owner._open.add(gen)
    return gen

  def _batches(self) -> Iterator[dict[str, np.ndarray]]:
    for batch in self.dataset.as_numpy_iterator():
      self.counter.see(batch.pop("pos"))
      yield batch
    if self.end is not None:
      self.counter.finish(self.end)


def _balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
  """Indices with every class repeated up to the largest class's count (extra picks seeded)."""
  rng = np.random.default_rng(_key(seed, _SALT_BALANCE))
  groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  most = max(len(g) for g in groups)
  return np.concatenate(
    [
      np.concatenate([np.tile(g, most // len(g)), rng.permutation(g)[: most % len(g)]])
      for g in groups
    ]
  )


def _indexed_train(
  records: sources.Records, index: int, count: int, seed: int, start: int, balance: bool
):
  """Epoch e is a full permutation (keyed by seed and e) of the records; host i takes every
  count-th.
  """
  tf = tf_setup.tf()
  order = _balanced_order(records.labels, seed) if balance else np.arange(len(records))
  total = len(order)
  length = total // count
  if length == 0:
    raise errors.DataError(
      f"the training split has {total} examples, fewer than the {count} processes"
    )
  order_t = tf.constant(order, tf.int64)
  paths, labels = tf.constant(records.paths), tf.constant(records.labels)
  key = tf.constant(_key(seed, _SALT_ORDER), tf.int64)
  max_index = tf.constant(total - 1, tf.int64)

  def pick(pos):
    epoch, k = pos // length, pos % length
    j = k * count + index
    idx = tf.gather(
      order_t, tf.random.experimental.index_shuffle(j, tf.stack([key, epoch]), max_index)
    )
    return {
      "pos": pos,
      "index": idx,
      "path": tf.gather(paths, idx),
      "label": tf.gather(labels, idx),
    }

  def describe(pos: int) -> str:
    return pick(tf.constant(pos, tf.int64))["path"].numpy().decode()

  ds = tf.data.Dataset.range(start, _END).map(
    tf.autograph.experimental.do_not_convert(pick), num_parallel_calls=tf.data.AUTOTUNE
  )
  _check_decodable(ds, describe)
  return ds, length, describe


def _oversample(ds, counts: np.ndarray):
  """Repeats examples so every present class reaches the largest count; ranks pick the extras."""
  tf = tf_setup.tf()
  most = int(counts.max())
  per_class = tf.constant(np.maximum(counts, 1), tf.int64)

  def step(seen, x):
    c = tf.cast(x["label"], tf.int64)
    reps = most // per_class[c] + tf.cast(seen[c] < most % per_class[c], tf.int64)
    return tf.tensor_scatter_nd_add(seen, [[c]], [1]), (x, reps)

  ds = ds.scan(tf.zeros([len(counts)], tf.int64), tf.autograph.experimental.do_not_convert(step))
  return ds.flat_map(lambda x, reps: tf.data.Dataset.from_tensors(x).repeat(reps))


def _tfds_train(
  source: sources.TfdsSource,
  spec: str,
  index: int,
  count: int,
  seed: int,
  start: int,
  balance: bool,
  buffer: int,
  cycle: int,
):
  """Epoch e reads this host's shards in e-keyed order, interleaved, through an e-keyed shuffle."""
  tf = tf_setup.tf()
  host = source.host_split(spec, index, count)
  counts = None
  if balance:
    counts = np.bincount(source.labels(host), minlength=source.num_classes)
    length = int((counts > 0).sum() * counts.max())
  else:
    length = source.num_examples(host)
  if length == 0:
    raise errors.DataError(f"{source.name}: process {index} of {count} has no examples of {spec!r}")
  first_epoch, skip = divmod(start, length)
  key = tf.constant(_key(seed, _SALT_ORDER), tf.int64)
  buffer = min(int(buffer), length)

  def epoch(e):
    s = tf.stack([key, e])
    ds = source.stream(host, shard_seed=s, cycle_length=cycle)
    if counts is not None:
      ds = _oversample(ds, counts)
    if buffer > 1:
      ds = ds.shuffle(
        buffer, seed=tf.random.stateless_uniform([], s, minval=None, maxval=None, dtype=tf.int64)
      )
    return ds.enumerate().map(lambda k, x: {**x, "pos": e * length + k})

  epochs = tf.data.Dataset.range(first_epoch, _END).flat_map(epoch)
  _check_decodable(epochs, None)
  # Whole epochs are skipped by arithmetic; within the first one, skipped records are read, not
  # decoded.
  return epochs.skip(skip), length


def _read_remote(path: bytes) -> bytes:
  return files.read_bytes(path.decode())


def _encoded(x: dict):
  """An element's encoded image: read from its path (folders, lists) or carried along (TFDS)."""
  tf = tf_setup.tf()
  if "path" not in x:
    return x["encoded"]
  path = x["path"]

  def remote():
    # Through vit_jax.platform.files, so that gs:// reaches the endpoint every other access uses;
    # TensorFlow's own GCS client cannot be pointed anywhere but Google's hosts.
    return tf.ensure_shape(tf.numpy_function(_read_remote, [path], tf.string, stateful=False), [])

  return tf.cond(
    tf.strings.regex_full_match(path, "[A-Za-z][A-Za-z0-9+.-]*://.*"),
    remote,
    lambda: tf.io.read_file(path),
  )


_CHECKED = 32


def _check_decodable(ds, describe: Callable[[int], str] | None) -> None:
  """Fails fast when none of the first training images decodes.

  Undecodable images are dropped, so a dataset of nothing but unreadable files
  (say, Git LFS pointers named .jpg) would otherwise make training wait forever.
  """
  tf = tf_setup.tf()
  sample = (
    ds.take(_CHECKED)
    .map(lambda x: tf.shape(transforms.decode(_encoded(x)))[0], num_parallel_calls=tf.data.AUTOTUNE)
    .ignore_errors()
  )
  if next(iter(sample), None) is None:
    first = int(next(iter(ds.take(1)))["pos"])
    example = f" (the first: {describe(first)})" if describe else ""
    raise errors.DataError(
      f"none of the first {_CHECKED} training images could be decoded{example}; "
      "are these image files?"
    )


def _train_stream(
  config: Any, source: Any, start_step: int, index: int, count: int, owner: Pipeline
) -> _Stream:
  tf = tf_setup.tf()
  host_batch = _host_batch(config.batch_size, count, "batch_size")
  size = _image_size(config)
  aug = transforms.Augment.from_config(config.augment)
  seed = int(config.seed)
  balance = bool(config.balance_classes)
  if balance and source.multilabel:
    raise errors.ConfigError(
      "config.balance_classes needs single-label data; this dataset is multi-label"
    )
  spec = sources.split_spec(source, config, "train")
  start = int(start_step) * host_batch
  if start < 0:
    raise ValueError(f"start_step {start_step} is negative")
  describe = None
  if source.indexed:
    ds, length, describe = _indexed_train(source.records(spec), index, count, seed, start, balance)
  else:
    ds, length = _tfds_train(
      source,
      spec,
      index,
      count,
      seed,
      start,
      balance,
      int(config.shuffle_buffer or 1),
      int(config.tfds_cycle_length),
    )
  aug_key = tf.constant(_key(seed, _SALT_AUG), tf.int64)

  def example(x):
    image = transforms.train_image(_encoded(x), tf.stack([aug_key, x["pos"]]), size, aug)
    return {"image": image, "label": x["label"], "index": x["index"], "pos": x["pos"]}

  ds = ds.map(
    tf.autograph.experimental.do_not_convert(example), num_parallel_calls=tf.data.AUTOTUNE
  )
  ds = ds.ignore_errors().batch(host_batch, drop_remainder=True)
  if aug.mixup_alpha or aug.cutmix_alpha:
    mix_key = tf.constant(_key(seed, _SALT_MIX), tf.int64)
    num_classes, multilabel = source.num_classes, source.multilabel

    def mix(batch):
      targets = batch["label"] if multilabel else tf.one_hot(batch["label"], num_classes)
      images, targets = transforms.mix_batch(
        batch["image"], targets, tf.stack([mix_key, batch["pos"][0]]), aug
      )
      return {**batch, "image": images, "label": targets}

    ds = ds.map(tf.autograph.experimental.do_not_convert(mix))
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(config))
  counter = _SkipCounter(start, "train", owner.errors, length, describe)
  return _Stream(ds, counter, owner=owner)


def _eval_stream(
  config: Any, source: Any, split: str, index: int, count: int, owner: Pipeline
) -> tuple[_Stream, int]:
  """This host's share of `split`, padded with masked examples to the same batch count on every
  host.
  """
  tf = tf_setup.tf()
  host_batch = _host_batch(config.eval_batch_size, count, "eval_batch_size")
  size, crop = _image_size(config), _crop_ratio(config)
  spec = sources.split_spec(source, config, split)
  describe = None
  if source.indexed:
    records = source.records(spec)
    mine = np.arange(index, len(records), count)
    n_host, n_max = len(mine), -(-len(records) // count)
    ds = tf.data.Dataset.from_tensor_slices(
      {
        "path": records.paths[mine],
        "label": records.labels[mine],
        "index": mine.astype(np.int64),
        "pos": np.arange(n_host, dtype=np.int64),
      }
    )
    describe = lambda pos: records.paths[mine[pos]].decode()  # noqa: E731
  else:
    shares = [source.host_split(spec, k, count) for k in range(count)]
    sizes = [source.num_examples(s) for s in shares]
    n_host, n_max = sizes[index], max(sizes)
    ds = source.stream(shares[index]).enumerate().map(lambda k, x: {**x, "pos": k})
  batches = -(-n_max // host_batch)

  def example(x):
    image = transforms.eval_image(transforms.decode(_encoded(x)), size, crop)
    return {
      "image": image,
      "label": x["label"],
      "index": x["index"],
      "pos": x["pos"],
      "mask": tf.constant(True),
    }

  ds = ds.map(
    tf.autograph.experimental.do_not_convert(example), num_parallel_calls=tf.data.AUTOTUNE
  )
  ds = ds.ignore_errors()
  label_spec = ds.element_spec["label"]
  padding = {
    "image": tf.zeros([size, size, 3], tf.float32),
    "label": tf.zeros(label_spec.shape, label_spec.dtype),
    "index": tf.constant(-1, tf.int64),
    "pos": tf.constant(-1, tf.int64),
    "mask": tf.constant(False),
  }
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.take(batches * host_batch).batch(host_batch).prefetch(tf.data.AUTOTUNE)
  ds = ds.with_options(_options(config))
  counter = _SkipCounter(0, f"{split} split {spec!r}", owner.errors, describe=describe)
  return _Stream(ds, counter, n_host, owner), batches


# The keys outside the data section that the pipeline reads.
_ALSO_READS = ("batch_size", "eval_batch_size", "seed")


def _close_all(open_streams: weakref.WeakSet) -> None:
  for gen in list(open_streams):
    gen.close()


class Pipeline:
  """The input pipeline of one run: its config section and its dataset source, each made once."""

  def __init__(self, config: Any):
    self.config = schema.section(config, "data", *_ALSO_READS)
    self.source = sources.make_source(self.config)
    self._info: sources.DatasetInfo | None = None
    self.errors = _DecodeErrors()
    # Open batch generators. A tf.data iterator with work in flight, destroyed during
    # interpreter shutdown, can deadlock in its destructor (seen with TF 2.21): `close`
    # closes them, and so does the interpreter's exit for a pipeline still alive then.
    self._open: weakref.WeakSet = weakref.WeakSet()
    weakref.finalize(self, _close_all, self._open)

  @property
  def decode_errors(self) -> int:
    """Images this pipeline skipped as undecodable so far, training and evaluation together."""
    with self.errors.lock:
      return self.errors.skipped

  def close(self) -> None:
    """Stops this pipeline's open streams."""
    _close_all(self._open)

  @property
  def info(self) -> sources.DatasetInfo:
    """Classes, label kind and split sizes (the splits are counted on first use)."""
    if self._info is None:
      self._info = sources.dataset_info(self.source, self.config)
    return self._info

  def host_batches(
    self,
    split: str | None = None,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches as numpy: the endless training stream (split None) or one pass over a
    split.

    Keys: 'image', 'label', 'index' (the example's index in its split, -1 for
    padding) and, for evaluation, 'mask'. The batch is the per-host share of the
    global batch size. `process_index`/`process_count` default to JAX's.
    """
    index, count = _processes(process_index, process_count)
    if split is None:
      return iter(_train_stream(self.config, self.source, start_step, index, count, self))
    return iter(_eval_stream(self.config, self.source, split, index, count, self)[0])

  def train_iterator(
    self,
    sharding: jax.sharding.NamedSharding,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, jax.Array]]:
    """Endless global training batches {'image', 'label'} with `sharding`, from `start_step`."""
    config = self.config
    index, count = _processes(process_index, process_count)
    host_batch = _host_batch(config.batch_size, count, "batch_size")
    rows = devices.global_rows(int(config.batch_size), host_batch, count, sharding, "batch_size")
    stream = iter(_train_stream(config, self.source, start_step, index, count, self))
    return devices.to_devices(stream, ("image", "label"), sharding, rows, int(config.prefetch))

  def eval_iterator(
    self,
    split: str,
    sharding: jax.sharding.NamedSharding,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    with_index: bool = False,
  ) -> Iterator[dict[str, jax.Array]]:
    """One pass over `split` ('eval', 'test' or a split string) as global {'image', 'label',
    'mask'}.

    with_index adds 'index': int32 [B], each row's example index in the split (-1 on padding).
    """
    config = self.config
    index, count = _processes(process_index, process_count)
    host_batch = _host_batch(config.eval_batch_size, count, "eval_batch_size")
    rows = devices.global_rows(
      int(config.eval_batch_size), host_batch, count, sharding, "eval_batch_size"
    )
    stream, _ = _eval_stream(config, self.source, split, index, count, self)
    keys = ("image", "label", "mask") + (("index",) if with_index else ())
    return devices.to_devices(iter(stream), keys, sharding, rows, int(config.prefetch))


# One-off forms of the methods above, for tools and tests; a run makes one Pipeline.
def get_info(config: Any) -> sources.DatasetInfo:
  """Classes, label kind and split sizes of the configured dataset."""
  return Pipeline(config).info


def host_batches(
  config: Any, split: str | None = None, **kw: Any
) -> Iterator[dict[str, np.ndarray]]:
  """`Pipeline(config).host_batches(split, **kw)`."""
  return Pipeline(config).host_batches(split, **kw)


def train_iterator(
  config: Any, sharding: jax.sharding.NamedSharding, **kw: Any
) -> Iterator[dict[str, jax.Array]]:
  """`Pipeline(config).train_iterator(sharding, **kw)`."""
  return Pipeline(config).train_iterator(sharding, **kw)


def eval_iterator(
  config: Any, split: str, sharding: jax.sharding.NamedSharding, **kw: Any
) -> Iterator[dict[str, jax.Array]]:
  """`Pipeline(config).eval_iterator(split, sharding, **kw)`."""
  return Pipeline(config).eval_iterator(split, sharding, **kw)
