"""The device mesh, the logical-axis rules, and the shardings of params, state and batches.

Params carry logical axis names (models.py); the rules here map them onto the
mesh axes `data`, `fsdp` and `model`. With the default mesh (all devices on
`data`) every parameter is replicated: pure data parallelism. A `model` axis
splits attention heads and the MLP hidden dimension (tensor parallelism); an
`fsdp` axis splits the embedding dimension of every weight (ZeRO-3 style), both
so that ViT-L/H fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import errors
from vit_jax.training import hosts

MESH_AXES = ("data", "fsdp", "model")
# The batch is split over every axis that holds a different part of the batch.
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (None: replicated along that dimension).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", BATCH_AXES),
  ("embed", "fsdp"),
  ("mlp", "model"),
  ("heads", "model"),
  ("kv", None),
  ("layers", None),
  ("classes", None),
  ("length", None),
  ("act_embed", None),
  ("act_mlp", "model"),
)


def make_mesh(
  axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A mesh over all devices with axes `data`, `fsdp`, `model`; one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(axes or {"data": -1})
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise errors.ConfigError(f"unknown mesh axes {sorted(unknown)}; known: {', '.join(MESH_AXES)}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise errors.ConfigError(f"mesh {sizes}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise errors.ConfigError(f"mesh {sizes}: {len(devices)} devices do not divide by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise errors.ConfigError(
      f"mesh {sizes} has {math.prod(shape)} places for {len(devices)} devices"
    )
  # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
  # Axis types are set to Auto explicitly: make_mesh defaults to Explicit since 0.9.
  return jax.make_mesh(
    tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split along their first dimension over the data axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(
  boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES
) -> Any:
  """NamedShardings for a tree of nn.LogicallyPartitioned (boxed) shapes or arrays."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def check_divisible(global_batch: int, mesh: Mesh, what: str = "batch size") -> None:
  """A clear error when a batch does not split evenly over the data axes and the hosts."""
  n = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch % n:
    raise errors.ConfigError(
      f"{what} {global_batch} does not divide over {n} data-parallel devices "
      f"(mesh {dict(mesh.shape)})"
    )
  if global_batch % jax.process_count():
    raise errors.ConfigError(
      f"{what} {global_batch} does not divide over {jax.process_count()} hosts"
    )


def put_global(tree: Any, shardings: Any) -> Any:
  """Host arrays (the same on every process) placed as global arrays with `shardings`."""

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree_util.tree_map(put, tree, shardings)


def local_rows(x: jax.Array) -> np.ndarray:
  """This host's rows of a batch-sharded global array, in order (replicas counted once)."""
  starts: dict[int, np.ndarray] = {}
  for shard in x.addressable_shards:
    starts.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
  return np.concatenate([starts[k] for k in sorted(starts)])


def all_rows(x: jax.Array) -> np.ndarray:
  """Every row of a batch-sharded global array, on every host, in order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def maybe_initialize_distributed(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  heartbeat_timeout: int = hosts.DEFAULT_HEARTBEAT_TIMEOUT,
) -> None:
  """jax.distributed.initialize() on multi-host runs: explicit arguments, or a TPU pod slice.

  A process that sends the coordination service no heartbeat for `heartbeat_timeout` seconds
  counts as lost (vit_jax.training.hosts).
  """
  if coordinator:
    if "cpu" in os.environ.get("JAX_PLATFORMS", ""):
      # Cross-process collectives on CPU (tests, CPU clusters) go through gloo.
      # (Asking jax for its backend here would start it before initialize.)
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout,
      )
    except jax.errors.JaxRuntimeError as e:
      # Process 0 runs the service on the coordinator's port.
      if (
        process_id == 0
        and "Failed to start RPC server" in str(e)
        and hosts.address_in_use(coordinator)
      ):
        raise errors.ConfigError(f"--coordinator {coordinator}: Address already in use") from e
      raise
    return
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    # A TPU VM pod slice: the runtime provides the coordinator.
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)
