"""`--quantize int8` for predict and serve: qwix post-training quantization of a checkpoint."""

import json
import os

import ckpt_fixtures as cf
import data_fixtures as df
import jax
import numpy as np
import pytest

from vit_jax import cli
from vit_jax import errors
from vit_jax import models
from vit_jax.apps import classifier
from vit_jax.commands import apps as apps_commands
from vit_jax.data import preprocess
from vit_jax.models import quantize


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("int8")
  ckpt = str(root / "m.npz")
  cf.write_original(ckpt, cf.Spec(classes=3, image_size=32))
  # Calibration images in class folders; evaluation images apart.
  for label, colour in enumerate(df.CLASS_COLOURS):
    for i in range(6):
      df.write_file(
        str(root / "cal" / colour / f"{i}.png"), df.encode(df.class_image(label, 10 * label + i))
      )
  files = [
    df.write_file(str(root / "eval" / f"{i}.png"), df.encode(df.class_image(i % 3, 100 + i)))
    for i in range(9)
  ]
  return {"root": root, "ckpt": ckpt, "files": files, "cal": str(root / "cal")}


def _predict(capsys, setup, *extra):
  code = cli.main(["predict", "--checkpoint", setup["ckpt"], "--json", *extra, *setup["files"]])
  out, err = capsys.readouterr()
  assert code == 0, err
  return [json.loads(line)["predictions"] for line in out.splitlines()], err


def _images(setup):
  return np.stack([preprocess.eval_resize(preprocess.read_rgb(p), 32) for p in setup["files"]])


def test_calibration_images_are_spread_over_the_sorted_folders(setup):
  paths = classifier.calibration_paths(setup["cal"], 6)
  # 18 files in three class folders: every third, so two of each class.
  assert [os.path.relpath(p, setup["cal"]) for p in paths] == [
    "blue/0.png",
    "blue/3.png",
    "green/0.png",
    "green/3.png",
    "red/0.png",
    "red/3.png",
  ]
  assert len(classifier.calibration_paths(os.path.join(setup["cal"], "*", "1.png"), 64)) == 3


@pytest.mark.slow
@pytest.mark.parametrize("calibrated", [False, True], ids=["weights", "weights+activations"])
def test_predict_int8_is_the_qwix_quantized_model(capsys, setup, calibrated):
  extra = ["--quantize", "int8"] + (["--calibration", setup["cal"]] if calibrated else [])
  rows, _ = _predict(capsys, setup, "--top-k", "3", *extra)
  # The same numbers built by hand: the float model, qwix's PTQ, softmax.
  clf = classifier.load_classifier(setup["ckpt"], dtype="float32")
  x = _images(setup)
  cal = None
  if calibrated:
    c = np.stack(
      [
        preprocess.eval_resize(preprocess.read_rgb(p), 32)
        for p in classifier.calibration_paths(setup["cal"], 64)
      ]
    )
    cal = [c[i : i + 8] for i in range(0, len(c), 8)]
  model, params, setting = quantize.quantize(clf.model, clf.params, cal)
  probs = np.asarray(jax.nn.softmax(model.apply({"params": params}, x, train=False)))
  for row, p in zip(rows, probs, strict=True):
    assert [r["index"] for r in row] == np.argsort(-p, kind="stable")[:3].tolist()
    # Another batch (8 against 9): test_cli's float32 bound, rtol 2e-4. Measured: 1.2e-7.
    np.testing.assert_allclose([r["score"] for r in row], np.sort(p)[::-1][:3], rtol=2e-4)
  # int8 where it should be: every Dense kernel (13 of them: 2 blocks x 6, and the head).
  layers = quantize.int8_layers(params)
  assert len(layers) == 13 and all(x.endswith("kernel/array/qvalue") for x in layers)
  assert "embedding" not in " ".join(layers)
  assert setting.activations is calibrated
  # And near the float model: top-1 unchanged on these 9 images, probabilities within 0.15
  # (random weights; measured 0.08 with activations, 0.01 without; the trained model's
  # figures are in docs/export.md).
  p32 = np.asarray(jax.nn.softmax(clf.model.apply({"params": clf.params}, x, train=False)))
  assert (p32.argmax(-1) == probs.argmax(-1)).all() and np.abs(p32 - probs).max() < 0.15


@pytest.mark.slow
def test_serve_takes_the_int8_options(setup):
  args = cli.build_parser().parse_args(
    ["serve", "--checkpoint", setup["ckpt"], "--quantize", "int8", "--calibration", setup["cal"]]
  )
  clf = apps_commands.load_classifier(args)
  assert clf.quantized == "int8 weights and activations (static ranges)"
  probs = clf.probs(_images(setup)[:2], sizes=(4,))
  assert probs.shape == (2, 3) and np.allclose(probs.sum(-1), 1, atol=1e-5)


def test_without_the_option_nothing_is_quantized(setup):
  clf = classifier.load_classifier(setup["ckpt"])
  assert clf.quantized is None and isinstance(clf.model, models.VisionTransformer)
  assert type(clf.model) is models.VisionTransformer  # not qwix's subclass
  x = _images(setup)
  # Batches of 8 against one of 9: float32 in another order (test_cli's bound).
  np.testing.assert_allclose(
    clf.logits(x), np.asarray(clf.model.apply({"params": clf.params}, x, train=False)), atol=1e-5
  )


def _fails(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  assert code == 2 and out == "", err
  (line,) = err.strip().splitlines()
  return line


def test_bad_int8_options_are_one_line(capsys, setup, tmp_path):
  base = ["predict", "--checkpoint", setup["ckpt"], setup["files"][0]]
  assert _fails(capsys, *base, "--calibration", setup["cal"]) == (
    "vit-jax predict: error: --calibration is for --quantize int8; give both"
  )
  (tmp_path / "empty").mkdir()
  assert _fails(capsys, *base, "--quantize", "int8", "--calibration", str(tmp_path / "empty")) == (
    f"vit-jax predict: error: --calibration {tmp_path / 'empty'}: no image files "
    "(a directory or a glob)"
  )
  line = _fails(
    capsys, *base, "--quantize", "int8", "--calibration", setup["cal"], "--calibration-images", "0"
  )
  assert line == "vit-jax predict: error: --calibration-images 0: must be at least 1"
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args([*base, "--quantize", "int4"])


def test_a_missing_qwix_names_the_int8_extra(capsys, setup, monkeypatch):
  import importlib.util

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "qwix" else find_spec(name, *a)
  )
  line = _fails(capsys, "predict", "--checkpoint", setup["ckpt"], "--quantize", "int8", "x.png")
  assert line == (
    "vit-jax predict: error: qwix is not installed; this command needs pip install 'vit-jax[int8]'"
  )


@pytest.mark.slow
def test_a_scanned_model_is_refused_in_one_line(setup):
  model = models.create_model("Ti/16", num_classes=3, image_size=32, num_layers=2, scan=True)
  with pytest.raises(errors.ConfigError, match=r"^int8 needs an unrolled model: qwix 0.1.8"):
    quantize.quantize(model, models.init_params(model))
