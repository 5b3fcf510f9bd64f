"""Test setup: CPU JAX, quiet TensorFlow, exact float32 matmuls for comparisons."""
import os
import re
import socket
import subprocess
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# The `vit-jax` command keeps compiled programs in ~/.cache; the tests compile afresh and
# write nothing there (test_cli checks the cache in a directory of its own).
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

# PyTorch's default build ships triton, whose import segfaults when TensorFlow has already
# loaded its libraries in the process (seen: a tf.image.resize, then `import transformers`,
# which imports triton through torch._dynamo). The parity and convert tests share the process
# with the others, so both are loaded first, where they are installed.
for _name in ("torch", "triton"):
  try:
    __import__(_name)
  except ImportError:
    pass
import jax  # noqa: E402  pylint: disable=wrong-import-position

# Parity and equality checks compare float32 results; XLA:CPU's default is
# already fp32, "highest" makes that explicit on every backend.
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402  pylint: disable=wrong-import-position

import ckpt_fixtures  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="session")
def imagenet_ckpt(tmp_path_factory):
  """A tiny model with a 1000-class head (so ImageNet labels apply), in the original layout."""
  path = tmp_path_factory.mktemp("ckpt") / "tiny1000.npz"
  ckpt_fixtures.write_original(path, ckpt_fixtures.Spec(classes=1000, image_size=32))
  return str(path)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_all(argvs, env, timeout):
  """Runs the processes together; on the first failure kills the rest (they would wait for it).

  Returns the indices of those that failed, of those still running at the timeout, and the
  [(stdout, stderr)] of all.
  """
  logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in argvs]
  procs = [subprocess.Popen(a, env=env, stdout=o, stderr=e, text=True) for a, (o, e) in zip(argvs, logs)]
  deadline = time.monotonic() + timeout
  try:
    while (any(p.poll() is None for p in procs) and not any(p.returncode for p in procs)
           and time.monotonic() < deadline):
      time.sleep(0.1)
    failed = [i for i, p in enumerate(procs) if p.returncode]
    hung = [i for i, p in enumerate(procs) if p.returncode is None]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = []
  for o, e in logs:
    with o, e:
      o.seek(0)
      e.seek(0)
      out.append((o.read(), e.read()))
  return failed, hung, out


@pytest.fixture(scope="session")
def run_on_free_port():
  """run(argvs_for_port, env=, timeout=) -> [(stdout, stderr)] of processes that share a port.

  The port is free when picked but must be closed again for a child to bind it, and another
  program may take it meanwhile: when a child fails saying so ("Address already in use" and
  the port), all are killed and started again on a new port, a few times. Any other failure,
  or a timeout, fails the test at once. `ports` are tried first (to test the retry).
  """
  def run(argvs_for_port, *, env, timeout, ports=(), attempts=3):
    __tracebackhide__ = True  # pylint: disable=unused-variable
    ports = iter(ports)
    for _ in range(attempts):
      port = next(ports, None) or _free_port()
      failed, hung, out = _run_all(argvs_for_port(port), env, timeout)
      if not failed and not hung:
        return out
      if not failed:
        pytest.fail(f"process {hung[0]} timed out after {timeout}s:\n{out[hung[0]][1][-3000:]}")
      taken = [out[i][1] for i in failed
               if "Address already in use" in out[i][1] and re.search(rf":{port}\b", out[i][1])]
      if not taken:
        pytest.fail(f"process {failed[0]} failed:\n{out[failed[0]][1][-3000:]}")
    pytest.fail(f"the port was taken on all {attempts} tries:\n{taken[0][-3000:]}")
  return run


class _GsInRam:
  """tf.io.gfile with gs://BUCKET/... kept at ram://gs/BUCKET/...: gs:// paths run offline."""

  def __init__(self, gfile):
    self._gfile, self.paths = gfile, set()

  def __getattr__(self, name):
    def call(*args, **kw):
      urls = [a for a in args if isinstance(a, str) and "://" in a]
      self.paths.update(urls)
      args = [a.replace("gs://", "ram://gs/", 1) if a in urls else a for a in args]
      return getattr(self._gfile, name)(*args, **kw)
    return call


@pytest.fixture
def gs_in_ram(monkeypatch):
  """() -> the gfile stand-in that vit_jax.files now uses: gs:// served from TF's ram://.

  `.paths` holds every URL the project handed to it.
  """
  def install():
    from vit_jax import files, tf_setup  # pylint: disable=import-outside-toplevel
    gfile = _GsInRam(tf_setup.tf().io.gfile)
    monkeypatch.setattr(files, "_gfile", lambda: gfile)
    return gfile
  return install
