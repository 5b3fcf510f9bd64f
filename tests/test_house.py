"""The house rules .ci/run checks, also run by the test command: the layers and ruff."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*argv):
  tool = shutil.which(argv[0])
  if tool is None:
    pytest.fail(f"{argv[0]} is not installed: pip install -e '.[test]'")
  return subprocess.run([tool, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_imports_only_go_down_the_layers():
  r = _run("lint-imports", "--no-cache")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
  assert "0 broken" in r.stdout


def test_ruff_lint_and_format():
  lint = _run("ruff", "check", ".")
  assert lint.returncode == 0, lint.stdout[-3000:]
  fmt = _run("ruff", "format", "--check", ".")
  assert fmt.returncode == 0, fmt.stdout[-3000:]
