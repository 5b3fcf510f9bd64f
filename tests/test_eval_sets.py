"""Several evaluation sets in one run, ImageNet-v2 and ReaL among them, on local TFDS builds of
each dataset's own format (tests/data_fixtures.py)."""

import json
import os

import data_fixtures as df
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.config import schema
from vit_jax.training import evaluation
from vit_jax.training import state
from vit_jax.training import train

pytestmark = pytest.mark.slow  # TFDS builds and a training run


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return data_dir, df.build_imagenet_eval_sets(data_dir)


def _config(data_dir, **kw):
  c = schema.base()
  c.dataset, c.tfds_data_dir = "imagenet_v2", data_dir
  c.train_split, c.eval_split, c.test_split = "test", "test[:50%]", "test[50%:]"
  c.image_size = 32
  c.model.name = None
  c.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, patch_size=8))
  c.augment.update(dict(inception_crop=False, hflip=0.0))
  c.batch_size, c.eval_batch_size = 8, 8
  c.shuffle_buffer = 16
  c.evals = (
    ("v2", None, "test", None),
    ("real", "imagenet2012_real", "validation", "real_label"),
  )
  for k, v in kw.items():
    c[k] = v
  return c


def test_real_and_v2_are_scored_as_their_papers_say(imagenet):
  """A model that always answers class c: v2 accuracy is the share of images labelled c; ReaL
  accuracy the share of non-empty label sets holding c, the empty ones left out."""
  data_dir, labels = imagenet
  config = _config(data_dir)
  setup, data = state.prepare(config)
  sets = {s.name: s for s in evaluation.eval_sets(config, setup, data)}
  assert [sets[n].labels for n in ("eval", "v2", "real")] == ["single", "single", "sets"]
  c = 250
  params = setup.init_state(jax.random.PRNGKey(0)).params
  params["head"]["bias"] = jnp.zeros(1000).at[c].set(10.0)  # the kernel is zero: always c
  real = evaluation.run_eval(setup, sets["real"].data, params, "validation", sets["real"].step)
  non_empty = [s for s in labels["real"].values() if s]
  assert real["count"] == len(non_empty) and real["left_out"] == len(labels["real"]) - len(
    non_empty
  )
  assert real["accuracy"] == pytest.approx(sum(c in s for s in non_empty) / len(non_empty))
  v2 = evaluation.run_eval(setup, sets["v2"].data, params, "test", sets["v2"].step)
  assert v2["count"] == len(labels["v2"])
  assert v2["accuracy"] == pytest.approx(np.mean([y == c for y in labels["v2"].values()]))


def test_each_set_is_logged_under_its_name_and_best_metric_picks_one(imagenet, tmp_path):
  data_dir, _ = imagenet
  config = _config(
    data_dir,
    total_steps=4,
    warmup_steps=1,
    eval_every=2,
    checkpoint_every=4,
    log_every=2,
    best_metric="real/accuracy",
    async_checkpointing=False,
  )
  result = train.train_and_evaluate(config, str(tmp_path))
  assert {"eval", "v2", "real", "test"} <= set(result)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert sorted({r["split"] for r in rows}) == ["eval", "real", "test", "train", "v2"]
  best = json.loads((tmp_path / "best.json").read_text())
  assert best["metric"] == "real/accuracy"
  assert best["value"] in [r["accuracy"] for r in rows if r["split"] == "real"]
  assert os.path.exists(tmp_path / "best.npz")


@pytest.mark.parametrize(
  "evals,best,message",
  [
    ((("eval", None, "test", None),), "loss", "'eval' is not a usable name"),
    ((("a", None, "test", None), ("a", None, "test", None)), "loss", "the name 'a' is used twice"),
    ((("a", None, "test"),), "loss", "is not a \\(name, dataset, split, label_key\\) tuple"),
    ((("a", None, "test", None),), "b/accuracy", "no evaluation set 'b'"),
    (
      (("real", "imagenet2012_real", "validation", "real_label"),),
      "real/macro_f1",
      "real gives loss, accuracy",
    ),
  ],
)
def test_bad_evaluation_sets_are_one_line_errors(imagenet, evals, best, message):
  data_dir, _ = imagenet
  config = _config(data_dir, evals=evals, best_metric=best)
  setup, data = state.prepare(config)
  with pytest.raises(ValueError, match=message):
    sets = evaluation.eval_sets(config, setup, data)
    evaluation.parse_metric(config.best_metric, sets)
