"""The built wheel works outside the checkout: recipes by name, training and predicting.

The wheel is built from the checkout and installed without its dependencies into a new
virtual environment whose path also holds this environment's site-packages (as plain path
entries, so the editable install's import hook there is not loaded). The commands then run
from a directory outside the checkout, so `vit_jax` and its recipes can only come from the
wheel.
"""

import json
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import data_fixtures as df
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
  """(python, vit-jax script, the wheel) of a new venv with the wheel built from this checkout."""
  work = tmp_path_factory.mktemp("wheel")
  # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources, and stale
  # files in a build/ would end up in the wheel.
  src = work / "src"
  shutil.copytree(
    ROOT,
    src,
    ignore=shutil.ignore_patterns(
      ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache"
    ),
  )
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "-q",
      "-w",
      str(work / "dist"),
      str(src),
    ],
    check=True,
    cwd=work,
  )
  (wheel,) = (work / "dist").glob("vit_jax-*.whl")
  venv = work / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  py = venv / "bin" / "python"
  purelib = subprocess.run(
    [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  # This environment's packages (jax, flax, ...) as plain entries after the venv's own.
  ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
  pathlib.Path(purelib, "deps.pth").write_text("\n".join(sorted(ours)) + "\n")
  subprocess.run(
    [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
    check=True,
    cwd=work,
  )
  return str(py), str(venv / "bin" / "vit-jax"), wheel


def _run(cmd, cwd, **kw):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env.update(JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)


def test_the_wheel_ships_the_recipes_and_data(wheel_env):
  _, _, wheel = wheel_env
  names = set(zipfile.ZipFile(wheel).namelist())
  assert {
    "vit_jax/config/recipes/__init__.py",
    "vit_jax/config/recipes/tiny.py",
    "vit_jax/config/recipes/vit_b16_cifar10.py",
    "vit_jax/weights/imagenet2012_labels.txt",
  } <= names
  assert not any(n.startswith(("configs/", "tests/")) for n in names)


def test_train_and_predict_from_the_installed_wheel(wheel_env, tmp_path):
  py, exe, _ = wheel_env
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  where = _run(
    [
      py,
      "-c",
      "import vit_jax, vit_jax.config.recipes as r; print(vit_jax.__file__); print(r.names())",
    ],
    outside,
  )
  assert where.returncode == 0, where.stderr
  assert not where.stdout.splitlines()[0].startswith(str(ROOT)), "vit_jax came from the checkout"
  assert "tiny" in where.stdout

  version = _run([exe, "--version"], outside)
  assert version.returncode == 0, version.stderr
  assert version.stdout.startswith("vit-jax ") and "jax 0.12." in version.stdout

  help_text = _run([exe, "train", "--help"], outside)
  assert "vit_b16_cifar10" in help_text.stdout and "tiny" in help_text.stdout

  df.write_folder(
    str(tmp_path / "data"),
    {"train": {"a": 8, "b": 8}, "val": {"a": 4, "b": 4}, "test": {"a": 4, "b": 4}},
    size=(32, 32),
  )
  work = tmp_path / "run"
  train = _run(
    [
      exe,
      "train",
      "--config",
      "tiny",
      f"--config.folder={tmp_path / 'data'}",
      "--config.total_steps=3",
      "--config.eval_every=3",
      "--config.checkpoint_every=3",
      "--config.batch_size=8",
      "--config.eval_batch_size=8",
      "--workdir",
      str(work),
    ],
    outside,
  )
  assert train.returncode == 0, train.stderr[-3000:]
  assert (work / "final.npz").is_file() and (work / "labels.txt").read_text().split() == ["a", "b"]

  image = str(tmp_path / "data" / "test" / "b" / "0000.png")
  pred = _run(
    [
      exe,
      "predict",
      "--checkpoint",
      str(work / "final.npz"),
      "--labels",
      str(work / "labels.txt"),
      "--json",
      "--top-k",
      "2",
      image,
    ],
    outside,
  )
  assert pred.returncode == 0, pred.stderr[-3000:]
  (row,) = [json.loads(line) for line in pred.stdout.splitlines()]
  assert row["image"] == image
  assert sorted(p["label"] for p in row["predictions"]) == ["a", "b"]
  assert (
    abs(sum(p["score"] for p in row["predictions"]) - 1.0) < 1e-5
  )  # two classes: softmax sums to 1
