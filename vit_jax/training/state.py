"""A run's state: the Setup and Pipeline a config makes, Orbax checkpoints, params read from
files, and params gathered to the host.

`prepare` makes a run's Setup and its input Pipeline, each once. `checkpoint_manager` and
`restore` keep the whole training state (params, optimizer state, step) with Orbax;
`load_params` reads an original-layout `.npz`, a checkpoint name or an Orbax checkpoint into
the Setup's shardings; `host_params` gathers sharded params to every host as numpy, for export.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vit_jax import errors
from vit_jax.data import pipeline
from vit_jax.platform import files
from vit_jax.training import sharding
from vit_jax.training import steps
from vit_jax.weights import checkpoint
from vit_jax.weights import registry


def prepare(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> tuple[steps.Setup, pipeline.Pipeline]:
  """The Setup (model, mesh, shardings, steps) and the input Pipeline for `config`."""
  data = pipeline.Pipeline(config)
  mesh = mesh or sharding.make_mesh(config.mesh.to_dict())
  return steps.Setup(config, data.info.num_classes, data.info.multilabel, mesh), data


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """WORKDIR/checkpoints, kept and written as the loop section of `config` says."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_checkpoints,
    create=True,
    save_interval_steps=config.checkpoint_every,
    enable_async_checkpointing=config.async_checkpointing,
  )
  root = workdir if files.is_remote(workdir) else os.path.abspath(workdir)
  return ocp.CheckpointManager(files.join(root, "checkpoints"), options=options)


def restore(mngr: ocp.CheckpointManager, step: int, setup: steps.Setup) -> steps.TrainState:
  """The state at `step`; a clear error when the config no longer matches what was saved."""
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(setup.abstract_state()))
  except ValueError as e:
    raise errors.ConfigError(
      f"{mngr.directory}/{step}: this checkpoint was written with another model or "
      f"optimizer config ({str(e).splitlines()[0]}); use a new --workdir, or the "
      "config it was trained with"
    ) from None


def load_params(setup: steps.Setup, path: str) -> Any:
  """Sharded params from an .npz file (or a checkpoint name) or from a training workdir / Orbax
  checkpoint directory."""
  path = registry.resolve(path)
  if path.endswith(".npz"):
    host = checkpoint.load_pretrained(path, setup.model)
    return sharding.put_global(host, setup.param_shardings)
  nested = files.join(path, "checkpoints")
  root = nested if files.isdir(nested) else path
  mngr = ocp.CheckpointManager(
    os.path.abspath(root) if not files.is_remote(root) else root,
    options=ocp.CheckpointManagerOptions(read_only=True),
  )
  step = mngr.latest_step()
  if step is None:
    raise errors.MissingFileError(f"{path}: no .npz file and no Orbax checkpoint in it")
  return restore(mngr, step, setup).params


def host_params(setup: steps.Setup, params: Any) -> Any:
  """Params gathered to every host as numpy (a replicating jit works across hosts)."""
  rep = sharding.replicated(setup.mesh)
  gathered = jax.jit(lambda p: p, out_shardings=jax.tree_util.tree_map(lambda _: rep, params))(
    params
  )
  return jax.tree_util.tree_map(np.asarray, jax.device_get(gathered))
