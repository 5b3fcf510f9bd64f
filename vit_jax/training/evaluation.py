"""A split's metrics: what training, `vit-jax eval`, few-shot and the demo share.

`run_eval` computes a split's metrics from params already in the Setup's shardings;
`evaluate` does it for a checkpoint named by a path (`state.load_params`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from vit_jax.data import pipeline
from vit_jax.training import metrics
from vit_jax.training import sharding
from vit_jax.training import state
from vit_jax.training import steps


def run_eval(
  setup: steps.Setup, data: pipeline.Pipeline, params: Any, split: str, eval_step=None
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
  setup, data = state.prepare(config, mesh)
  return run_eval(setup, data, state.load_params(setup, checkpoint_path), split)
