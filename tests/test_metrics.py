"""Evaluation metrics over masked batches, checked against scikit-learn."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

from vit_jax.training import metrics


def _batches(logits, labels, batch):
  """Split into fixed-size batches; the last one padded with garbage and masked out."""
  n = len(logits)
  for start in range(0, n, batch):
    lg, lb = logits[start : start + batch], labels[start : start + batch]
    pad = batch - len(lg)
    mask = np.r_[np.ones(len(lg), bool), np.zeros(pad, bool)]
    yield (
      np.concatenate([lg, np.full((pad, *lg.shape[1:]), 9.0, np.float32)]),
      np.concatenate([lb, np.ones((pad, *lb.shape[1:]), lb.dtype)]),
      mask,
    )


def test_single_label_metrics_match_sklearn():
  rng = np.random.default_rng(0)
  n, c = 103, 7
  labels = rng.integers(0, c - 1, n)  # the last class never occurs
  logits = rng.normal(size=(n, c)).astype(np.float32) + 2.0 * np.eye(c)[labels] * (
    rng.uniform(size=(n, 1)) > 0.4
  )
  acc = metrics.Accumulator(multilabel=False)
  for lg, lb, m in _batches(logits, labels, 16):
    acc.add(metrics.batch_sums(jnp.asarray(lg), jnp.asarray(lb), jnp.asarray(m), multilabel=False))
  r = acc.result()
  pred = logits.argmax(-1)
  present = sorted(set(labels))
  assert r["count"] == n
  # Ratios of integer counts, in float64 on both sides: equal up to float64 rounding.
  assert r["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
  assert r["macro_precision"] == pytest.approx(
    skm.precision_score(labels, pred, labels=present, average="macro", zero_division=0)
  )
  assert r["macro_recall"] == pytest.approx(
    skm.recall_score(labels, pred, labels=present, average="macro")
  )
  assert r["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, labels=present, average="macro"))
  np.testing.assert_allclose(
    r["per_class_accuracy"][: c - 1],
    skm.recall_score(labels, pred, labels=list(range(c - 1)), average=None),
  )
  ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels))
  # 103 positive float32 terms summed in another order (per batch, then in float64) than
  # optax's mean: the sums differ by at most 103 * u = 6e-6 relative, the terms by a few ulps
  # (measured 1.3e-8).
  assert r["loss"] == pytest.approx(float(ce.mean()), rel=1e-5)


def test_multilabel_metrics_match_sklearn():
  rng = np.random.default_rng(1)
  n, c = 61, 5
  targets = (rng.uniform(size=(n, c)) < 0.3).astype(np.float32)
  targets[:, 4] = 0  # a class with no positives is left out of mAP
  logits = (rng.normal(size=(n, c)) + 1.5 * (targets - 0.5)).astype(np.float32)
  acc = metrics.Accumulator(multilabel=True)
  for lg, lb, m in _batches(logits, targets, 8):
    sums = metrics.batch_sums(jnp.asarray(lg), jnp.asarray(lb), jnp.asarray(m), multilabel=True)
    acc.add(sums, lg, lb, m)
  r = acc.result()
  assert r["count"] == n
  ap = [skm.average_precision_score(targets[:, j], logits[:, j]) for j in range(4)]
  # mAP and F1: float64 from the same scores and counts on both sides (measured 1.1e-16).
  assert r["mAP"] == pytest.approx(np.mean(ap), rel=1e-6)
  assert r["f1@0.5"] == pytest.approx(skm.f1_score(targets, logits > 0, average="micro"))
  bce = optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(targets)).sum(-1).mean()
  # Positive float32 terms in other orders: ours 40 per batch (batches added in float64),
  # optax's 5 then 61: at most (39 + 4 + 60) * u = 6e-6 relative (measured 3.8e-8).
  assert r["loss"] == pytest.approx(float(bce), rel=1e-5)


def test_label_smoothing_and_soft_targets():
  logits = jnp.asarray([[2.0, 0.0, -1.0]])
  hard = metrics.loss_fn(logits, jnp.asarray([0]), sigmoid=False)
  smooth = metrics.loss_fn(logits, jnp.asarray([0]), sigmoid=False, label_smoothing=0.3)
  logp = jax_log_softmax(np.asarray(logits[0]))
  # A 3-logit log-softmax in float32 by XLA and by numpy, each with its own exp and log: each
  # side within ~3 u of the true value (exps, a 3-term sum ~1.2, log), so they differ by at
  # most ~4e-7, 2.3e-6 of the smallest value, |log p0| = 0.17 (measured 1 ulp, 8.8e-8).
  assert float(hard[0]) == pytest.approx(-logp[0], rel=3e-6)
  want = -(0.8 * logp[0] + 0.1 * logp[1] + 0.1 * logp[2])
  assert float(smooth[0]) == pytest.approx(want, rel=3e-6)
  soft = metrics.loss_fn(logits, jnp.asarray([[0.25, 0.75, 0.0]]), sigmoid=False)
  assert float(soft[0]) == pytest.approx(-(0.25 * logp[0] + 0.75 * logp[1]), rel=3e-6)


def jax_log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())
