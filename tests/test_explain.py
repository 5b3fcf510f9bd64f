"""Attention maps: the weights the model sows, rollout against numpy, and `vit-jax explain`."""

import json
import os

import ckpt_fixtures as cf
import data_fixtures as df
import numpy as np
import pytest
from PIL import Image

from vit_jax import cli
from vit_jax import models
from vit_jax.apps import classifier
from vit_jax.apps import explain
from vit_jax.models import layout

# 32 px images in 8 px patches: a 4x4 grid plus the class token, 17 tokens.
SPEC = cf.Spec(hidden=48, mlp=96, heads=3, layers=3, patch=8, image_size=32, classes=10)


def _model(**kw) -> models.VisionTransformer:
  fields = dict(
    num_classes=10,
    image_size=32,
    patch_size=8,
    hidden_size=48,
    mlp_dim=96,
    num_heads=3,
    num_layers=3,
  )
  return models.create_model(None, **{**fields, **kw})


@pytest.fixture(scope="module")
def params():
  """The original-layout fixture's arrays (weights at realistic scales), as our params."""
  flat = {cf.linen_key(k): v for k, v in cf.original_arrays(SPEC, seed=3).items()}
  return layout.unflatten(flat)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def _numpy_rollout(weights, classifier="token"):
  """The rollout formula over full [B, H, T, T] weights, in float64, one matrix at a time."""
  out = []
  for b in range(weights[0].shape[0]):
    joint = np.eye(weights[0].shape[-1])
    for w in weights:
      a = np.asarray(w[b], np.float64).mean(axis=0)
      a = 0.5 * a + 0.5 * np.eye(len(a))
      a = a / a.sum(axis=1, keepdims=True)
      joint = a @ joint
    row = joint[0, 1:] if classifier == "token" else joint.mean(axis=0)
    g = int(round(np.sqrt(len(row))))
    out.append(row.reshape(g, g) / row.max())
  return np.stack(out)


@pytest.mark.slow
def test_weights_are_sown_without_changing_the_outputs(params, images):
  model = _model()
  logits, weights = models.attention_weights(model, params, images)
  np.testing.assert_array_equal(logits, model.apply({"params": params}, images, train=False))
  # The last block runs its queries on the class token alone.
  assert [w.shape for w in weights] == [(2, 3, 17, 17)] * 2 + [(2, 3, 1, 17)]
  for w in weights:  # softmax rows; fp32 sums of 17 terms are within 1e-6
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)
  assert set(
    model.apply({"params": params}, images, train=False, mutable=["intermediates"])[1]
  ) == {"intermediates"}


@pytest.mark.slow
def test_rollout_equals_plain_numpy(params, images):
  # The scanned encoder runs every token to the end, so its weights are the full matrices
  # the numpy formula needs; the unrolled model's last layer has the class row only.
  scanned = _model(scan=True)
  stacked = layout.unflatten(layout.stack_blocks(layout.flatten(params), 3))
  _, full = models.attention_weights(scanned, stacked, images)
  _, short = models.attention_weights(_model(), params, images)
  expected = _numpy_rollout([np.asarray(w) for w in full])
  assert expected.shape == (2, 4, 4) and np.ptp(expected) > 0.01  # not a trivial map
  # float32 products of three 17x17 stochastic matrices against float64: 1e-5 is ~100 ulps.
  np.testing.assert_allclose(explain.rollout(_model(), short), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(explain.rollout(scanned, full), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_rollout_of_a_gap_model_reads_the_mean_row(images):
  model = _model(classifier="gap")
  p = models.init_params(model, 1)
  _, weights = models.attention_weights(model, p, images)
  assert weights[-1].shape == (2, 3, 16, 16)  # no class token, every token to the end
  np.testing.assert_allclose(
    explain.rollout(model, weights),
    _numpy_rollout([np.asarray(w) for w in weights], "gap"),
    rtol=1e-5,
    atol=1e-6,
  )


def test_known_answers():
  model = _model()
  eye = [np.broadcast_to(np.eye(17, dtype=np.float32), (1, 3, 17, 17))] * 3
  # Attention to oneself only: the class token never reads a patch; the map is uniform (0).
  np.testing.assert_array_equal(explain.rollout(model, eye), np.zeros((1, 4, 4)))
  flat = [np.full((1, 3, 17, 17), 1 / 17, np.float32)] * 3
  # Attention spread evenly: every patch counts the same, so every cell is the peak.
  np.testing.assert_allclose(explain.rollout(model, flat), np.ones((1, 4, 4)), rtol=1e-6)
  mean, heads = explain.last_layer(model, flat)
  np.testing.assert_allclose(mean, np.ones((1, 4, 4)), rtol=1e-6)
  assert heads.shape == (1, 3, 4, 4)


def _permute_heads(params, order):
  """The same function with its heads renumbered: q, k, v and out kernels re-indexed on the head
  axis.
  """
  flat = dict(layout.flatten(params))
  for key in list(flat):
    if "MultiHeadDotProductAttention" in key and "/out/bias" not in key:
      axis = 0 if "/out/" in key else (1 if key.endswith("kernel") else 0)
      flat[key] = np.take(np.asarray(flat[key]), order, axis=axis)
  return layout.unflatten(flat)


def test_maps_do_not_depend_on_the_order_of_heads(params, images):
  model = _model()
  order = [2, 0, 1]
  logits, weights = models.attention_weights(model, params, images)
  logits_p, weights_p = models.attention_weights(model, _permute_heads(params, order), images)
  # The same sums in another order: float32 rounding only.
  np.testing.assert_allclose(logits_p, logits, atol=1e-5)
  np.testing.assert_allclose(weights_p[0], np.asarray(weights[0])[:, order], atol=1e-6)
  np.testing.assert_allclose(
    explain.rollout(model, weights_p), explain.rollout(model, weights), atol=1e-6
  )
  mean, heads = explain.last_layer(model, weights)
  mean_p, heads_p = explain.last_layer(model, weights_p)
  np.testing.assert_allclose(mean_p, mean, atol=1e-6)
  np.testing.assert_allclose(heads_p, np.asarray(heads)[:, order], atol=1e-6)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("explain") / "small.npz")
  cf.write_original(path, SPEC, seed=3)
  return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rollout", "last"])
def test_scanned_and_unrolled_give_the_same_maps(ckpt, images, method):
  plain = explain.Explainer(classifier.load_classifier(ckpt), method)
  scanned = explain.Explainer(classifier.load_classifier(ckpt, scan=True), method)
  pixels = images.copy()
  for a, b in zip(plain.batch(pixels), scanned.batch(pixels), strict=True):
    if a is not None:
      np.testing.assert_allclose(a, b, atol=2e-6)  # one scanned block vs three: fp32 rounding


@pytest.mark.slow
def test_explain_writes_pngs_and_the_json_map(ckpt, tmp_path, capsys):
  photo = df.write_file(str(tmp_path / "in" / "photo.png"), df.encode(df.class_image(1, 0, 48, 64)))
  other = df.write_file(
    str(tmp_path / "in2" / "photo.jpg"), df.encode(df.class_image(2, 1, 40, 40), "JPEG")
  )
  broken = df.write_file(str(tmp_path / "in" / "broken.png"), b"not an image")
  out = tmp_path / "out"
  code = cli.main(
    ["explain", "--checkpoint", ckpt, "--output", str(out), "--json", photo, broken, other]
  )
  captured = capsys.readouterr()
  assert code == 1  # one bad image: reported, the rest explained
  assert "broken.png" in captured.err and len(captured.err.strip().splitlines()) == 1
  rows = [json.loads(line) for line in captured.out.strip().splitlines()]
  assert [r["image"] for r in rows] == [photo, broken, other]
  assert rows[1] == {"image": broken, "error": rows[1]["error"]}
  assert rows[0]["grid"] == [4, 4] and len(rows[0]["map"]) == 4 and len(rows[0]["predictions"]) == 3
  # The printed map is the library's rollout of the same image.
  clf = classifier.load_classifier(ckpt)
  from vit_jax.data import preprocess

  image = preprocess.eval_resize(preprocess.read_rgb(photo), 32)[None]
  _, weights = models.attention_weights(clf.model, clf.params, image)
  np.testing.assert_allclose(rows[0]["map"], explain.rollout(clf.model, weights)[0], atol=1e-5)
  assert max(max(r) for r in rows[0]["map"]) == pytest.approx(1.0)
  # Two inputs named photo.*: photo.png, then photo-2.png.
  assert sorted(os.listdir(out)) == ["photo-2.png", "photo.png"]
  with Image.open(out / "photo.png") as im:
    im.load()
    assert im.format == "PNG" and min(im.size) > 100


def test_explain_last_method_draws_every_head(ckpt, tmp_path, capsys):
  photo = df.write_file(str(tmp_path / "cat.png"), df.encode(df.class_image(0, 0, 32, 32)))
  assert cli.main(["explain", "--checkpoint", ckpt, "--method", "last", "--json", photo]) == 0
  row = json.loads(capsys.readouterr().out)
  assert np.asarray(row["heads"]).shape == (3, 4, 4)
  assert not os.path.exists("explanations")  # --json alone draws nothing


def test_explain_never_writes_over_an_input(ckpt, tmp_path, capsys):
  photo = df.write_file(str(tmp_path / "cat.png"), df.encode(df.class_image(0, 0, 32, 32)))
  before = open(photo, "rb").read()
  assert cli.main(["explain", "--checkpoint", ckpt, "--output", str(tmp_path), photo]) == 2
  assert "is one of the input images" in capsys.readouterr().err
  assert open(photo, "rb").read() == before
