"""Losses, and evaluation metrics accumulated over masked batches.

On device, each batch reduces to sums (loss, correct, per-class counts), so
padded examples count for nothing and no per-example array leaves the mesh.
Multi-label mAP needs every score: those are gathered per batch to every host.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

LOSSES = ("softmax_xent", "sigmoid_xent")


def loss_fn(
  logits: jax.Array, labels: jax.Array, *, sigmoid: bool, label_smoothing: float = 0.0
) -> jax.Array:
  """Per-example loss: softmax cross-entropy, or a sigmoid one summed over the classes.

  Labels are class indices, or [N, C] targets: soft (mixup) for softmax, multi-hot for sigmoid.
  """
  logits = logits.astype(jnp.float32)
  if sigmoid:
    targets = (
      labels.astype(jnp.float32)
      if labels.ndim == logits.ndim
      else jax.nn.one_hot(labels, logits.shape[-1])
    )
    if label_smoothing:
      targets = targets * (1 - label_smoothing) + 0.5 * label_smoothing
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)
  # Soft targets [N, C] (e.g. from mixup) are used as they are.
  onehot = (
    labels.astype(jnp.float32)
    if labels.ndim == logits.ndim
    else jax.nn.one_hot(labels, logits.shape[-1])
  )
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return optax.softmax_cross_entropy(logits, onehot)


def batch_sums(
  logits: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  *,
  multilabel: bool,
  sigmoid: bool | None = None,
) -> dict[str, jax.Array]:
  """Sums over the valid examples of one batch; add them up across batches.

  The loss is the sigmoid one for multi-label data, unless `sigmoid` says otherwise.
  """
  mask_f = mask.astype(jnp.float32)
  loss = loss_fn(logits, labels, sigmoid=multilabel if sigmoid is None else sigmoid)
  out = {"loss_sum": jnp.sum(loss * mask_f), "count": jnp.sum(mask_f)}
  num_classes = logits.shape[-1]
  if multilabel:
    pred = (logits > 0).astype(jnp.float32)
    y = labels.astype(jnp.float32)
    m = mask_f[:, None]
    out |= {
      "tp": jnp.sum(pred * y * m, 0),
      "fp": jnp.sum(pred * (1 - y) * m, 0),
      "fn": jnp.sum((1 - pred) * y * m, 0),
    }
  else:
    pred = jnp.argmax(logits, -1)
    hit = (pred == labels) * mask_f
    out["correct"] = jnp.sum(hit)
    # Per-class vectors, not a confusion matrix: C x C would be 1.9 GB for ImageNet-21k.
    out["support"] = jnp.zeros((num_classes,), jnp.float32).at[labels].add(mask_f)
    out["predicted"] = jnp.zeros((num_classes,), jnp.float32).at[pred].add(mask_f)
    out["true_positive"] = jnp.zeros((num_classes,), jnp.float32).at[labels].add(hit)
  return out


def label_set_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Sums for a single-label model scored against sets of correct classes ([N, C] multi-hot, as
  ImageNet's ReaL labels): the top class is right when it is in the set; an image whose set is
  empty counts for nothing (the ReaL paper leaves them out, as big_vision's evaluator does).
  The loss is big_vision's softmax cross-entropy against the set, -sum(labels * log p)."""
  y = labels.astype(jnp.float32)
  valid = mask.astype(jnp.float32) * (y.max(-1) > 0)
  pred = jnp.argmax(logits, -1)
  hit = jnp.take_along_axis(y, pred[:, None], axis=-1)[:, 0]
  loss = -jnp.sum(y * jax.nn.log_softmax(logits.astype(jnp.float32)), -1)
  return {
    "loss_sum": jnp.sum(loss * valid),
    "count": jnp.sum(valid),
    "correct": jnp.sum(hit * valid),
    "empty": jnp.sum(mask.astype(jnp.float32) * (y.max(-1) <= 0)),
  }


@dataclasses.dataclass
class Accumulator:
  """Adds up batch sums (and multi-label scores) into the final metrics.

  Definitions, each equal to scikit-learn's call on every example of the split:
  - `accuracy`: `accuracy_score(y, argmax)`;
  - `macro_precision`, `macro_recall`, `macro_f1`: `precision_recall_fscore_support(y,
    argmax, average="macro")`, over the classes that occur in the labels or the
    predictions, 0 where a ratio is undefined (sklearn's `zero_division` default);
  - `per_class_accuracy`: each class's recall, `recall_score(y, argmax, average=None,
    labels=range(C))`, and None (not 0) for a class with no example;
  - multi-label `mAP`: `average_precision_score(Y, scores, average="macro")`. Tied
    scores form one threshold, so the result does not depend on row order; a class
    with no positive example counts as 0, as sklearn counts it, and how many there are
    is reported as `classes_without_positives`;
  - multi-label `f1@0.5`: `f1_score(Y, scores > 0, average="micro")`, a logit above 0
    being a probability above 0.5;
  - `loss`: the mean of the training loss per example (without label smoothing).
  Scores reach the accumulator whole, from every host (`evaluation.run_eval` gathers
  them), so every host computes the same numbers.
  """

  multilabel: bool
  sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  scores: list[np.ndarray] = dataclasses.field(default_factory=list)
  targets: list[np.ndarray] = dataclasses.field(default_factory=list)

  def add(self, sums: dict[str, Any], logits: Any = None, labels: Any = None, mask: Any = None):
    """One batch: its device sums, and for multi-label data all its rows (every host's)."""
    for k, v in jax.device_get(sums).items():
      self.sums[k] = self.sums.get(k, 0) + np.asarray(v, np.float64)
    if self.multilabel and logits is not None:
      keep = np.asarray(mask, bool)
      self.scores.append(np.asarray(logits, np.float32)[keep])
      self.targets.append(np.asarray(labels, np.float32)[keep])

  def result(self) -> dict[str, Any]:
    s = self.sums
    count = float(s.get("count", 0))
    out: dict[str, Any] = {"loss": float(s["loss_sum"]) / max(count, 1), "count": int(count)}
    if "empty" in s:  # sets of correct classes (label_set_sums)
      return out | {"accuracy": float(s["correct"]) / max(count, 1), "left_out": int(s["empty"])}
    if self.multilabel:
      tp, fp, fn = s["tp"].sum(), s["fp"].sum(), s["fn"].sum()
      out["f1@0.5"] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0
      if self.scores:
        scores, targets = np.concatenate(self.scores), np.concatenate(self.targets)
        out["mAP"] = mean_average_precision(scores, targets)
        out["classes_without_positives"] = int((targets.max(0) <= 0.5).sum())
      return out
    out["accuracy"] = float(s["correct"]) / max(count, 1)
    support, predicted, tp = s["support"], s["predicted"], s["true_positive"]
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    # 2 tp / (2 tp + fp + fn): sklearn's F-score, defined wherever the class occurs.
    denominator = support + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    present = (support > 0) | (predicted > 0)  # sklearn's labels: those in y_true or y_pred
    macro = lambda v: float(v[present].mean()) if present.any() else 0.0
    out |= {
      "macro_precision": macro(precision),
      "macro_recall": macro(recall),
      "macro_f1": macro(f1),
      "per_class_accuracy": [
        float(r) if n > 0 else None for r, n in zip(recall, support, strict=True)
      ],
    }
    return out


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
  """Area under the precision-recall steps, one step per distinct score: sum over thresholds
  of (recall gained) x precision, as sklearn's `average_precision_score`. 0 without positives."""
  y = targets > 0.5
  if not y.any():
    return 0.0
  order = np.argsort(-scores, kind="stable")
  s, hit = scores[order], y[order]
  # The last row of each run of equal scores: every tied row is inside the threshold at once.
  ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
  tp = np.cumsum(hit)[ends]
  precision = tp / (ends + 1)
  recall = tp / tp[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
  """The mean over classes of `average_precision` (a class without positives counts 0)."""
  aps = [average_precision(targets[:, c], scores[:, c]) for c in range(scores.shape[1])]
  return float(np.mean(aps)) if aps else 0.0
