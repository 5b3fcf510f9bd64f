"""Host batches to global jax.Arrays over the mesh's batch axes, a few batches ahead."""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterator

import jax
import numpy as np

from vit_jax import errors


def batch_shards(sharding: jax.sharding.NamedSharding) -> int:
  """Into how many pieces `sharding` cuts dimension 0."""
  spec = sharding.spec
  axes = spec[0] if len(spec) else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def global_rows(config_batch: int, host_batch: int, count: int, sharding, what: str) -> int:
  """Rows of the global array; with simulated processes (tests) this host's rows are the whole."""
  rows = config_batch if count == jax.process_count() else host_batch
  shards = batch_shards(sharding)
  if rows % shards:
    raise errors.ConfigError(
      f"config.{what} {rows} does not divide over the {shards} devices of the batch "
      f"axes (mesh {dict(sharding.mesh.shape)})"
    )
  return rows


def to_devices(
  batches: Iterator[dict[str, np.ndarray]], keys: tuple[str, ...], sharding, rows: int, depth: int
) -> Iterator[dict[str, jax.Array]]:
  """Global arrays, `depth` batches in flight, so host-to-device copies overlap the steps."""

  def put(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    out = {}
    for k in keys:
      v = (
        batch[k].astype(np.int32) if batch[k].dtype == np.int64 else batch[k]
      )  # JAX's default ints
      out[k] = jax.make_array_from_process_local_data(sharding, v, (rows, *v.shape[1:]))
    return out

  queue: collections.deque = collections.deque()

  def fill(n: int) -> None:
    for batch in itertools.islice(batches, n):
      queue.append(put(batch))

  fill(max(depth, 1))
  while queue:
    yield queue.popleft()
    fill(1)
