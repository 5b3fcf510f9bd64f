"""A split's metrics: what training, `vit-jax eval`, few-shot and the demo share.

`run_eval` computes a split's metrics from params already in the Setup's shardings;
`evaluate` does it for a checkpoint named by a path (`state.load_params`). A run may
evaluate several sets (`config.evals`, `eval_sets`), each logged under its own name:
other splits, other datasets with the same classes, or sets of correct classes per image
(ImageNet's ReaL labels) for a single-label model.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from vit_jax import errors
from vit_jax.data import pipeline
from vit_jax.data import sources
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


# The metrics each kind of labels gives (metrics.Accumulator), for a one-line error up front.
METRICS = {
  "single": ("loss", "accuracy", "macro_precision", "macro_recall", "macro_f1"),
  "multilabel": ("loss", "f1@0.5", "mAP"),
  "sets": ("loss", "accuracy"),
}


@dataclasses.dataclass
class EvalSet:
  """One evaluation set of a run: its name in the logs, its data and split, and its step."""

  name: str
  data: pipeline.Pipeline
  split: str
  step: Callable
  labels: str  # single, multilabel or sets (steps.Setup.eval_step_fn)


def eval_sets(
  config: ml_collections.ConfigDict, setup: steps.Setup, data: pipeline.Pipeline
) -> list[EvalSet]:
  """The run's eval split as `eval`, then each of `config.evals`."""
  own = "multilabel" if setup.multilabel else "single"
  sets = [EvalSet("eval", data, "eval", setup.jit_eval_step(), own)]
  for item in config.evals or ():
    if not isinstance(item, (tuple, list)) or len(item) != 4:
      raise errors.ConfigError(
        f"config.evals: {item!r} is not a (name, dataset, split, label_key) tuple"
      )
    name, dataset, split, label_key = item
    if not isinstance(name, str) or not name or "/" in name or name in ("eval", "test", "train"):
      raise errors.ConfigError(
        f"config.evals: {name!r} is not a usable name (eval, test and train are taken; no '/')"
      )
    if name in {s.name for s in sets}:
      raise errors.ConfigError(f"config.evals: the name {name!r} is used twice")
    c = copy.deepcopy(config)
    if dataset is not None:
      c.dataset = dataset
    if label_key is not None:
      c.tfds_label_key = label_key
    if split is None:  # the dataset's own eval split, preset or configured
      probe = pipeline.Pipeline(c)
      split = sources.split_spec(probe.source, probe.config, "eval")
    c.train_split = c.eval_split = c.test_split = split
    pipe = pipeline.Pipeline(c)
    info = pipe.info
    if info.num_classes != setup.num_classes:
      raise errors.ConfigError(
        f"config.evals {name!r}: {c.dataset} has {info.num_classes} classes, the model "
        f"{setup.num_classes}"
      )
    labels = "single" if not info.multilabel else ("multilabel" if setup.multilabel else "sets")
    sets.append(EvalSet(name, pipe, split, setup.jit_eval_step(labels), labels))
  return sets


def parse_metric(best_metric: str, sets: list[EvalSet]) -> tuple[str, str]:
  """(set name, metric) of `best_metric`: `metric` (of `eval`) or `NAME/metric`."""
  name, _, metric = best_metric.rpartition("/")
  name = name or "eval"
  found = next((s for s in sets if s.name == name), None)
  if found is None:
    raise errors.ConfigError(
      f"config.best_metric {best_metric!r}: no evaluation set {name!r} "
      f"(sets: {', '.join(s.name for s in sets)})"
    )
  if metric not in METRICS[found.labels]:
    raise errors.ConfigError(
      f"config.best_metric {best_metric!r}: {name} gives {', '.join(METRICS[found.labels])}"
    )
  return name, metric
