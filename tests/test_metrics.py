"""Evaluation metrics over masked batches, checked against scikit-learn."""

import json
import os
import sys
import warnings

import ckpt_fixtures
import data_fixtures as df
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


def _single(logits, labels, batch=16):
  acc = metrics.Accumulator(multilabel=False)
  for lg, lb, m in _batches(logits, labels, batch):
    acc.add(metrics.batch_sums(jnp.asarray(lg), jnp.asarray(lb), jnp.asarray(m), multilabel=False))
  return acc.result()


def _multi(logits, targets, batch=8):
  acc = metrics.Accumulator(multilabel=True)
  for lg, lb, m in _batches(logits, targets, batch):
    sums = metrics.batch_sums(jnp.asarray(lg), jnp.asarray(lb), jnp.asarray(m), multilabel=True)
    acc.add(sums, lg, lb, m)
  return acc.result()


@pytest.mark.slow
def test_single_label_metrics_are_sklearns():
  rng = np.random.default_rng(0)
  n, c = 103, 8
  labels = rng.integers(0, c - 2, n)  # classes 6 and 7 never occur...
  logits = rng.normal(size=(n, c)).astype(np.float32) + 2.0 * np.eye(c)[labels] * (
    rng.uniform(size=(n, 1)) > 0.4
  )
  logits[:3, 6] = 10.0  # ...but 6 is predicted three times: sklearn's macro counts it
  r = _single(logits, labels)
  pred = logits.argmax(-1)
  assert r["count"] == n
  # Ratios of integer counts, in float64 on both sides: equal up to float64 rounding.
  assert r["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
  p, rec, f1, _ = skm.precision_recall_fscore_support(labels, pred, average="macro")
  assert (r["macro_precision"], r["macro_recall"], r["macro_f1"]) == pytest.approx((p, rec, f1))
  per_class = skm.recall_score(labels, pred, labels=list(range(c)), average=None)
  assert r["per_class_accuracy"][6:] == [None, None]  # absent, not 0.0
  np.testing.assert_allclose(r["per_class_accuracy"][:6], per_class[:6])
  ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels))
  # 103 positive float32 terms summed in another order (per batch, then in float64) than
  # optax's mean: the sums differ by at most 103 * u = 6e-6 relative, the terms by a few ulps
  # (measured 1.3e-8).
  assert r["loss"] == pytest.approx(float(ce.mean()), rel=1e-5)


@pytest.mark.slow
def test_multilabel_metrics_are_sklearns():
  rng = np.random.default_rng(1)
  n, c = 61, 5
  targets = (rng.uniform(size=(n, c)) < 0.3).astype(np.float32)
  targets[:, 4] = 0  # a class with no positives: sklearn counts its AP as 0
  logits = (rng.normal(size=(n, c)) + 1.5 * (targets - 0.5)).astype(np.float32)
  r = _multi(logits, targets)
  assert r["count"] == n and r["classes_without_positives"] == 1
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns of the class without positives
    want_map = skm.average_precision_score(targets, logits, average="macro")
  # mAP and F1: float64 from the same scores and counts on both sides (measured 1.1e-16).
  assert r["mAP"] == pytest.approx(want_map, rel=1e-9)
  assert r["f1@0.5"] == pytest.approx(skm.f1_score(targets, logits > 0, average="micro"))
  bce = optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(targets)).sum(-1).mean()
  # Positive float32 terms in other orders: ours 40 per batch (batches added in float64),
  # optax's 5 then 61: at most (39 + 4 + 60) * u = 6e-6 relative (measured 3.8e-8).
  assert r["loss"] == pytest.approx(float(bce), rel=1e-5)


@pytest.mark.slow
def test_tied_scores_are_one_threshold_whatever_the_row_order():
  # All scores equal, one positive in four: sklearn's AP is 0.25 (one threshold holding all).
  assert metrics.average_precision(np.array([1.0, 0, 0, 0]), np.zeros(4)) == pytest.approx(0.25)
  # bf16-rounded logits, as the pre-training recipe computes them: many ties per class.
  rng = np.random.default_rng(2)
  n, c = 2000, 20
  targets = (rng.uniform(size=(n, c)) < 0.2).astype(np.float32)
  logits = rng.normal(size=(n, c)) + targets
  logits = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  assert len(np.unique(logits[:, 0])) < n / 2  # ties indeed: 985 distinct scores of 2000
  want = skm.average_precision_score(targets, logits, average="macro")
  for seed in range(3):  # the same on any row order
    order = np.random.default_rng(seed).permutation(n)
    assert _multi(logits[order], targets[order], batch=64)["mAP"] == pytest.approx(want, rel=1e-9)


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


EVAL_HOSTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "eval_hosts.py")


def _two_hosts(kind, data, ckpt, out, run_on_free_port):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  runs = run_on_free_port(
    lambda port: [
      [
        sys.executable,
        EVAL_HOSTS,
        kind,
        data,
        ckpt,
        str(out),
        "--processes",
        "2",
        "--process-id",
        str(i),
        "--coordinator",
        f"127.0.0.1:{port}",
      ]
      for i in range(2)
    ],
    env=env,
    timeout=600,
  )
  hosts = [json.loads(stdout.strip().splitlines()[-1])["metrics"] for stdout, _ in runs]
  rows = [dict(np.load(p)) for p in (out, str(out).replace(".npz", ".host1.npz"))]
  logits = np.concatenate([r["logits"] for r in rows])
  labels = np.concatenate([r["labels"] for r in rows])
  return hosts, logits, labels


@pytest.mark.slow
def test_every_host_reports_sklearns_metrics_over_the_whole_split(tmp_path, run_on_free_port):
  """Two processes evaluate one split of 37 images (uneven shares, padded batches, a class absent);
  each must report scikit-learn's metrics over all 37, not over its own rows."""
  ckpt = str(tmp_path / "model.npz")
  spec = ckpt_fixtures.Spec(hidden=32, mlp=64, heads=2, layers=1, patch=8, image_size=16, classes=4)
  ckpt_fixtures.write_original(ckpt, spec, seed=3)
  # Single label: an image folder whose val split lacks class d.
  df.write_folder(
    str(tmp_path / "f"),
    {"train": {k: 2 for k in "abcd"}, "val": {"a": 13, "b": 11, "c": 13}},
    size=(16, 16),
  )
  hosts, logits, labels = _two_hosts(
    "folder", str(tmp_path / "f"), ckpt, tmp_path / "single.npz", run_on_free_port
  )
  assert len(labels) == 37
  pred = logits.argmax(-1)
  p, r, f1, _ = skm.precision_recall_fscore_support(labels, pred, average="macro", zero_division=0)
  ce = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
  for host in hosts:
    assert host["count"] == 37
    assert host["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert (host["macro_precision"], host["macro_recall"], host["macro_f1"]) == pytest.approx(
      (p, r, f1)
    )
    assert host["per_class_accuracy"][3] is None
    # float32 terms summed per batch and per host in another order: 37 u = 2.2e-6 relative.
    assert host["loss"] == pytest.approx(ce, rel=1e-5)
  # Multi-label: tag 'blue' never occurs in the eval rows.
  rows = ["path,labels,split"]
  for i in range(45):
    split, tags = ("train", "blue;warm") if i < 8 else ("val", ["red", "green;warm", "warm"][i % 3])
    df.write_file(str(tmp_path / "m" / f"{i}.png"), df.encode(df.class_image(i % 3, i, 16, 16)))
    rows.append(f"{i}.png,{tags},{split}")
  (tmp_path / "m" / "list.csv").write_text("\n".join(rows) + "\n")
  hosts, logits, targets = _two_hosts(
    "multilabel", str(tmp_path / "m" / "list.csv"), ckpt, tmp_path / "multi.npz", run_on_free_port
  )
  assert len(targets) == 37
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns of the tag without positives
    want_map = skm.average_precision_score(targets, logits, average="macro")
  for host in hosts:
    assert host["count"] == 37 and host["classes_without_positives"] == 1
    # Both from the same float32 scores, in float64: equal to float64 rounding.
    assert host["mAP"] == pytest.approx(want_map, rel=1e-9)
    assert host["f1@0.5"] == pytest.approx(skm.f1_score(targets, logits > 0, average="micro"))
