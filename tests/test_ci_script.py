""".ci/run picks a Python >= 3.12 by itself, or stops with one line saying what to install."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CI = ROOT / ".ci" / "run"


def _fake_python(path: pathlib.Path, version: tuple[int, int]) -> str:
  """A `python` that answers the version check the script makes, as that version would."""
  path.write_text(
    f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.exit({version} < (3, 12))'\n"
  )
  path.chmod(0o755)
  return str(path)


def _which(bin_dir: pathlib.Path, **env):
  # PATH is only this folder: the fake interpreters and the few tools the script calls, so no
  # Python or pyenv of the machine's can answer.
  for tool in ("dirname", "grep", "sort"):
    if not (bin_dir / tool).exists():
      (bin_dir / tool).symlink_to(shutil.which(tool))
  path = str(bin_dir)
  clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYENV", "VIT_JAX_PYTHON"))}
  return subprocess.run(
    [shutil.which("bash"), str(CI), "--which-python"],
    capture_output=True,
    text=True,
    env=dict(clean, PATH=path, **env),
    timeout=60,
  )


@pytest.fixture
def bin_dir(tmp_path):
  d = tmp_path / "bin"
  d.mkdir()
  return d


def test_prefers_python312_over_an_old_python3(bin_dir):
  _fake_python(bin_dir / "python3", (3, 11))
  want = _fake_python(bin_dir / "python3.12", (3, 12))
  r = _which(bin_dir)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == want


def test_vit_jax_python_wins(bin_dir):
  _fake_python(bin_dir / "python3.12", (3, 12))
  mine = _fake_python(bin_dir / "mypython", (3, 13))
  r = _which(bin_dir, VIT_JAX_PYTHON=mine)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == mine


def test_no_new_enough_python_is_one_line_saying_what_to_install(bin_dir):
  _fake_python(bin_dir / "python3", (3, 11))
  old = _fake_python(bin_dir / "old", (3, 10))
  r = _which(bin_dir, VIT_JAX_PYTHON=old)
  assert r.returncode == 2 and r.stdout == ""
  (line,) = r.stderr.strip().splitlines()
  assert "no Python >= 3.12" in line and "install Python 3.12" in line
