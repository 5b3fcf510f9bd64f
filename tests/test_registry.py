"""Checkpoints by name: the registry, the download cache, and names wherever a path goes.

The bucket is stood in for by a local folder laid out like gs://vit_models (and by the
GCS emulator), holding files written in the original layout with random weights.
"""

import json
import os
import re
import subprocess
import sys
import zipfile

import ckpt_fixtures as cf
import data_fixtures as df
import pytest

from vit_jax import cli
from vit_jax import errors
from vit_jax.apps import classifier
from vit_jax.models import spec as spec_lib
from vit_jax.platform import files
from vit_jax.weights import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TI = "ViT-Ti_16/augreg+i1k-384"
R_TI = "R+ViT-Ti_16/augreg"


def spec_of(record: registry.Record) -> cf.Spec:
  """The fixture spec of a file as the registry describes it."""
  v = spec_lib.VARIANTS[record.model]
  return cf.Spec(
    hidden=v.hidden_size,
    mlp=v.mlp_dim,
    heads=v.num_heads,
    layers=v.num_layers,
    patch=v.patch_size,
    image_size=record.image_size,
    classes=record.num_classes,
    pre_logits=v.hidden_size if record.pre_logits else None,
    resnet=v.resnet_layers,
  )


def put(mirror, name: str, spec: cf.Spec | None = None) -> str:
  record = registry.lookup(name)
  path = os.path.join(mirror, *record.path.split("/"))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  cf.write_original(path, spec or spec_of(record))
  return path


@pytest.fixture
def mirror(tmp_path, monkeypatch):
  """A local folder laid out like the bucket, with two small files; a fresh cache."""
  root = tmp_path / "mirror"
  put(str(root), TI)
  put(str(root), R_TI)
  monkeypatch.setenv(registry.BASE_ENV, str(root))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  return root


def _cached(name):
  return os.path.join(registry.cache_dir(), *registry.lookup(name).path.split("/"))


def test_a_name_downloads_once_then_reads_the_cache(mirror, tmp_path):
  src = os.path.join(mirror, *registry.lookup(TI).path.split("/"))
  path = registry.resolve(TI)
  assert path == _cached(TI) and path.startswith(
    str(tmp_path / "cache" / "vit-jax" / "checkpoints")
  )
  assert open(path, "rb").read() == open(src, "rb").read()
  assert json.load(open(path + ".json"))["bytes"] == os.path.getsize(src)
  # The long AugReg name of the same file resolves to the same copy.
  long_name = "augreg/" + os.path.basename(src).removesuffix(".npz")
  assert registry.resolve(long_name) == path
  os.rename(src, src + ".gone")  # later uses never touch the mirror
  assert registry.resolve(TI) == path
  assert [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".part")] == []


def test_paths_are_left_alone(tmp_path):
  assert registry.resolve(str(tmp_path)) == str(tmp_path)
  assert registry.resolve("gs://bucket/x.npz") == "gs://bucket/x.npz"
  assert (
    registry.resolve("missing/file.npz") == "missing/file.npz"
  )  # the loader says "no such file"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_partial_or_corrupt_cached_copy_is_fetched_again(mirror, damage, caplog):
  path = registry.resolve(TI)
  good = open(path, "rb").read()
  if damage == "truncated":
    open(path, "wb").write(good[: len(good) // 2])
  else:  # same size, one byte changed inside an array: only the zip checksums tell
    with zipfile.ZipFile(path) as z:
      info = z.getinfo("Transformer/encoder_norm/scale.npy")
    bad = bytearray(good)
    bad[info.header_offset + 200] ^= 0xFF
    open(path, "wb").write(bytes(bad))
  assert registry.resolve(TI) == path
  assert open(path, "rb").read() == good
  assert "incomplete or corrupt; fetching it again" in caplog.text


def test_an_interrupted_download_leaves_nothing_behind(mirror, monkeypatch):
  def half_then_fail(src, out, total, what):
    out.write(b"PK" + b"\0" * (total // 2))
    raise ConnectionError("connection reset")

  monkeypatch.setattr(registry, "_copy", half_then_fail)
  with pytest.raises(ConnectionError):
    registry.resolve(TI)
  folder = os.path.dirname(_cached(TI))
  assert os.listdir(folder) == []  # no file at the final name, no temporary
  monkeypatch.undo()
  monkeypatch.setenv(registry.BASE_ENV, str(mirror))
  assert os.path.isfile(registry.resolve(TI))


def test_a_short_download_is_refused(mirror, monkeypatch):
  real = files.size
  monkeypatch.setattr(files, "size", lambda p: real(p) + 10)
  with pytest.raises(files.StorageError, match=r"downloaded \d+ of \d+ bytes; try again"):
    registry.resolve(TI)
  assert not os.path.exists(_cached(TI))


def test_a_mirror_file_holding_another_model_is_refused(mirror):
  put(
    str(mirror),
    TI,
    spec_of(registry.lookup(TI)).__class__(
      hidden=192, mlp=768, heads=3, layers=12, patch=16, image_size=224, classes=1000
    ),
  )
  with pytest.raises(
    errors.CheckpointError,
    match=rf"^{re.escape(TI)}: the file holds ViT-Ti_16 at 224 px "
    r"with 1000 classes; the registry says ViT-Ti_16 at 384 px",
  ):
    registry.resolve(TI)
  assert not os.path.exists(_cached(TI))


def test_unknown_names_suggest_the_nearest(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.main(["predict", "--checkpoint", "ViT-B16/i21k+i1k-224", "x.png"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
    "vit-jax predict: error: ViT-B16/i21k+i1k-224: no such file, and not a checkpoint name; "
    "nearest names: ViT-B_16/i21k+i1k-224, "
  )
  assert err[0].endswith(" (vit-jax checkpoints lists them)")
  with pytest.raises(errors.ConfigError, match="not an AugReg file name"):
    registry.lookup("augreg/B_16-whatever")


def test_augreg_file_names_parse_into_records():
  r = registry.lookup(
    "augreg/R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0"
    "--oxford_iiit_pet-steps_0k-lr_0.003-res_384"
  )
  assert (r.model, r.image_size, r.num_classes, r.pre_logits) == ("R26+ViT-S_32", 384, 37, False)
  fields = dict(r.fields)
  assert fields == {
    "name": "R26_S_32",
    "ds": "i21k",
    "epochs": "300",
    "lr": "0.001",
    "aug": "medium2",
    "wd": "0.03",
    "do": "0.0",
    "sd": "0.0",
    "adapt_ds": "oxford_iiit_pet",
    "steps": "0",
    "adapt_lr": "0.003",
    "res": "384",
  }
  up = registry.lookup("augreg/S_16-i1k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.1-sd_0.1")
  assert (up.model, up.image_size, up.num_classes) == ("ViT-S_16", 224, 1000)
  kitti = registry.lookup(
    "augreg/B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0"
    "--kitti-steps_2k-lr_0.01-res_224"
  )
  assert kitti.num_classes is None  # the source does not say: the file's head decides
  assert registry.lookup("ViT-B_16/augreg+i1k-384").top1 == 85.49


def test_the_docs_table_is_the_registrys():
  readme = open(os.path.join(ROOT, "docs", "checkpoints.md"), encoding="utf-8").read()
  block = readme.split("<!-- checkpoints:begin -->\n", 1)[1].split("\n<!-- checkpoints:end -->", 1)[
    0
  ]
  assert block == registry.markdown_table(), "regenerate it: vit-jax checkpoints --markdown"


def test_the_checkpoints_command(mirror, capsys):
  assert cli.main(["checkpoints", "--filter", "Ti_16"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].split()[:3] == ["name", "model", "px"]
  names = [line.split()[0] for line in out[1:-1]]
  assert names == ["ViT-Ti_16/augreg", TI, R_TI, "R+ViT-Ti_16/augreg+i1k-384"]
  registry.resolve(TI)
  assert cli.main(["checkpoints", "--json", "--filter", "Ti_16"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  by_name = {r["name"]: r for r in rows}
  assert by_name[TI]["cached"] is True and by_name["ViT-Ti_16/augreg"]["cached"] is False
  assert by_name[TI]["url"] == f"{mirror}/{registry.lookup(TI).path}"
  assert any(n.startswith("augreg/Ti_16-") for n in by_name)  # --json lists the long names too


@pytest.mark.slow
def test_names_work_wherever_a_checkpoint_path_goes(mirror, tmp_path, capsys):
  image = df.write_file(str(tmp_path / "img.png"), df.encode(df.class_image(0, 0, 40, 40)))
  assert cli.main(["predict", "--checkpoint", TI, "--json", image]) == 0
  row = json.loads(capsys.readouterr().out)
  assert len(row["predictions"]) == 5 and row["predictions"][0]["label"]  # ImageNet's names
  # A hybrid, read off its record's file: no --model needed.
  clf = classifier.load_classifier(R_TI)
  assert clf.model_name == "R+ViT-Ti_16" and clf.model.num_classes == 21843
  assert cli.main(["explain", "--checkpoint", TI, "--json", image]) == 0
  assert json.loads(capsys.readouterr().out)["grid"] == [24, 24]


@pytest.mark.slow
def test_names_in_train_eval_and_convert(mirror, tmp_path, capsys):
  from tests import test_train
  from vit_jax.training import evaluation
  from vit_jax.training import train

  df.write_digits(str(tmp_path / "digits"), range(3), size=32)
  config = test_train.tiny_config(
    str(tmp_path / "digits"),
    pretrained=TI,
    total_steps=10,
    eval_every=10,
    checkpoint_every=10,
    image_size=32,
  )
  config.model.update(
    dict(
      name="ViT-Ti_16",
      hidden_size=None,
      mlp_dim=None,
      num_heads=None,
      num_layers=None,
      patch_size=None,
    )
  )
  result = train.train_and_evaluate(config, str(tmp_path / "run"))  # 384 -> 32 px: posemb resized
  assert result["test"]["count"] > 0
  assert evaluation.evaluate(config, TI, "test")["count"] == result["test"]["count"]
  assert cli.main(["convert", TI, str(tmp_path / "hf")]) == 0
  assert os.path.isfile(tmp_path / "hf" / "config.json")


def test_a_mirror_bucket(gcs, tmp_path, monkeypatch):
  local = tmp_path / "local"
  src = put(str(local), TI)
  rel = registry.lookup(TI).path
  with files.atomic_write(f"{gcs}/mirror/{rel}") as f:
    f.write(open(src, "rb").read())
  monkeypatch.setenv(registry.BASE_ENV, f"{gcs}/mirror")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  path = registry.resolve(TI)
  assert open(path, "rb").read() == open(src, "rb").read()
  # A name the mirror lacks: one line naming the object.
  with pytest.raises(
    errors.MissingFileError,
    match=rf"^{re.escape(gcs)}/mirror/imagenet21k/ViT-B_16.npz: no such file$",
  ):
    registry.resolve("ViT-B_16/i21k")


@pytest.mark.slow
def test_every_file_family_loads_and_predict_takes_the_readme_name(tmp_path):
  """Full-size files of each family in a mirror: imagenet21k (pre_logits), imagenet21k+imagenet2012,
  sam, AugReg plain and hybrid; then the README's predict command, in a fresh process."""
  mirror = tmp_path / "mirror"
  names = ["ViT-B_32/i21k", "ViT-B_16/i21k+i1k-224", "ViT-B_32/sam", TI, R_TI]
  for name in names:
    put(str(mirror), name)
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XDG_CACHE_HOME=str(tmp_path / "cache"),
    **{registry.BASE_ENV: str(mirror)},
  )
  script = (
    "import sys; from vit_jax.apps import classifier\n"
    "for name in sys.argv[1:]:\n"
    "  c = classifier.load_classifier(name)\n"
    "  print(name, c.model_name, c.image_size, c.model.num_classes, c.model.representation_size)\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", script, *names], env=env, capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == [
    "ViT-B_32/i21k ViT-B_32 224 21843 768",
    "ViT-B_16/i21k+i1k-224 ViT-B_16 224 1000 None",
    "ViT-B_32/sam ViT-B_32 224 1000 None",
    f"{TI} ViT-Ti_16 384 1000 None",
    f"{R_TI} R+ViT-Ti_16 224 21843 None",
  ]
  image = df.write_file(str(tmp_path / "cat.png"), df.encode(df.class_image(1, 0, 300, 400)))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "vit_jax.cli",
      "predict",
      "--checkpoint",
      "ViT-B_16/i21k+i1k-224",
      image,
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines()[0] == image and len(proc.stdout.splitlines()) == 6


def test_an_http_mirror(tmp_path, monkeypatch):
  """VIT_JAX_CHECKPOINT_BASE may be an https:// URL (e.g. https://storage.googleapis.com/vit_models)."""
  import functools
  import http.server
  import threading

  local = tmp_path / "mirror"
  src = put(str(local), TI)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(local))
  handler.log_message = lambda *a, **k: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv(registry.BASE_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert open(registry.resolve(TI), "rb").read() == open(src, "rb").read()
    with pytest.raises(errors.MissingFileError, match="imagenet21k/ViT-B_16.npz: no such file"):
      registry.resolve("ViT-B_16/i21k")
  finally:
    server.shutdown()
