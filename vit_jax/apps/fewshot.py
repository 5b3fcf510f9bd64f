"""The paper's few-shot linear evaluation (section 4.1), what `vit-jax fewshot` runs.

On frozen representations (what the head sees), a regularised least-squares
regression from k images per class to {-1, 1} targets; the test images are
classified by the arg-max. The features are whitened by the support set's mean
and deviation, and a constant column of 100 stands in for the intercept: it is
regularised too, but so lightly that the bias is in effect free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vit_jax import errors
from vit_jax.data import sources
from vit_jax.models import spec as spec_lib
from vit_jax.training import sharding
from vit_jax.training import state
from vit_jax.weights import checkpoint
from vit_jax.weights import registry

BIAS_FEATURE = 100.0
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2 = 1024.0  # 2^10, big_vision's few-shot l2_reg


@dataclasses.dataclass
class Features:
  """Representations of a whole split, every example once, in the split's order."""

  x: np.ndarray  # [N, D] float32
  labels: np.ndarray  # [N] int
  index: np.ndarray  # [N] each row's example index in the split


def extract(setup: Any, data: Any, params: Any, split: str) -> Features:
  """The representation the head sees, for every example of `split`, gathered on every host."""
  model = setup.model
  rep = sharding.replicated(setup.mesh)

  def fn(p, batch):
    x = model.apply({"params": p}, batch["image"], train=False, return_embedding=True)
    return x, batch["label"], batch["mask"], batch["index"]

  # A replicated output all-gathers: every host solves the regressions on all the features.
  run = jax.jit(fn, in_shardings=(setup.param_shardings, setup.batch_sharding), out_shardings=rep)
  xs, labels, index = [], [], []
  for batch in data.eval_iterator(split, setup.batch_sharding, with_index=True):
    x, y, mask, idx = jax.device_get(run(params, batch))
    keep = np.asarray(mask).astype(bool)
    xs.append(np.asarray(x, np.float32)[keep])
    labels.append(np.asarray(y)[keep])
    index.append(np.asarray(idx)[keep])
  if not xs:
    raise errors.ConfigError(f"split {split!r} has no examples")
  return Features(np.concatenate(xs), np.concatenate(labels), np.concatenate(index))


def support_indices(
  labels: np.ndarray, num_classes: int, shots: int, seed: int, split: str = "train"
) -> np.ndarray:
  """Row indices of `shots` examples of each class, drawn with `seed`; one-line error when a class
  has fewer.
  """
  rng = np.random.default_rng(seed)
  rows = []
  for c in range(num_classes):
    have = np.flatnonzero(labels == c)
    if len(have) < shots:
      raise errors.ConfigError(
        f"{shots} shots: class {c} has only {len(have)} example(s) in the {split} split"
      )
    rows.append(rng.permutation(have)[:shots])
  return np.concatenate(rows)


def whiten(support: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Features standardised by the support set's mean and deviation, plus the bias column."""
  support = np.asarray(support, np.float64)
  mean, std = support.mean(axis=0), support.std(axis=0) + 1e-5
  return [
    np.pad((np.asarray(x, np.float64) - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)
    for x in (support, *others)
  ]


def solve(x: np.ndarray, targets: np.ndarray, l2: float) -> np.ndarray:
  """argmin_w |x w - targets|^2 + l2 |w|^2, in float64; the N x N form when N < D (few shots)."""
  n, d = x.shape
  if n >= d:
    return np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ targets)
  return x.T @ np.linalg.solve(x @ x.T + l2 * np.eye(n), targets)


def accuracy(
  train: Features, test: Features, num_classes: int, shots: int, seed: int, l2: float = DEFAULT_L2
) -> float:
  """Test accuracy of the regression fit on `shots` training examples per class."""
  rows = support_indices(train.labels, num_classes, shots, seed)
  x, x_test = whiten(train.x[rows], test.x)
  targets = 2.0 * np.eye(num_classes)[train.labels[rows]] - 1.0
  w = solve(x, targets, l2)
  return float(np.mean(np.argmax(x_test @ w, axis=1) == test.labels))


def _with_model(
  config: ml_collections.ConfigDict, found: spec_lib.ModelSpec
) -> ml_collections.ConfigDict:
  """A copy of `config` whose model fields are those of a checkpoint (its pre_logits included)."""
  config = config.copy_and_resolve_references()
  config.model.name = None
  for key in (
    "hidden_size",
    "mlp_dim",
    "num_heads",
    "num_layers",
    "patch_size",
    "representation_size",
    "classifier",
  ):
    config.model[key] = getattr(found, key)
  return config


def eval_split(info: Any) -> str:
  """The split the paper evaluates on: 'test', or 'eval' for a dataset without one."""
  return "test" if info.num_examples.get("test") else "eval"


def evaluate(
  config: ml_collections.ConfigDict,
  checkpoint_path: str,
  *,
  shots: Sequence[int] = DEFAULT_SHOTS,
  seeds: int = 3,
  l2: float = DEFAULT_L2,
) -> dict[str, Any]:
  """Few-shot accuracy (mean and std over seeds, per shot count) of a checkpoint on the config's
  data.
  """
  if not shots or min(shots) < 1 or seeds < 1 or l2 <= 0:
    raise errors.ConfigError(
      f"shots must be at least 1 (got {list(shots)}), seeds at least 1 (got "
      f"{seeds}) and l2 positive (got {l2})"
    )
  checkpoint_path = registry.resolve(checkpoint_path)
  tree = None
  if checkpoint_path.endswith(".npz"):
    # The model is read off the file, as `predict` does; the config gives the data.
    tree = checkpoint.load(checkpoint_path)
    config = _with_model(config, spec_lib.ModelSpec.from_params(tree, checkpoint_path))
  setup, data = state.prepare(config)
  info = data.info
  if info.multilabel:
    raise errors.ConfigError(
      "few-shot evaluation needs one label per image; this dataset is multi-label"
    )
  test_split = eval_split(info)
  # The support sets come from 'train': the same split string would put them in the test set.

  train_spec, test_spec = (
    sources.split_spec(data.source, config, s) for s in ("train", test_split)
  )
  if train_spec == test_spec:
    raise errors.ConfigError(
      f"the train and {test_split} splits are both {train_spec!r}: support sets "
      "would overlap the test examples"
    )
  if tree is None:
    params = state.load_params(setup, checkpoint_path)
  else:  # the head, sized for other classes, is reset and never used
    params = sharding.put_global(
      checkpoint.load_pretrained(tree, setup.model, source=checkpoint_path), setup.param_shardings
    )
  train = extract(setup, data, params, "train")
  support_indices(train.labels, info.num_classes, max(shots), 0)  # a class too small: say so now
  test = extract(setup, data, params, test_split)
  result = {}
  for k in sorted(set(shots)):
    accs = [accuracy(train, test, info.num_classes, k, seed, l2) for seed in range(seeds)]
    result[str(k)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "seeds": accs}
  return {
    "shots": result,
    "num_classes": info.num_classes,
    "eval_examples": len(test.labels),
    "split": test_split,
    "l2": l2,
  }


def table(result: dict[str, Any]) -> str:
  """One row per shot count: mean and std of the accuracy over the seeds."""
  lines = [
    f"few-shot linear accuracy, {result['num_classes']} classes, "
    f"{result['eval_examples']} {result['split']} images, l2 {result['l2']:g}",
    f"{'shots':>6}  {'mean':>7}  {'std':>6}",
  ]
  for k, v in result["shots"].items():
    lines.append(f"{k:>6}  {v['mean']:7.2%}  {v['std']:6.2%}")
  return "\n".join(lines)
