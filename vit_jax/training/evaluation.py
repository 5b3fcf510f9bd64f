"""A config's model, data and params, and their metrics: what training, `vit-jax eval`,
dataset predictions and the demo share.

`prepare` makes the run's Setup and its input Pipeline, each once; `load_params`
reads an original-layout `.npz` or an Orbax training checkpoint into the
Setup's shardings; `run_eval` computes a split's metrics.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vit_jax import data as input_pipeline
from vit_jax import errors
from vit_jax.platform import files
from vit_jax.training import metrics
from vit_jax.training import sharding
from vit_jax.training import steps
from vit_jax.weights import checkpoint
from vit_jax.weights import registry


def prepare(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> tuple[steps.Setup, input_pipeline.Pipeline]:
  """The Setup (model, mesh, shardings, steps) and the input Pipeline for `config`."""
  data = input_pipeline.Pipeline(config)
  mesh = mesh or sharding.make_mesh(config.mesh.to_dict())
  return steps.Setup(config, data.info.num_classes, data.info.multilabel, mesh), data


def run_eval(
  setup: steps.Setup, data: input_pipeline.Pipeline, params: Any, split: str, eval_step=None
) -> dict[str, Any]:
  """Metrics over every example of `split` exactly once (padded batches, masked)."""
  eval_step = eval_step or setup.jit_eval_step()
  acc = metrics.Accumulator(multilabel=setup.multilabel)
  for batch in data.eval_iterator(split, setup.batch_sharding):
    sums, logits = eval_step(params, batch)
    if setup.multilabel:
      # Every host's rows, on every host: mAP ranks all the split's scores at once.
      acc.add(sums, *(sharding.all_rows(x) for x in (logits, batch["label"], batch["mask"])))
    else:
      acc.add(sums)
  return acc.result()


def evaluate(
  config: ml_collections.ConfigDict,
  checkpoint_path: str,
  split: str = "eval",
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
  """Metrics of a checkpoint (an original-layout .npz, or an Orbax checkpoint dir) on a split."""
  setup, data = prepare(config, mesh)
  return run_eval(setup, data, load_params(setup, checkpoint_path), split)


def host_params(setup: steps.Setup, params: Any) -> Any:
  """Params gathered to every host as numpy (a replicating jit works across hosts)."""
  rep = sharding.replicated(setup.mesh)
  gathered = jax.jit(lambda p: p, out_shardings=jax.tree_util.tree_map(lambda _: rep, params))(
    params
  )
  return jax.tree_util.tree_map(np.asarray, jax.device_get(gathered))


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
