"""The `vit-jax` command line: predict and convert, and the shipped class names."""

import json
import os
import re
import subprocess
import sys

import ckpt_fixtures as cf
import data_fixtures as df
import jax
import numpy as np
import pytest
from PIL import Image

from vit_jax import cli
from vit_jax import errors
from vit_jax import models
from vit_jax.apps import classifier
from vit_jax.config import config_args
from vit_jax.config import recipes
from vit_jax.data import preprocess
from vit_jax.platform import files
from vit_jax.platform import jax_setup
from vit_jax.weights import checkpoint
from vit_jax.weights import head_record
from vit_jax.weights import labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  d = tmp_path_factory.mktemp("img")
  out = df.write_mode_images(str(d))
  out["broken.jpg"] = df.write_file(
    str(d / "broken.jpg"), b"\xff\xd8\xff\xe0 definitely not a jpeg"
  )
  return out


def _run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.slow
def test_predict_json_matches_the_model(capsys, imagenet_ckpt, images):
  code, out, err = _run(
    capsys,
    "predict",
    "--checkpoint",
    imagenet_ckpt,
    "--json",
    "--top-k",
    "3",
    "--batch-size",
    "4",
    *[images[k] for k in ("rgb.jpg", "gray.png", "pic.bmp")],
  )
  assert code == 0, err
  rows = [json.loads(line) for line in out.splitlines()]
  assert [r["image"] for r in rows] == [images["rgb.jpg"], images["gray.png"], images["pic.bmp"]]
  # The same numbers computed directly: decode, resize, scale, model, softmax.
  model = models.create_model("Ti/16", num_classes=1000, image_size=32, num_layers=2, mlp_dim=384)
  params = checkpoint.load_pretrained(imagenet_ckpt, model)
  names = labels.imagenet2012()
  for row in rows:
    x = preprocess.eval_resize(np.asarray(Image.open(row["image"]).convert("RGB")), 32)[None]
    probs = np.asarray(jax.nn.softmax(model.apply({"params": params}, x)[0]))
    best = np.argsort(-probs)[:3]
    assert [p["index"] for p in row["predictions"]] == best.tolist()
    assert [p["label"] for p in row["predictions"]] == [names[i] for i in best]
    # Another program (batches of 4, not 1). Softmax turns the logits' absolute error into
    # the probabilities' relative error, at most doubled: 2 * 1.5e-5 (the fp32 bound of
    # test_checkpoint's scanned-model test, same architecture) * 3.7 (largest logit) = 1.1e-4.
    # Measured: 1.5e-6.
    np.testing.assert_allclose([p["score"] for p in row["predictions"]], probs[best], rtol=2e-4)


@pytest.mark.slow
def test_predict_human_output_and_unreadable_files(capsys, imagenet_ckpt, images):
  paths = [images[k] for k in ("broken.jpg", "palette.png", "alpha.png", "cmyk.jpg")]
  code, out, err = _run(capsys, "predict", "--checkpoint", imagenet_ckpt, "--top-k", "2", *paths)
  assert code == 1  # something failed, and the rest were still classified
  (line,) = err.strip().splitlines()
  assert line.startswith(f"vit-jax predict: {images['broken.jpg']}: not a readable image (")
  lines = out.splitlines()
  assert lines[0::3] == paths[1:]
  assert all(line.startswith("  ") and "%" in line for i, line in enumerate(lines) if i % 3)
  missing = "/nonexistent/x.jpg"
  code, out, err = _run(
    capsys, "predict", "--checkpoint", imagenet_ckpt, missing, images["rgb.jpg"]
  )
  assert code == 1 and missing in err and images["rgb.jpg"] in out


@pytest.mark.slow
def test_predict_with_a_labels_file_and_wrong_count(capsys, tmp_path, images):
  ckpt = tmp_path / "c3.npz"
  cf.write_original(ckpt, cf.Spec(classes=3))
  (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
  code, out, _ = _run(
    capsys,
    "predict",
    "--checkpoint",
    str(ckpt),
    "--labels",
    str(tmp_path / "names.txt"),
    "--json",
    images["rgb.jpg"],
  )
  assert code == 0
  assert {p["label"] for p in json.loads(out)["predictions"]} == {"cat", "dog", "bird"}
  (tmp_path / "two.txt").write_text("cat\ndog\n")
  code, _, err = _run(
    capsys,
    "predict",
    "--checkpoint",
    str(ckpt),
    "--labels",
    str(tmp_path / "two.txt"),
    images["rgb.jpg"],
  )
  assert (
    code == 2
    and err.strip()
    == f"vit-jax predict: error: {tmp_path / 'two.txt'}: 2 labels for a model with 3 classes"
  )


@pytest.mark.slow
def test_predict_at_another_size_and_bad_checkpoint(capsys, tmp_path, imagenet_ckpt, images):
  code, out, _ = _run(
    capsys,
    "predict",
    "--checkpoint",
    imagenet_ckpt,
    "--image-size",
    "48",
    "--json",
    images["rgb.jpg"],
  )
  assert code == 0 and len(json.loads(out)["predictions"]) == 5
  # The fixture is narrower than a real Ti/16 (mlp 384, not 768): naming the variant is strict.
  code, out, err = _run(
    capsys, "predict", "--checkpoint", imagenet_ckpt, "--model", "Ti/16", images["rgb.jpg"]
  )
  assert code == 2 and "MlpBlock_0/Dense_0/bias has shape (384,), expected (768,)" in err
  (tmp_path / "junk.npz").write_bytes(b"junk")
  code, out, err = _run(
    capsys, "predict", "--checkpoint", str(tmp_path / "junk.npz"), images["rgb.jpg"]
  )
  assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "junk.npz" in err


def test_convert_both_ways(capsys, tmp_path):
  arrays = cf.write_original(tmp_path / "m.npz", cf.Spec(classes=1000))
  code, out, err = _run(capsys, "convert", str(tmp_path / "m.npz"), str(tmp_path / "hf"))
  assert code == 0, err
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["id2label"]["1"] == "goldfish, Carassius auratus"
  assert config["hidden_act"] == "gelu_pytorch_tanh"
  code, out, err = _run(capsys, "convert", str(tmp_path / "hf"), str(tmp_path / "back.npz"))
  assert code == 0, err
  with np.load(tmp_path / "back.npz") as back:
    assert set(back.files) == set(arrays)
    for k in arrays:
      np.testing.assert_array_equal(back[k], arrays[k])
  assert (tmp_path / "back.labels.txt").read_text().splitlines()[0] == "tench, Tinca tinca"


@pytest.mark.parametrize("where", ["memory", "gs"])
def test_convert_to_and_from_a_remote_directory(capsys, tmp_path, request, where):
  """A transformers directory on gs:// is a directory, not an .npz, both as source and as target."""
  root = "memory://hf" if where == "memory" else request.getfixturevalue("gcs") + "/hf"
  arrays = cf.write_original(tmp_path / "m.npz", cf.Spec(classes=1000))
  code, out, err = _run(capsys, "convert", str(tmp_path / "m.npz"), f"{root}/vit")
  assert code == 0, err
  assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(
    files.list_dir(f"{root}/vit")[1]
  )
  code, out, err = _run(capsys, "convert", f"{root}/vit", f"{root}/back.npz")
  assert code == 0, err
  assert f"wrote {root}/back.labels.txt" in out
  assert (
    files.read_bytes(f"{root}/back.labels.txt").decode().splitlines()[1]
    == "goldfish, Carassius auratus"
  )
  (tmp_path / "back.npz").write_bytes(files.read_bytes(f"{root}/back.npz"))
  with np.load(tmp_path / "back.npz") as back:
    assert set(back.files) == set(arrays)
    for k in arrays:
      np.testing.assert_array_equal(back[k], arrays[k])
  code, out, err = _run(capsys, "convert", f"{root}/empty", str(tmp_path / "x.npz"))
  assert code == 2 and f"{root}/empty: no such file" in err
  code, out, err = _run(capsys, "predict", "--checkpoint", f"{root}/vit", str(tmp_path / "x.png"))
  assert code == 2 and f"{root}/vit: not a regular file" in err and len(err.splitlines()) == 1


def test_convert_refuses_pre_logits_unless_dropped(capsys, tmp_path):
  cf.write_original(tmp_path / "p.npz", cf.Spec(classes=4, pre_logits=192))
  code, _, err = _run(capsys, "convert", str(tmp_path / "p.npz"), str(tmp_path / "hf"))
  assert code == 2 and "--drop-pre-logits" in err and not (tmp_path / "hf").exists()
  code, _, err = _run(
    capsys, "convert", "--drop-pre-logits", str(tmp_path / "p.npz"), str(tmp_path / "hf")
  )
  assert code == 0, err


def test_shipped_imagenet_names_are_the_tfds_list():
  from tensorflow_datasets.datasets.siscore import labels as tfds_labels

  assert list(labels.imagenet2012()) == list(tfds_labels.IMAGENET_LABELS_LIST)
  assert len(set(labels.imagenet2012())) == 1000


def test_console_script_is_installed():
  exe = os.path.join(os.path.dirname(sys.executable), "vit-jax")
  out = subprocess.run(
    [exe, "--help"], capture_output=True, text=True, timeout=120, check=True
  ).stdout
  assert "predict" in out and "convert" in out


def test_version_names_the_package_and_its_libraries(capsys):
  import importlib.metadata as md

  import vit_jax

  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  out = capsys.readouterr().out.strip()
  assert e.value.code == 0
  assert out.startswith(f"vit-jax {vit_jax.__version__} (jax {jax.__version__}, ")
  for lib in ("jaxlib", "flax", "optax", "orbax-checkpoint"):
    assert f"{lib} {md.version(lib)}" in out
  assert "libtpu " in out and "\n" not in out
  assert vit_jax.__version__ == md.version("vit-jax")  # the package and its metadata agree


def test_python_dash_m_runs_the_command():
  out = subprocess.run(
    [sys.executable, "-m", "vit_jax", "predict"], capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 2 and "--checkpoint" in out.stderr


def test_decode_rgb_modes_and_limits(images):
  for name in ("gray.png", "palette.png", "alpha.png", "cmyk.jpg"):
    arr = preprocess.read_rgb(images[name])
    assert arr.shape == (50, 70, 3) and arr.dtype == np.uint8
  with pytest.raises(preprocess.ImageError, match="over the limit of 100"):
    preprocess.decode_rgb(open(images["rgb.jpg"], "rb").read(), max_pixels=100)


def _bilinear_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Plain (no antialias) bilinear resize with half-pixel centres, in float64 numpy."""

  def weights(n_in: int, n_out: int) -> np.ndarray:
    # Row i of the result: the weights of the input rows that output row i mixes.
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), lo), 1 - (src - lo))
    np.add.at(w, (np.arange(n_out), hi), src - lo)
    return w

  return np.einsum(
    "yh,hwc,xw->yxc",
    weights(image.shape[0], height),
    image.astype(np.float64),
    weights(image.shape[1], width),
  )


@pytest.mark.parametrize("shape,size", [((10, 30, 3), 6), ((7, 5, 3), 12), ((50, 70, 3), 32)])
def test_eval_resize_is_a_plain_bilinear_resize_to_unit_range(shape, size):
  """Equal to an independent bilinear resize: nearest, bicubic, area or antialiased resizes,
  or a centre crop, all differ from it by far more than the tolerance on random pixels."""
  img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  out = preprocess.eval_resize(img, size)
  assert out.shape == (size, size, 3) and out.dtype == np.float32
  want = (_bilinear_reference(img, size, size) - 127.5) / 127.5
  # TensorFlow computes the source coordinates and weights in float32: a weight off by a few
  # ulps of a coordinate up to 70 (~1e-6 relative) moves a pixel by up to ~255 * 4e-6 = 1e-3,
  # 8e-6 after scaling by 1/127.5 (measured here: 1.1e-6). Other resizes differ by > 1e-2.
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
  assert out.min() >= -1 and out.max() <= 1


@pytest.mark.slow
def test_a_second_run_loads_its_compiled_programs_from_the_cache(tmp_path, imagenet_ckpt, images):
  exe = os.path.join(os.path.dirname(sys.executable), "vit-jax")
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith("JAX_COMPILATION_CACHE") and k != "JAX_ENABLE_COMPILATION_CACHE"
  }
  # The tiny model compiles in well under JAX's 1 s threshold for keeping a program; JAX logs
  # every cache miss when asked to explain them.
  env.update(
    XDG_CACHE_HOME=str(tmp_path),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_EXPLAIN_CACHE_MISSES="1",
  )
  cache = tmp_path / "vit-jax" / "jax"
  argv = [exe, "predict", "--checkpoint", imagenet_ckpt, "--json", images["rgb.jpg"]]
  runs = [
    subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, check=True)
    for _ in range(2)
  ]
  assert os.listdir(cache), f"nothing kept in {cache}"
  assert "PERSISTENT COMPILATION CACHE MISS" in runs[0].stderr
  assert "PERSISTENT COMPILATION CACHE MISS" not in runs[1].stderr, runs[1].stderr[-2000:]
  assert "Error reading persistent compilation cache" not in runs[1].stderr
  assert runs[1].stdout == runs[0].stdout


def test_the_users_own_jax_cache_settings_win(tmp_path):
  default = str(tmp_path / "vit-jax" / "jax")
  assert jax_setup.compilation_cache_dir(None, True, {"XDG_CACHE_HOME": str(tmp_path)}) == default
  assert (
    jax_setup.compilation_cache_dir("/elsewhere", True, {"XDG_CACHE_HOME": str(tmp_path)}) is None
  )
  assert jax_setup.compilation_cache_dir(None, False, {"XDG_CACHE_HOME": str(tmp_path)}) is None
  home = jax_setup.compilation_cache_dir(None, True, {})
  assert home == os.path.join(os.path.expanduser("~"), ".cache", "vit-jax", "jax")


def test_a_recipe_by_name_and_the_same_recipe_by_file_are_one_config():
  by_name = config_args.load_config(["--config", "tiny", "--config.total_steps=3"])
  by_file = config_args.load_config(
    [f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", "--config.total_steps=3"]
  )
  assert by_name.to_dict() == by_file.to_dict()
  assert by_name.total_steps == 3 and by_name.model.hidden_size == 64


def test_a_config_file_with_an_argument(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text(
    "from vit_jax.config import schema\n\n\ndef get_config(arg):\n"
    "  c = schema.base()\n  c.model.name = arg\n  return c\n"
  )
  assert config_args.load_config(["--config", f"{path}:ViT-S_32"]).model.name == "ViT-S_32"


def test_an_unknown_recipe_lists_the_recipes(capsys, tmp_path):
  code, out, err = _run(capsys, "train", "--config", "vit_b16_cifar100", "--workdir", str(tmp_path))
  assert code == 2 and out == ""
  (line,) = err.strip().splitlines()
  assert "vit_b16_cifar100: no such recipe or config file" in line
  assert all(name in line for name in recipes.names())


def test_train_help_lists_the_recipes(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  out = capsys.readouterr().out
  for name in recipes.names():
    assert f"  {name} " in out and recipes.summary(name).split(":")[0] in out
  assert {
    "tiny",
    "vit_b16_cifar10",
    "vit_b16_imagenet",
    "vit_b16_pretrain_i21k",
    "vit_folder",
  } <= set(recipes.names())


# -- user mistakes against bugs ----------------------------------------------------------------


def test_a_user_mistake_is_one_line_and_exit_2(capsys, tmp_path):
  code, out, err = _run(capsys, "predict", "--checkpoint", str(tmp_path / "none.npz"), "x.png")
  assert (
    code == 2
    and out == ""
    and err.strip().splitlines()
    == [f"vit-jax predict: error: {tmp_path / 'none.npz'}: no such file"]
  )


@pytest.mark.slow
def test_a_bug_is_not_taken_for_a_user_mistake(capsys, imagenet_ckpt, images, monkeypatch):
  """A ValueError from inside the library is a bug: it propagates (traceback, exit 1)."""
  from vit_jax.apps import classifier

  def broken(*args, **kw):
    raise ValueError("an internal invariant failed")

  monkeypatch.setattr(classifier, "classify_files", broken)
  with pytest.raises(ValueError, match="an internal invariant failed"):
    cli.main(["predict", "--checkpoint", imagenet_ckpt, images["rgb.jpg"]])
  # The installed command: the traceback is printed and the exit status is 1.
  code = (
    "import sys; from vit_jax import cli; from vit_jax.apps import classifier\n"
    "def broken(*a, **k): raise ValueError('an internal invariant failed')\n"
    "classifier.classify_files = broken\n"
    f"sys.exit(cli.main(['predict', '--checkpoint', {imagenet_ckpt!r}, {images['rgb.jpg']!r}]))\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert (
    proc.returncode == 1
    and "Traceback" in proc.stderr
    and "an internal invariant failed" in proc.stderr
  )


def test_a_missing_extra_names_the_install_command(capsys, monkeypatch, imagenet_ckpt):
  import importlib.util

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "httpx" else find_spec(name, *a)
  )
  code, out, err = _run(capsys, "serve", "--checkpoint", imagenet_ckpt)
  assert code == 2 and err.strip().splitlines() == [
    "vit-jax serve: error: httpx is not installed; this command needs pip install 'vit-jax[serve]'"
  ]


def test_the_head_record_beside_an_npz_sets_the_head_kind_and_the_class_names(tmp_path):
  path = str(tmp_path / "m.npz")
  cf.write_original(path, cf.Spec(classes=3))
  assert classifier.load_classifier(path).multilabel is False  # a file from elsewhere: softmax
  head_record.write(path, head_record.HeadRecord("sigmoid", ("x", "y", "z")))
  clf = classifier.load_classifier(path)
  assert clf.multilabel and clf.class_names == ["x", "y", "z"]
  assert classifier.load_classifier(path, multilabel=False).multilabel is False  # --multiclass
  (tmp_path / "labels.txt").write_text("p\nq\nr\n")
  assert classifier.load_classifier(path, labels_path=str(tmp_path / "labels.txt")).class_names == [
    "p",
    "q",
    "r",
  ]
  (tmp_path / "m.head.json").write_text("{")
  with pytest.raises(errors.DataError, match=r"m\.head\.json: not a head record"):
    classifier.load_classifier(path)
  (tmp_path / "m.head.json").write_text('{"head": "sigmoid", "class_names": ["a"]}')
  with pytest.raises(errors.DataError, match="1 class names for a head of 3 classes"):
    classifier.load_classifier(path)
  with pytest.raises(errors.ConfigError, match="threshold 2.0 is not a probability"):
    classifier.load_classifier(path, labels_path=str(tmp_path / "labels.txt"), threshold=2.0)
  with pytest.raises(SystemExit):  # one or the other
    cli.build_parser().parse_args(["predict", "--checkpoint", path, "--multilabel", "--multiclass"])


def test_the_readme_lists_every_command():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  block = readme.split("## Command line", 1)[1].split("```", 2)[1]
  listed = set(re.findall(r"^vit-jax (\w+)", block, flags=re.M))
  assert listed == set(cli.COMMANDS)


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_the_listing_quietly():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    [sys.executable, "-m", "vit_jax.cli", "checkpoints"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    env=env,
  )
  assert proc.stdout.readline().startswith(b"name ")
  proc.stdout.close()  # as `| head -1` does
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=60) in (0, 1) and "Traceback" not in err, err
