"""Every public checkpoint of `gs://vit_models` by name, and a download cache for them.

A name (`ViT-B_16/i21k+i1k-224`, `augreg/B_16-i21k-300ep-...`) is accepted
wherever a checkpoint path is. `resolve` decides whether a string is a path or
a name; a name's file is downloaded once into `~/.cache/vit-jax/checkpoints/`
(`$XDG_CACHE_HOME` in place of `~/.cache`), from `gs://vit_models` or from
`$VIT_JAX_CHECKPOINT_BASE` (a mirror bucket or a local folder laid out alike).

Sources of the table: the original repository's README and notebooks
(google-research/vision_transformer): the bucket listing in `vit_jax.ipynb`,
the `-224` fine-tunes' accuracies in the README's changelog (2020-10-29), and
the README's table of recommended AugReg checkpoints (2021-07-01, B/8 from
`vit_jax_augreg.ipynb`). The resolution of `imagenet21k+imagenet2012/ViT-B_8.npz`
(384) is read off its size in the listing; the source states no accuracy for
the other files.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from vit_jax import errors
from vit_jax.models import spec as spec_lib
from vit_jax.platform import files

log = logging.getLogger(__name__)

BASE_URL = "gs://vit_models"
BASE_ENV = "VIT_JAX_CHECKPOINT_BASE"
I21K_CLASSES = 21843


@dataclasses.dataclass(frozen=True)
class Record:
  """One public checkpoint file and the model it holds."""

  name: str
  path: str  # under the base, e.g. imagenet21k/ViT-B_16.npz
  model: str  # a variant of spec.VARIANTS
  image_size: int
  num_classes: int | None  # None: as the file's head says (the source does not state it)
  pre_logits: bool = False  # a tanh representation layer before the head
  top1: float | None = None  # ImageNet-2012 top-1 (%), where the source states it
  fields: tuple[tuple[str, str], ...] = ()  # an AugReg file's name fields

  def asdict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "fields": dict(self.fields)}


# AugReg's downstream datasets and their classes (TFDS).
ADAPT_CLASSES = {"imagenet2012": 1000, "cifar100": 100, "oxford_iiit_pet": 37, "resisc45": 45}

_AUGREG = re.compile(
  r"(?P<name>[A-Za-z0-9_]+?)-(?P<ds>i1k|i21k(?:_30)?)-(?P<epochs>\d+)ep-lr_(?P<lr>[\d.]+)"
  r"-aug_(?P<aug>[a-z]+\d*)-wd_(?P<wd>[\d.]+)-do_(?P<do>[\d.]+)-sd_(?P<sd>[\d.]+)"
  r"(?:--(?P<adapt_ds>[a-z0-9_]+)-steps_(?P<steps>\d+)k-lr_(?P<adapt_lr>[\d.]+)-res_(?P<res>\d+))?"
)


def _variant(name: str) -> str:
  """The variant an AugReg prefix (`B_16`, `R26_S_32`) names, as spec.py decides."""
  return spec_lib.ModelSpec.from_fields(name).name


def parse_augreg(stem: str, top1: float | None = None, name: str | None = None) -> Record:
  """The record of any AugReg file, from its name
  (`B_16-i21k-300ep-lr_0.001-...[--imagenet2012-...]`).
  """
  m = _AUGREG.fullmatch(stem)
  if not m:
    raise errors.ConfigError(
      f"augreg/{stem}: not an AugReg file name (NAME-i21k-300ep-lr_X-aug_X-"
      "wd_X-do_X-sd_X[--DATASET-steps_Nk-lr_X-res_N])"
    )
  f = m.groupdict()
  try:
    model = _variant(f["name"])
  except errors.ConfigError:
    raise errors.ConfigError(f"augreg/{stem}: unknown model {f['name']!r}") from None
  if f["adapt_ds"]:
    size, classes = int(f["res"]), ADAPT_CLASSES.get(f["adapt_ds"])
  else:
    size, classes = 224, I21K_CLASSES if f["ds"].startswith("i21k") else 1000
  return Record(
    name=name or f"augreg/{stem}",
    path=f"augreg/{stem}.npz",
    model=model,
    image_size=size,
    num_classes=classes,
    top1=top1,
    fields=tuple((k, v) for k, v in f.items() if v is not None),
  )


def _table() -> dict[str, Record]:
  records: list[Record] = []
  for model in (
    "ViT-B_16",
    "ViT-B_32",
    "ViT-B_8",
    "ViT-L_16",
    "ViT-L_32",
    "ViT-H_14",
    "R50+ViT-B_16",
    "R26+ViT-B_32",
    "R50+ViT-L_32",
  ):
    records.append(
      Record(f"{model}/i21k", f"imagenet21k/{model}.npz", model, 224, I21K_CLASSES, pre_logits=True)
    )
  for model, size, top1 in (
    ("ViT-B_16", 384, None),
    ("ViT-B_16", 224, 81.2),
    ("ViT-B_32", 384, None),
    ("ViT-B_8", 384, None),
    ("ViT-L_16", 384, None),
    ("ViT-L_16", 224, 82.7),
    ("ViT-L_32", 384, None),
    ("R50+ViT-B_16", 384, None),
  ):
    suffix = "-224" if size == 224 else ""
    records.append(
      Record(
        f"{model}/i21k+i1k-{size}",
        f"imagenet21k+imagenet2012/{model}{suffix}.npz",
        model,
        size,
        1000,
        top1=top1,
      )
    )
  for model in ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32"):
    records.append(Record(f"{model}/sam", f"sam/{model}.npz", model, 224, 1000))
  # The recommended AugReg checkpoints: the best pre-training per model, and its best
  # ImageNet fine-tune (with that fine-tune's top-1).
  for upstream, finetune, top1 in (
    (
      "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0",
      "steps_20k-lr_0.01-res_384",
      85.59,
    ),
    (
      "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
      "steps_20k-lr_0.03-res_384",
      85.49,
    ),
    (
      "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
      "steps_20k-lr_0.03-res_384",
      83.73,
    ),
    (
      "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1",
      "steps_20k-lr_0.01-res_384",
      85.99,
    ),
    (
      "R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
      "steps_20k-lr_0.01-res_384",
      83.85,
    ),
    (
      "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
      "steps_20k-lr_0.03-res_384",
      78.22,
    ),
    (
      "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
      "steps_20k-lr_0.01-res_384",
      83.59,
    ),
    ("S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0", "steps_20k-lr_0.01-res_384", 79.58),
    (
      "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
      "steps_20k-lr_0.03-res_384",
      75.40,
    ),
    (
      "B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",
      "steps_20k-lr_0.03-res_224",
      85.58,
    ),
  ):
    model = _variant(upstream.split("-")[0])
    res = finetune.rsplit("_", 1)[1]
    records.append(parse_augreg(upstream, name=f"{model}/augreg"))
    records.append(
      parse_augreg(
        f"{upstream}--imagenet2012-{finetune}", top1=top1, name=f"{model}/augreg+i1k-{res}"
      )
    )
    records.append(parse_augreg(upstream))
    records.append(parse_augreg(f"{upstream}--imagenet2012-{finetune}", top1=top1))
  return {r.name: r for r in records}


RECORDS: dict[str, Record] = _table()


def lookup(name: str) -> Record:
  """The record of a name: a listed one, or any AugReg file (`augreg/<file name>`)."""
  name = name.strip()
  if name in RECORDS:
    return RECORDS[name]
  if name.startswith("augreg/"):
    return parse_augreg(name[len("augreg/") :].removesuffix(".npz"))
  near = difflib.get_close_matches(name, list(RECORDS), n=3, cutoff=0.5)
  raise errors.CheckpointError(
    f"{name}: no such file, and not a checkpoint name"
    + (f"; nearest names: {', '.join(near)}" if near else "")
    + " (vit-jax checkpoints lists them)"
  )


def looks_like_path(value: str) -> bool:
  """A URL, an existing file or folder, or an .npz: a path, not a name."""
  return files.is_remote(value) or value.endswith(".npz") or files.exists(value)


def cache_dir() -> str:
  """Where downloaded checkpoints are kept."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "vit-jax", "checkpoints")


def base() -> str:
  return os.environ.get(BASE_ENV) or BASE_URL


def resolve(value: str) -> str:
  """A checkpoint path as given, or the local copy of a named checkpoint (downloaded once)."""
  if looks_like_path(value):
    return value
  return fetch(lookup(value))


def _complete(path: str, expected: int) -> bool:
  """Whether a cached file has its full size and every zip member's checksum matches."""
  if not os.path.isfile(path) or os.path.getsize(path) != expected:
    return False
  try:
    with zipfile.ZipFile(path) as z:
      return z.testzip() is None
  except (zipfile.BadZipFile, OSError, EOFError):
    return False


def _check_model(record: Record, path: str) -> None:
  """A downloaded file must hold the model its record says (a mirror may hold another)."""
  from vit_jax.weights import checkpoint  # noqa: PLC0415  # `vit-jax checkpoints` lists names without loading JAX

  found = spec_lib.ModelSpec.from_params(checkpoint.load(path), path)
  want = spec_lib.ModelSpec.from_fields(
    record.model,
    image_size=record.image_size,
    num_classes=found.num_classes if record.num_classes is None else record.num_classes,
    representation_size=found.hidden_size if record.pre_logits else None,
  )
  if (found.variant, found.image_size, found.num_classes, found.representation_size) != (
    want.variant,
    want.image_size,
    want.num_classes,
    want.representation_size,
  ):
    raise errors.CheckpointError(
      f"{record.name}: the file holds {found} at {found.image_size} px with "
      f"{found.num_classes} classes{' and pre_logits' if found.representation_size else ''}; "
      f"the registry says {record.model} at {record.image_size} px with {want.num_classes} "
      f"classes{' and pre_logits' if record.pre_logits else ''}"
    )


def fetch(record: Record) -> str:
  """The cached copy of `record`'s file, downloading it (atomically, size-checked) if needed."""
  local = os.path.join(cache_dir(), *record.path.split("/"))
  meta = local + ".json"  # what was downloaded: the source and its size
  try:
    with open(meta, encoding="utf-8") as f:
      expected = int(json.load(f)["bytes"])
  except (OSError, ValueError, KeyError, TypeError):
    expected = -1
  if _complete(local, expected):
    return local
  if os.path.exists(local):
    log.warning(
      "%s: the cached copy %s is incomplete or corrupt; fetching it again", record.name, local
    )
  src = files.join(base(), record.path)
  total = files.size(src)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  # A temporary name beside the final one, renamed only once complete and checked: an
  # interrupted download leaves nothing that a later run could take for the file.
  fd, tmp = tempfile.mkstemp(
    dir=os.path.dirname(local), prefix=os.path.basename(local) + ".", suffix=".part"
  )
  try:
    with os.fdopen(fd, "wb") as out:
      _copy(src, out, total, record.name)
    got = os.path.getsize(tmp)
    if got != total:
      raise files.StorageError(f"{src}: downloaded {got} of {total} bytes; try again")
    if not _complete(tmp, total):
      raise errors.CheckpointError(f"{src}: the downloaded file is not a valid .npz archive")
    _check_model(record, tmp)
    os.replace(tmp, local)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  with files.atomic_write(meta) as f:
    f.write(json.dumps({"source": src, "bytes": total}).encode())
  log.info("%s: downloaded %s (%d bytes) to %s", record.name, src, total, local)
  return local


def _copy(src: str, out: Any, total: int, what: str, chunk: int = 8 << 20) -> None:

  with (
    files.open_read(src) as f,
    tqdm(
      total=total,
      unit="B",
      unit_scale=True,
      unit_divisor=1024,
      desc=f"downloading {what}",
      leave=False,
    ) as bar,
  ):
    while True:
      block = f.read(chunk)
      if not block:
        break
      out.write(block)
      bar.update(len(block))


def select(text: str | None = None) -> list[Record]:
  """The named records, those whose name or model contain `text` when given."""
  return [
    r
    for r in RECORDS.values()
    if not text or text.lower() in r.name.lower() or text.lower() in r.model.lower()
  ]


def cached(record: Record) -> bool:
  return os.path.isfile(os.path.join(cache_dir(), *record.path.split("/")))


def short_list(records: Iterable[Record]) -> list[Record]:
  """The table's rows: the named records, without the long AugReg names of the aliased files."""
  aliased = {r.path for r in records if not r.name.startswith("augreg/")}
  return [r for r in records if not (r.name.startswith("augreg/") and r.path in aliased)]


def markdown_table() -> str:
  """The README's checkpoint table, generated from the registry."""
  rows = [
    "| name | file (under gs://vit_models/) | model | px | classes | ImageNet top-1 |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for r in short_list(RECORDS.values()):
    classes = f"{r.num_classes:,}" if r.num_classes else "as the file"
    classes += " + pre_logits" if r.pre_logits else ""
    rows.append(
      f"| `{r.name}` | `{r.path}` | {r.model} | {r.image_size} | {classes} | "
      f"{f'{r.top1:g}%' if r.top1 else ''} |"
    )
  return "\n".join(rows)
