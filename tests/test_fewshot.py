"""Few-shot linear evaluation: the closed-form solve, support sets, `vit-jax fewshot` on digits."""

import json

import data_fixtures as df
import numpy as np
import pytest
from sklearn.linear_model import Ridge

from vit_jax import cli
from vit_jax import errors
from vit_jax.apps import demo
from vit_jax.apps import fewshot
from vit_jax.data import sources
from vit_jax.training import state


@pytest.mark.parametrize("n,d", [(30, 96), (200, 24)])  # fewer shots than features, and more
def test_solve_equals_scikit_learn_ridge(n, d):
  rng = np.random.default_rng(n)
  labels = np.arange(n) % 5
  feats = rng.normal(size=(n, d)) + labels[:, None] * rng.normal(size=d)
  (x,) = fewshot.whiten(feats)
  assert x.shape == (n, d + 1) and np.all(x[:, -1] == fewshot.BIAS_FEATURE)
  targets = 2.0 * np.eye(5)[labels] - 1.0
  for l2 in (1.0, 1024.0):
    # The bias is the constant column, as in the paper's setup: no separate intercept.
    ref = Ridge(alpha=l2, fit_intercept=False, solver="svd").fit(x, targets).coef_.T
    np.testing.assert_allclose(fewshot.solve(x, targets, l2), ref, atol=1e-5, rtol=0)


def test_support_sets_take_k_per_class_by_seed():
  labels = np.repeat(np.arange(4), [6, 7, 8, 9])
  a = fewshot.support_indices(labels, 4, 5, seed=0)
  assert np.bincount(labels[a]).tolist() == [5, 5, 5, 5] and len(set(a)) == 20
  assert np.array_equal(a, fewshot.support_indices(labels, 4, 5, seed=0))
  assert not np.array_equal(a, fewshot.support_indices(labels, 4, 5, seed=1))
  with pytest.raises(
    errors.ConfigError, match=r"^7 shots: class 0 has only 6 example\(s\) in the train split$"
  ):
    fewshot.support_indices(labels, 4, 7, seed=0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  """The demo's setting: a ViT pre-trained on digits 0-4, and digits 5-9 as the new task."""
  from vit_jax.training import train

  root = tmp_path_factory.mktemp("digits")
  df.write_digits(str(root / "a"), range(5), size=16)
  df.write_digits(str(root / "b"), range(5, 10), size=16)
  train.train_and_evaluate(demo.digits_config(str(root / "a"), 16, 300, None), str(root / "pre"))
  return root


@pytest.mark.slow
def test_pretrained_digits_model_is_well_above_chance_on_new_digits(digits):
  config = demo.digits_config(str(digits / "b"), 16, 300, None)
  result = fewshot.evaluate(config, str(digits / "pre" / "final.npz"), shots=(1, 10), seeds=3)
  assert result["num_classes"] == 5 and result["eval_examples"] == 224 and result["split"] == "test"
  # Chance is 0.20. Measured 0.52 +- 0.02 at 10 shots, 0.32 +- 0.03 at one (AMD EPYC).
  assert result["shots"]["10"]["mean"] > 0.4
  assert result["shots"]["10"]["mean"] > result["shots"]["1"]["mean"]
  assert len(result["shots"]["10"]["seeds"]) == 3


@pytest.mark.slow
def test_support_sets_are_disjoint_from_the_test_examples(digits):
  config = demo.digits_config(str(digits / "b"), 16, 300, None)
  setup, data = state.prepare(config)
  params = state.load_params(setup, str(digits / "pre" / "final.npz"))
  train = fewshot.extract(setup, data, params, "train")
  test = fewshot.extract(setup, data, params, "test")
  paths = {
    s: data.source.records(sources.split_spec(data.source, config, s)).paths
    for s in ("train", "test")
  }
  assert len(test.labels) == len(paths["test"]) and sorted(test.index) == list(
    range(len(paths["test"]))
  )
  for seed in range(3):
    rows = fewshot.support_indices(train.labels, 5, 25, seed)
    support = {paths["train"][i] for i in train.index[rows]}
    assert len(support) == 125 and not support & set(paths["test"])
  config.test_split = "train"  # the same split on both sides: refused before any work
  with pytest.raises(errors.ConfigError, match="support sets would overlap the test examples"):
    fewshot.evaluate(config, str(digits / "pre" / "final.npz"))


@pytest.mark.slow
def test_fewshot_command(digits, capsys):
  ckpt = str(digits / "pre" / "final.npz")
  args = ["fewshot", "--checkpoint", ckpt, "--config", "tiny"]
  # The tiny recipe's model is another: the file's is used, the config gives the data.
  base = [f"--config.folder={digits / 'b'}", "--config.image_size=16"]
  assert cli.main([*args, *base, "--shots", "1,5", "--seeds", "2"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[0].startswith("few-shot linear accuracy, 5 classes, 224 test images")
  last = json.loads(out[-1])
  assert set(last) == {"shots", "num_classes", "eval_examples"} and set(last["shots"]) == {"1", "5"}
  assert last["shots"]["5"]["mean"] > 0.3
  assert cli.main([*args, *base, "--shots", "1,500"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "500 shots: class 0 has only" in err[0]
