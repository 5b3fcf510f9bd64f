"""Multi-label training end to end: a list of tagged images, a sigmoid head, mAP, and inference."""

import json
import os
import subprocess
import sys

import data_fixtures as df
import httpx
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_serve
from vit_jax.apps import classifier
from vit_jax.apps import split_predictions
from vit_jax.apps.serving import app as serve
from vit_jax.apps.serving import protocol
from vit_jax.config import schema
from vit_jax.data import preprocess
from vit_jax.training import metrics
from vit_jax.training import train
from vit_jax.weights import head_record

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
    df.write_file(
      os.path.join(root, "img", f"{i}.png"), df.encode(df.class_image(label, i, 16, 16))
    )
    rows.append(f"img/{i}.png,{';'.join(_tags(label))},{split}")
  (root / "list.csv").write_text("\n".join(rows) + "\n")
  return str(root / "list.csv")


def _config(list_file):
  c = schema.base()
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


@pytest.fixture(scope="module")
def trained(tagged, tmp_path_factory):
  """(workdir, final metrics) of a run on the tagged list."""
  work = str(tmp_path_factory.mktemp("run"))
  return work, train.train_and_evaluate(_config(tagged), work)


@pytest.mark.slow
def test_multilabel_training_learns_the_tags_and_infers_them(tagged, trained, tmp_path):
  config = _config(tagged)
  work, result = trained
  # Sigmoid head: multi-label metrics, no single-label accuracy.
  assert {"mAP", "f1@0.5", "loss"} <= set(result["eval"]) and "accuracy" not in result["eval"]
  # Chance mAP (random scores) is the tags' mean frequency, about 0.42 here: the colours are
  # one linear read of the patch means away, so a trained model ranks them far above that.
  assert result["eval"]["mAP"] > 0.9, result["eval"]
  assert open(os.path.join(work, "labels.txt")).read().split() == NAMES

  out = split_predictions.predict_dataset(
    config, os.path.join(work, "final.npz"), str(tmp_path / "test.npz"), split="test"
  )
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
  """Each tag's target moves towards 1/2: t (1 - a) + a / 2, then the summed binary CE."""
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


@pytest.mark.slow
def test_a_multilabel_run_is_scored_with_sigmoids_by_predict_serve_and_convert(
  tagged, trained, tmp_path
):
  """The head record beside final.npz makes predict, serve and convert use a sigmoid head."""
  import transformers

  work, _ = trained
  final = os.path.join(work, "final.npz")
  assert head_record.read(final) == head_record.HeadRecord("sigmoid", tuple(NAMES))
  # Images 78, 79, 80 are red, green and blue: tags {red, warm}, {green, warm}, {blue}.
  paths = [os.path.join(os.path.dirname(tagged), "img", f"{i}.png") for i in (78, 79, 80)]

  def vit_jax(*args):
    run = subprocess.run(
      [os.path.join(os.path.dirname(sys.executable), "vit-jax"), *args],
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout

  def predict(*flags):
    out = vit_jax("predict", "--json", "--checkpoint", final, "--top-k", "4", *flags, *paths)
    return [json.loads(line)["predictions"] for line in out.splitlines()]

  sigmoid = predict()
  clf = classifier.load_classifier(final)
  logits = clf.logits(np.stack([preprocess.eval_resize(preprocess.read_rgb(p), 16) for p in paths]))
  for row, image_logits in zip(sigmoid, logits, strict=True):
    want = 1 / (1 + np.exp(-image_logits.astype(np.float64)))
    # float32 sigmoid of the same float32 logits, against float64: within a few float32 ulps
    # of 1 (6e-8 each) in absolute terms. Measured: 1.2e-10.
    np.testing.assert_allclose(
      [p["score"] for p in row], want[[p["index"] for p in row]], rtol=0, atol=1e-6
    )
  tagged_as = [{p["label"] for p in row if p["score"] > 0.5} for row in sigmoid]
  assert tagged_as == [{"red", "warm"}, {"green", "warm"}, {"blue"}]
  # Independent probabilities: two tags near 1 at once, which a softmax cannot give.
  assert sum(p["score"] for p in sigmoid[0]) > 1.5
  softmax = predict("--multiclass")
  for row in softmax:  # all four classes: a distribution
    assert sum(p["score"] for p in row) == pytest.approx(1.0, abs=1e-5)
  assert [[p["label"] for p in row] for row in predict("--threshold", "0.5")] == [
    [p["label"] for p in row if p["score"] >= 0.5] for row in sigmoid
  ]

  # The server reads the same record.
  app = serve.create_app(
    classifier.load_classifier(final), protocol.Options(top_k=4, batch_sizes=(1, 4))
  )
  with test_serve.running(app) as url:
    meta = httpx.get(f"{url}/metadata").json()
    served = httpx.post(
      f"{url}/score", json={"input_data": [test_serve.b64(p) for p in paths]}, timeout=60
    ).json()
  assert meta["head"] == "sigmoid" and meta["labels"] == NAMES
  for a, b in zip(served, sigmoid, strict=True):
    assert [p["label"] for p in a] == [p["label"] for p in b]
    # Two programs (the sigmoid fused into the model's call, or applied after it): float32
    # ulps of values in (0, 1). Measured: 1.2e-10.
    np.testing.assert_allclose([p["score"] for p in a], [p["score"] for p in b], rtol=0, atol=1e-6)

  # convert: problem_type tells transformers' pipeline() to apply a sigmoid too.
  hf = str(tmp_path / "hf")
  vit_jax("convert", final, hf)
  config = json.load(open(os.path.join(hf, "config.json")))
  assert config["problem_type"] == "multi_label_classification"
  assert [config["id2label"][str(i)] for i in range(4)] == NAMES
  pipe = transformers.pipeline("image-classification", model=hf, device="cpu")
  for theirs, ours in zip(pipe(paths, top_k=4), sigmoid, strict=True):
    assert [p["label"] for p in theirs] == [p["label"] for p in ours]
    # The same float32 pixels (16 px images at the model's 16 px) through two float32
    # implementations (test_hf_files: 2.7e-7 measured); 1e-4 is 10x inside the promised 1e-3.
    np.testing.assert_allclose([p["score"] for p in theirs], [p["score"] for p in ours], atol=1e-4)
  # And back: the transformers directory's problem_type becomes the head record again.
  vit_jax("convert", hf, str(tmp_path / "back.npz"))
  assert head_record.read(str(tmp_path / "back.npz")) == head_record.HeadRecord(
    "sigmoid", tuple(NAMES)
  )
