"""What a server accepts and how it refuses: its options, and the error that becomes a 4xx."""

from __future__ import annotations

import argparse
import dataclasses
import reprlib
from collections.abc import AsyncIterator
from collections.abc import Mapping
from typing import Any

from vit_jax import errors

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 100


def batch_sizes(max_batch: int) -> tuple[int, ...]:
  """The batch shapes a server compiles: powers of two below max_batch, and max_batch."""
  if max_batch < 1:
    raise errors.ConfigError(f"the largest batch size must be at least 1, not {max_batch}")
  return tuple(
    sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch})
  )


def _flag(help_text: str, group: str | None = "limits", flag: str | None = None) -> dict[str, Any]:
  """An Options field's flag: its help, argument group and name (default: the field's)."""
  return {"help": help_text, "group": group, "flag": flag}


_QUEUE_HELP = (
  "images waiting for the model (being fetched, decoded or queued); a request that would pass "
  "it gets 503 with Retry-After at once. An accepted request waits for at most "
  "ceil(MAX_QUEUE / --max-batch) + 1 model calls, so this bounds latency and memory. The "
  "default, 256, is 16 full calls of the default --max-batch (enough to keep the model busy "
  "through a burst; an accepted request waits for at most 17 calls) and 4 requests of the "
  "default --max-images. At least --max-images"
)


@dataclasses.dataclass(frozen=True)
class Options:
  """What a server accepts and how it batches; each field is a `vit-jax serve` flag."""

  top_k: int = dataclasses.field(default=5, metadata=_flag("when a request does not say", None))
  max_batch: int = dataclasses.field(
    default=16, metadata=_flag("most images in one model call", "batching")
  )
  batch_sizes: tuple[int, ...] = dataclasses.field(
    default=(),
    metadata=_flag(
      "compiled batch sizes, e.g. 1,4,16 (default: powers of two up to --max-batch)", "batching"
    ),
  )
  max_wait_ms: float = dataclasses.field(
    default=5.0, metadata=_flag("how long a batch waits for more images before it runs", "batching")
  )
  max_body_bytes: int = dataclasses.field(
    default=16 << 20, metadata=_flag("request body (and fetched URL) size")
  )
  max_pixels: int = dataclasses.field(default=25_000_000, metadata=_flag("pixels in one image"))
  max_images: int = dataclasses.field(default=64, metadata=_flag("images in one request"))
  max_queue: int = dataclasses.field(default=256, metadata=_flag(_QUEUE_HELP))
  allow_urls: bool = dataclasses.field(
    default=False, metadata=_flag("fetch http(s) URL inputs (off: 400), from public addresses only")
  )
  allow_private_urls: bool = dataclasses.field(
    default=False,
    metadata=_flag(
      "with --allow-urls, also fetch from hosts that resolve to loopback, private, link-local "
      "(cloud metadata), multicast or reserved addresses: only where every client may reach "
      "the server's network"
    ),
  )
  url_timeout_s: float = dataclasses.field(
    default=10.0, metadata=_flag("seconds for one URL fetch", flag="url_timeout")
  )

  def __post_init__(self):
    for name in ("top_k", "max_batch", "max_body_bytes", "max_pixels", "max_images", "max_queue"):
      if getattr(self, name) < 1:
        raise errors.ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
    if self.max_wait_ms < 0 or self.url_timeout_s <= 0:
      raise errors.ConfigError("max_wait_ms must be >= 0 and url_timeout_s > 0")
    if any(s < 1 for s in self.batch_sizes):
      raise errors.ConfigError(f"batch sizes must be at least 1: {self.batch_sizes}")
    if self.max_queue < self.max_images:
      raise errors.ConfigError(
        f"max_queue {self.max_queue} is below max_images {self.max_images}: "
        "a request of max_images images could never be queued"
      )
    if self.allow_private_urls and not self.allow_urls:
      raise errors.ConfigError("allow_private_urls needs allow_urls")

  @property
  def sizes(self) -> tuple[int, ...]:
    """The compiled batch sizes; the largest is the most images one model call holds."""
    return tuple(sorted(set(self.batch_sizes))) or batch_sizes(self.max_batch)


class RequestError(Exception):
  """A request that cannot be served as sent: the HTTP status and what was wrong."""

  def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.headers = dict(headers or {})


def short(value: Any) -> str:
  """A client's value quoted in an error message: a one-line repr of bounded length."""
  return _REPR.repr(value)


async def read_limited(
  headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int, what: str
) -> bytes:
  """A request or response body, refused with 413 as soon as it is known to exceed `limit` bytes."""
  declared = headers.get("content-length")
  if declared and declared.isdigit() and int(declared) > limit:
    raise RequestError(413, f"{what} of {declared} bytes is over the limit of {limit} bytes")
  parts, total = [], 0
  async for chunk in chunks:
    total += len(chunk)
    if total > limit:
      raise RequestError(413, f"{what} is over the limit of {limit} bytes")
    parts.append(chunk)
  return b"".join(parts)


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Every Options field as a flag of `parser`, in its argument group."""
  groups: dict[str, Any] = {}
  for f in dataclasses.fields(Options):
    meta = f.metadata
    target = (
      parser
      if meta["group"] is None
      else groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
    )
    flag = "--" + (meta["flag"] or f.name).replace("_", "-")
    if f.type == "bool":
      target.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
    elif f.name == "batch_sizes":  # parsed in from_flags, with an error naming the flag
      target.add_argument(flag, dest=f.name, default=None, help=meta["help"])
    else:
      target.add_argument(
        flag,
        dest=f.name,
        type={"int": int, "float": float}[f.type],
        default=f.default,
        help=meta["help"],
      )


def from_flags(args: argparse.Namespace) -> Options:
  """The Options that `add_flags`' flags were given."""
  values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Options)}
  text = values["batch_sizes"]
  try:
    values["batch_sizes"] = tuple(int(v) for v in text.split(",")) if text else ()
  except ValueError:
    raise errors.ConfigError(
      f"--batch-sizes {text}: expected integers separated by commas"
    ) from None
  return Options(**values)
