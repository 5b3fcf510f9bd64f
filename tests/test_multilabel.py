"""Multi-label training end to end: a list of tagged images, a sigmoid head, mAP, and inference."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

import data_fixtures as df
from vit_jax import configs
from vit_jax import split_predictions
from vit_jax import metrics
from vit_jax import train

NAMES = ["blue", "green", "red", "warm"]  # sorted, as the list reader orders them


def _tags(label: int) -> list[str]:
  """Class images have channel `label` bright; red and green ones are also 'warm'."""
  colour = df.CLASS_COLOURS[label]
  return [colour] + (["warm"] if colour in ("red", "green") else [])


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
  root = tmp_path_factory.mktemp("tagged")
  rows = ["path,labels,split"]
  for i in range(96):
    label, split = i % 3, ("train" if i < 60 else "val" if i < 78 else "test")
    df.write_file(os.path.join(root, "img", f"{i}.png"), df.encode(df.class_image(label, i, 16, 16)))
    rows.append(f"img/{i}.png,{';'.join(_tags(label))},{split}")
  (root / "list.csv").write_text("\n".join(rows) + "\n")
  return str(root / "list.csv")


def _config(list_file):
  c = configs.base()
  c.dataset, c.multilabel_file = "multilabel", list_file
  c.image_size = 16
  c.model.name = None
  c.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, patch_size=8))
  c.augment.update(dict(inception_crop=False, hflip=False))
  c.batch_size, c.eval_batch_size = 16, 16
  c.base_lr, c.warmup_steps, c.total_steps = 0.1, 5, 80
  c.shuffle_buffer = 128
  c.log_every, c.eval_every, c.checkpoint_every = 20, 40, 40
  c.async_checkpointing = False
  c.best_metric = "mAP"
  return c


@pytest.mark.slow
def test_multilabel_training_learns_the_tags_and_infers_them(tagged, tmp_path):
  config = _config(tagged)
  work = str(tmp_path / "run")
  result = train.train_and_evaluate(config, work)
  # Sigmoid head: multi-label metrics, no single-label accuracy.
  assert {"mAP", "f1@0.5", "loss"} <= set(result["eval"]) and "accuracy" not in result["eval"]
  # Chance mAP (random scores) is the tags' mean frequency, about 0.42 here: the colours are
  # one linear read of the patch means away, so a trained model ranks them far above that.
  assert result["eval"]["mAP"] > 0.9, result["eval"]
  assert (tmp_path / "run" / "labels.txt").read_text().split() == NAMES

  out = split_predictions.predict_dataset(config, os.path.join(work, "final.npz"), str(tmp_path / "test.npz"),
                              split="test")
  assert out["logits"].shape == (18, 4) and "top_k" not in out  # no arg-max for tags
  assert out["labels"].shape == (18, 4) and list(out["class_names"]) == NAMES
  want = np.array([[n in _tags(i % 3) for n in NAMES] for i in range(78, 96)], np.float32)
  order = np.lexsort(out["labels"].T[::-1])  # rows in any order: compare as sorted multisets
  np.testing.assert_array_equal(out["labels"][order], want[np.lexsort(want.T[::-1])])
  predicted = (out["logits"] > 0).astype(np.float32)
  assert (predicted == out["labels"]).mean() > 0.9
  with np.load(tmp_path / "test.npz") as saved:
    np.testing.assert_array_equal(saved["logits"], out["logits"])


def test_label_smoothing_on_a_sigmoid_head():
  """Each tag's target moves towards 1/2: t (1 - a) + a / 2, then the summed binary cross-entropy."""
  logits = np.array([[2.0, -1.0, 0.5]], np.float32)
  tags = np.array([[1.0, 0.0, 1.0]], np.float32)
  a = 0.2
  t = tags * (1 - a) + a / 2
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  want = -(t * np.log(p) + (1 - t) * np.log(1 - p)).sum()
  got = metrics.loss_fn(jnp.asarray(logits), jnp.asarray(tags), sigmoid=True, label_smoothing=a)
  # Three float32 log-sigmoids (a few ulps each, values ~1) against float64: below 1e-6 relative.
  assert float(got[0]) == pytest.approx(want, rel=1e-6)
  plain = metrics.loss_fn(jnp.asarray(logits), jnp.asarray(tags), sigmoid=True)
  assert float(plain[0]) < float(got[0])  # smoothing costs confident right answers
