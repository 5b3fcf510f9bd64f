"""Losses, and evaluation metrics accumulated over masked batches.

On device, each batch reduces to sums (loss, correct, per-class counts), so
padded examples count for nothing and no per-example array leaves the mesh.
Multi-label mAP needs every score: those are gathered per batch on the host.
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


@dataclasses.dataclass
class Accumulator:
  """Adds up batch sums (and multi-label scores) into the final metrics."""

  multilabel: bool
  sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  scores: list[np.ndarray] = dataclasses.field(default_factory=list)
  targets: list[np.ndarray] = dataclasses.field(default_factory=list)

  def add(self, sums: dict[str, Any], logits: Any = None, labels: Any = None, mask: Any = None):
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
    if self.multilabel:
      tp, fp, fn = s["tp"], s["fp"], s["fn"]
      precision = tp.sum() / max(tp.sum() + fp.sum(), 1)
      recall = tp.sum() / max(tp.sum() + fn.sum(), 1)
      out["f1@0.5"] = float(2 * precision * recall / max(precision + recall, 1e-12))
      if self.scores:
        out["mAP"] = mean_average_precision(
          np.concatenate(self.scores), np.concatenate(self.targets)
        )
      return out
    out["accuracy"] = float(s["correct"]) / max(count, 1)
    support, predicted, tp = s["support"], s["predicted"], s["true_positive"]
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(
      2 * precision * recall,
      precision + recall,
      out=np.zeros_like(tp),
      where=(precision + recall) > 0,
    )
    present = support > 0  # macro averages over the classes that occur
    out |= {
      "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
      "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
      "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
      "per_class_accuracy": [float(r) for r in recall],
    }
    return out


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
  """Mean over classes with positives of the average precision (area under the PR steps)."""
  aps = []
  for c in range(scores.shape[1]):
    y = targets[:, c] > 0.5
    if not y.any():
      continue
    order = np.argsort(-scores[:, c], kind="stable")
    hits = y[order]
    precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    aps.append(precision_at_hit.mean())
  return float(np.mean(aps)) if aps else 0.0
