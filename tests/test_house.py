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


def test_an_alone_test_runs_while_no_other_does(monkeypatch, tmp_path):
  """conftest's turns under xdist: a test marked `alone` waits for the running ones, and the
  ones that come after it wait for it (here each `_turn` stands for a worker's test)."""
  import tempfile
  import threading
  import time

  import conftest

  monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # lock files of this test's own
  log = []

  def test(name, alone, hold):
    with conftest._turn(alone):
      log.append(f"{name} starts")
      time.sleep(hold)
      log.append(f"{name} ends")

  threads = [
    threading.Thread(target=test, args=("running", False, 0.5)),
    threading.Thread(target=test, args=("alone", True, 0.5)),
    threading.Thread(target=test, args=("next", False, 0.1)),
  ]
  for t in threads:
    t.start()
    time.sleep(0.1)  # in this order: running, then alone waiting, then next
  for t in threads:
    t.join(timeout=30)
  assert log == [
    "running starts",
    "running ends",
    "alone starts",
    "alone ends",
    "next starts",
    "next ends",
  ]
  # Two shared turns run together.
  log.clear()
  threads = [threading.Thread(target=test, args=(n, False, 0.3)) for n in ("a", "b")]
  for t in threads:
    t.start()
    time.sleep(0.05)
  for t in threads:
    t.join(timeout=30)
  assert log == ["a starts", "b starts", "a ends", "b ends"]
