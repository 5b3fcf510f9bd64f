"""What an exported classifier's head scores, and its classes: a small JSON file beside the `.npz`.

The `.npz` stays in the original layout, which has no room for it. `NAME.npz`
gets `NAME.head.json`: {"head": "softmax" | "sigmoid", "class_names": [...]}.
A softmax head ranks classes that exclude each other; a sigmoid head (trained on
multi-label data) gives each class an independent probability.
"""

from __future__ import annotations

import dataclasses
import json

from vit_jax import errors
from vit_jax.platform import files

KINDS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class HeadRecord:
  """A head's kind and class names (None when the run had none)."""

  head: str
  class_names: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.head not in KINDS:
      raise errors.DataError(f"head must be one of {KINDS}, not {self.head!r}")

  @property
  def multilabel(self) -> bool:
    return self.head == "sigmoid"


def path_for(npz: str) -> str:
  """NAME.head.json for NAME.npz (local or gs://)."""
  npz = str(npz)
  return f"{npz[: -len('.npz')] if npz.endswith('.npz') else npz}.head.json"


def write(npz: str, record: HeadRecord) -> str:
  """Writes the record beside `npz`; returns its path."""
  path = path_for(npz)
  body = {
    "head": record.head,
    "class_names": list(record.class_names) if record.class_names else None,
  }
  with files.atomic_write(path) as f:
    f.write((json.dumps(body, indent=1) + "\n").encode("utf-8"))
  return path


def read(npz: str) -> HeadRecord | None:
  """The record beside `npz`, or None when there is none (e.g. a file from elsewhere)."""
  path = path_for(npz)
  if not files.exists(path):
    return None
  try:
    body = json.loads(files.read_bytes(path))
    names = body.get("class_names")
    if names is not None and not (
      isinstance(names, list) and all(isinstance(n, str) for n in names)
    ):
      raise ValueError("class_names must be a list of strings")
    return HeadRecord(head=body["head"], class_names=tuple(names) if names else None)
  except (ValueError, KeyError, TypeError, AttributeError, errors.DataError) as e:
    raise errors.DataError(f"{path}: not a head record ({e})") from None


def class_names(npz: str, record: HeadRecord | None, num_classes: int) -> list[str] | None:
  """The record's class names for a head of `num_classes`; None when it names none."""
  if record is None or not record.class_names:
    return None
  if len(record.class_names) != num_classes:
    raise errors.DataError(
      f"{path_for(npz)}: {len(record.class_names)} class names for a head of {num_classes} classes"
    )
  return list(record.class_names)
