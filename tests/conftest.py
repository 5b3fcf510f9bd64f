"""Test setup: CPU JAX, quiet TensorFlow, exact float32 matmuls for comparisons."""

import http
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# Compiled programs are shared by every process of the suite (this one, the `vit-jax` commands
# the tests start, pytest-xdist's workers) through JAX's persistent cache: the same tiny models
# are compiled by many tests. .ci/run keeps the cache between runs; elsewhere it lives in the
# temporary directory. Nothing is written to the user's ~/.cache (test_cli checks that cache in
# a directory of its own).
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"vit-jax-test-jax-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))
# The commands' --dtype auto takes bf16 on AMX CPUs: the tests compare with float32 results
# on every CPU, and the dtype tests ask for what they check.
os.environ["VIT_JAX_DTYPE"] = "float32"

# PyTorch's default build ships triton, whose import segfaults when TensorFlow has already
# loaded its libraries in the process (seen: a tf.image.resize, then `import transformers`,
# which imports triton through torch._dynamo). The parity and convert tests share the process
# with the others, so both are loaded first, where they are installed.
for _name in ("torch", "triton"):
  try:
    __import__(_name)
  except ImportError:
    pass
import jax  # noqa: E402

# Parity and equality checks compare float32 results; XLA:CPU's default is
# already fp32, "highest" makes that explicit on every backend.
jax.config.update("jax_default_matmul_precision", "highest")


import contextlib  # noqa: E402
import fcntl  # noqa: E402

import pytest  # noqa: E402

# With `-n 2` (pytest-xdist; pyproject's addopts give `--dist loadfile --no-loadscope-reorder`)
# each worker takes the next file when it is free and runs it whole, so a file's module
# fixtures are made once. The longest files go out first and the short ones fill in at the
# end (longest processing time first), so the two workers end within seconds of each other;
# in file order, or xdist's by number of tests, a long file left for last runs on alone.
# Seconds per file, measured with two workers on 2 cores of an AMD EPYC (2026-12-07); a
# stale figure only costs balance. Files not named follow, in their order.
_LONGEST_FIRST = {
  "test_train": 159,
  "test_hosts": 156,
  "test_benchmarks": 155,
  "test_gcs": 149,
  "test_hybrid": 127,
  "test_aot_search": 85,
  "test_export": 76,
  "test_demo": 68,
  "test_input_pipeline": 54,
  "test_registry": 53,
  "test_serve": 52,
  "test_models": 50,
  "test_multilabel": 41,
  "test_sharding": 35,
  "test_parity": 35,
  "test_training_parity": 33,
  "test_metrics": 29,
  "test_cli": 26,
  "test_fuzz": 25,
  "test_wheel": 25,
  "test_regularisation": 23,
  "test_fewshot": 22,
  "test_nnx": 22,
  "test_augment": 21,
  "test_aot": 21,
}


def pytest_collection_modifyitems(items):
  """The files in _LONGEST_FIRST's order; the tests of a file keep theirs (a stable sort)."""
  rank = {name: -seconds for name, seconds in _LONGEST_FIRST.items()}
  items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], 0))


@contextlib.contextmanager
def _turn(alone: bool):
  """Under pytest-xdist, a test marked `alone` runs while no other test does: it waits for the
  running ones to end, and new ones wait for it (a lock shared by the others and held by it
  alone, behind a turnstile so that it is not starved). One process needs no lock. The two
  files are kept, like the compilation cache, and shared by every suite this user runs."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    yield
    return
  base = os.path.join(tempfile.gettempdir(), f"vit-jax-tests-{os.getuid()}")
  with open(base + ".turnstile", "a") as turnstile, open(base + ".lock", "a") as lock:
    fcntl.flock(turnstile, fcntl.LOCK_EX)
    fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
    fcntl.flock(turnstile, fcntl.LOCK_UN)
    yield  # closing the file releases the lock


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item):
  """Setup, call and teardown, in the test's turn."""
  with _turn(alone=item.get_closest_marker("alone") is not None):
    return (yield)


@pytest.fixture(autouse=True)
def _library_logs_reach_caplog():
  """`cli.main` stops our logger's records at its own handler (a process runs one command);
  tests run many in one process, and caplog listens at the root."""
  yield
  logging.getLogger("vit_jax").propagate = True


import ckpt_fixtures  # noqa: E402


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
  procs = [
    subprocess.Popen(a, env=env, stdout=o, stderr=e, text=True)
    for a, (o, e) in zip(argvs, logs, strict=True)
  ]
  deadline = time.monotonic() + timeout
  try:
    while (
      any(p.poll() is None for p in procs)
      and not any(p.returncode for p in procs)
      and time.monotonic() < deadline
    ):
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
    __tracebackhide__ = True
    ports = iter(ports)
    for _ in range(attempts):
      port = next(ports, None) or _free_port()
      failed, hung, out = _run_all(argvs_for_port(port), env, timeout)
      if not failed and not hung:
        return out
      if not failed:
        pytest.fail(f"process {hung[0]} timed out after {timeout}s:\n{out[hung[0]][1][-3000:]}")
      taken = [
        out[i][1]
        for i in failed
        if "Address already in use" in out[i][1] and re.search(rf":{port}\b", out[i][1])
      ]
      if not taken:
        pytest.fail(f"process {failed[0]} failed:\n{out[failed[0]][1][-3000:]}")
    pytest.fail(f"the port was taken on all {attempts} tries:\n{taken[0][-3000:]}")

  return run


def _conditional_download(download):
  """The emulator's object download, with what real GCS adds and TensorStore relies on.

  TensorStore (Orbax's array store) re-reads an object with `ifGenerationNotMatch=G` and
  expects 304 when it is unchanged, and reads the generation from `x-goog-generation`. The
  emulator (2026.7.19) ignores the condition and sends no generation, so TensorStore stops
  with "Malformed StorageGeneration".
  """
  from gcp_storage_emulator.handlers import objects

  def wrapped(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except objects.NotFound:
      obj = None
    if obj is not None:
      generation = str(obj["generation"])
      response["x-goog-generation"] = generation
      response["x-goog-metageneration"] = str(obj["metageneration"])
      if request.query.get("ifGenerationNotMatch", [None])[0] == generation:
        response.status = http.HTTPStatus.NOT_MODIFIED
        return
      if request.query.get("ifGenerationMatch", [generation])[0] != generation:
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        return
    download(request, response, storage, *args, **kwargs)

  return wrapped


def _binary_safe_read_data(read_data):
  """The emulator's request body parser, with multipart uploads split byte-exactly.

  gcsfs uploads small files as multipart/related. The emulator (2026.7.19) parses those
  with the email package, which takes a body's last carriage return (0x0D) for part of the
  line break before the closing boundary and drops it: a file ending in that byte is
  stored one byte short (seen as a truncated TensorBoard record, 1 upload in 256).
  """
  from gcp_storage_emulator import server

  def part_of(raw: bytes) -> tuple[bytes, bytes]:
    """(headers, body) of one part, split off at the line break before its delimiter."""
    crlf = raw.startswith(b"\r\n")
    head, _, body = raw[2 if crlf else 1 :].partition(b"\r\n\r\n" if crlf else b"\n\n")
    return head, body[:-1] if crlf and body.endswith(b"\r") else body

  def read(request_handler, query):
    content_type = request_handler.headers.get("Content-Type") or ""
    if not content_type.startswith("multipart/related"):
      return read_data(request_handler, query)
    raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode()
    # A delimiter starts a line: "--BOUNDARY" inside a body is content.
    (_, meta), (media_head, media) = (
      part_of(p) for p in (b"\n" + raw).split(b"\n--" + boundary)[1:3]
    )
    media_type = re.search(rb"content-type:\s*([^\r\n;]+)", media_head, re.IGNORECASE)
    return {
      "meta": json.loads(meta),
      "content": media,
      "content-type": media_type.group(1).decode() if media_type else "application/octet-stream",
    }

  return read


class GcsEmulator:
  """An in-memory GCS (gcp-storage-emulator) on a free localhost port."""

  def __init__(self):
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    if not hasattr(server, "emulator_read_data"):
      server.emulator_read_data = server._read_data
      server._read_data = _binary_safe_read_data(server.emulator_read_data)
    if not hasattr(objects, "emulator_download"):
      objects.emulator_download = objects.download
      # objects.get calls the module's `download` for ?alt=media; the /download routes hold it.
      objects.download = _conditional_download(objects.emulator_download)
      for _, handlers in server.HANDLERS:
        if handlers.get("GET") is objects.emulator_download:
          handlers["GET"] = objects.download
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # one line per 404
    self._server = server.create_server("127.0.0.1", 0, in_memory=True)
    self._server.start()
    self.port = self._server._api._httpd.server_address[1]
    self.endpoint = f"http://127.0.0.1:{self.port}"
    self._buckets = 0

  def bucket(self) -> str:
    """A new empty bucket, as a gs:// URL."""
    import fsspec

    self._buckets += 1
    name = f"bucket{self._buckets}"
    fsspec.filesystem("gs").mkdir(name)
    return f"gs://{name}"

  def stop(self) -> None:
    """Stops answering (connections are refused); the stored objects are kept."""
    self._server.stop()

  def restart(self) -> None:
    """Answers again on the same port, with the objects it held."""
    from gcp_storage_emulator.server import APIThread

    server = self._server
    server._api = APIThread("127.0.0.1", self.port, server._storage)
    server.start()


_STORAGE_VARS = (
  "STORAGE_EMULATOR_HOST",
  "TENSORSTORE_GCS_HTTP_URL",
  "GOOGLE_AUTH_TOKEN_FOR_TESTING",
  "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
  "EPATH_USE_TF",
)


@pytest.fixture(scope="session")
def gcs_emulator():
  """The emulator that every gs:// access of this test session reaches, ours and subprocesses'.

  STORAGE_EMULATOR_HOST is the whole contract: vit_jax.platform.files derives the rest from it.
  """
  from vit_jax.platform import files

  saved = {k: os.environ.get(k) for k in _STORAGE_VARS}
  emulator = GcsEmulator()
  for k in _STORAGE_VARS:
    os.environ.pop(k, None)
  os.environ["STORAGE_EMULATOR_HOST"] = emulator.endpoint
  files.configure_storage()
  import gcsfs

  gcsfs.GCSFileSystem.clear_instance_cache()  # one made before would keep the real endpoint
  yield emulator
  emulator.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture
def gcs(gcs_emulator):
  """A new empty bucket on the emulator, as gs://BUCKET."""
  return gcs_emulator.bucket()
