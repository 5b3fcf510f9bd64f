"""`vit-jax serve`: the real server on a localhost port, spoken to over HTTP."""
import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import dataclasses
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import pytest
from PIL import Image

import data_fixtures as df
from vit_jax import cli
from vit_jax import predict
from vit_jax import serve

# Small limits, so that every one of them is cheap to cross.
OPTIONS = serve.Options(max_batch=8, max_wait_ms=10, max_body_bytes=256 << 10, max_pixels=100_000,
                        max_images=8)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Image files of several formats and modes, by name."""
  d = tmp_path_factory.mktemp("img")
  out = df.write_mode_images(str(d), seed=1)
  big = Image.new("RGB", (400, 400), (10, 200, 30))  # 160,000 pixels: over the limit
  big.save(d / "big.png")
  out["big.png"] = str(d / "big.png")
  return out


def b64(path: str) -> str:
  with open(path, "rb") as f:
    return base64.b64encode(f.read()).decode()


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
  """Polls /healthz until it answers 200."""
  deadline = time.monotonic() + timeout
  while True:
    with contextlib.suppress(httpx.TransportError):
      if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
        return
    assert time.monotonic() < deadline, "the server did not become ready"
    assert proc is None or proc.poll() is None, proc.stderr.read()
    time.sleep(0.1)


@contextlib.contextmanager
def running(app, wait: bool = True):
  """Serves `app` on a free 127.0.0.1 port from a thread; yields its URL (once ready, if `wait`)."""
  sock = serve.bind("127.0.0.1", 0)
  server = serve.server(app, access_log=False, log_level="warning")
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  url = serve.url_of(sock)
  try:
    if wait:
      wait_ready(url)
    yield url
  finally:
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def clf(imagenet_ckpt):
  return predict.load_classifier(imagenet_ckpt)


@pytest.fixture(scope="module")
def url(clf):
  with running(serve.create_app(clf, OPTIONS)) as u:
    yield u


def test_scores_equal_predict_on_the_same_files(url, imagenet_ckpt, images):
  names = ["rgb.jpg", "gray.png", "palette.png", "alpha.png", "cmyk.jpg", "pic.bmp"]
  paths = [images[n] for n in names]
  inputs = [b64(p) for p in paths]
  inputs[1] = "data:image/png;base64," + inputs[1]  # a data: URI is accepted too
  r = httpx.post(f"{url}/score", json={"input_data": inputs, "top_k": 4}, timeout=30)
  assert r.status_code == 200, r.text
  got = r.json()
  assert isinstance(got, list), "the managed endpoint's format: a bare list, one list per image"
  # What `vit-jax predict` computes, with its own classifier, batch size and padding.
  want = list(predict.classify_files(predict.load_classifier(imagenet_ckpt, batch_size=4), paths, k=4))
  assert len(got) == len(want) == len(paths)
  for g, w in zip(got, want):
    assert [p["label"] for p in g] == [p["label"] for p in w.predictions]
    assert all(set(p) == {"label", "score"} for p in g)
    # Other programs (the server's batch, softmax compiled in): a probability's relative error
    # is at most twice the logits' absolute error, 2 * 1.5e-5 * 3.8 (largest logit; see
    # test_cli's predict test) = 1.1e-4, so 5.7e-6 on these scores of at most 0.05.
    # Measured: 6.7e-8.
    np.testing.assert_allclose([p["score"] for p in g], [p["score"] for p in w.predictions],
                               rtol=0, atol=1e-5)
    assert [p["score"] for p in g] == sorted((p["score"] for p in g), reverse=True)
  # top_k from the query string; the JSON field wins over it.
  r = httpx.post(f"{url}/score?top_k=2", json={"input_data": inputs[:1]}, timeout=30)
  assert len(r.json()[0]) == 2
  r = httpx.post(f"{url}/score?top_k=2", json={"input_data": inputs[:1], "top_k": 3}, timeout=30)
  assert len(r.json()[0]) == 3


def test_healthz_and_metadata(url):
  assert httpx.get(f"{url}/healthz").json() == {"status": "ready"}
  meta = httpx.get(f"{url}/metadata").json()
  assert meta["image_size"] == 32 and meta["num_classes"] == 1000 and len(meta["labels"]) == 1000
  assert meta["labels"][0] == "tench, Tinca tinca" and meta["model"] == "custom"
  assert meta["batch_sizes"] == [1, 2, 4, 8] and meta["allow_urls"] is False
  assert meta["limits"] == {"max_body_bytes": 256 << 10, "max_pixels": 100_000, "max_images": 8}


async def _load(url: str, bodies: list[dict], clients: int) -> tuple[list[float], list[str]]:
  """Sends every body from `clients` concurrent connections; latencies (s) and failures."""
  latencies, failures = [], []
  pending = iter(bodies)

  async def client(http: httpx.AsyncClient) -> None:
    for body in pending:  # the clients share one iterator: each body is sent once
      start = time.perf_counter()
      try:
        r = await http.post(f"{url}/score", json=body)
        if r.status_code != 200 or len(r.json()) != len(body["input_data"]):
          failures.append(f"{r.status_code} {r.text[:200]}")
      except httpx.HTTPError as e:
        failures.append(repr(e))
      latencies.append(time.perf_counter() - start)

  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(timeout=60, limits=limits) as http:
    await asyncio.gather(*(client(http) for _ in range(clients)))
  return latencies, failures


def _stats(url: str) -> dict:
  return httpx.get(f"{url}/stats").json()


def _new_batches(before: dict, after: dict) -> dict[int, int]:
  """{images held: model calls} between two /stats answers."""
  sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
  return {k: v for k, v in sorted(sizes.items()) if v}


def test_the_batcher_joins_requests_queued_during_a_call():
  """Requests that arrive while a call runs go into the next call together (no timing involved)."""
  started, release = threading.Event(), threading.Event()
  calls = []

  def run(images):
    calls.append(len(images))
    started.set()
    release.wait(60)  # the first call holds the worker until every other request is queued
    return [np.full(3, float(im[0, 0, 0])) for im in images]

  async def scenario():
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      batcher = serve.Batcher(run, max_batch=4, max_wait_s=0.0, executor=pool)
      worker = asyncio.create_task(batcher.serve_forever())
      image = lambda v: np.full((2, 2, 3), v, np.float32)
      first = asyncio.create_task(batcher.classify([image(0)]))
      await asyncio.to_thread(started.wait, 60)
      rest = [asyncio.create_task(batcher.classify([image(v) for v in vs]))
              for vs in ([1], [2, 3], [4], [5])]
      await asyncio.sleep(0)  # let every request queue its images
      release.set()
      out = await asyncio.gather(first, *rest)
      worker.cancel()
      return out

  out = asyncio.run(scenario())
  # Queued together: 1, 2, 3, 4 fill one call of max_batch = 4; 5 is left for the next.
  assert calls == [1, 4, 1]
  assert [[float(r[0]) for r in rows] for rows in out] == [[0.0], [1.0], [2.0, 3.0], [4.0], [5.0]]


def test_concurrent_requests_share_model_calls_and_never_compile(url, clf, images):
  compiles = []
  listener = lambda event, secs, **kw: compiles.append(kw) if event == COMPILE_EVENT else None
  cached = clf._probs._cache_size()  # pylint: disable=protected-access
  one = b64(images["rgb.jpg"])
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    # One image per request: a model call that holds several served several requests.
    before = _stats(url)
    latencies, failures = asyncio.run(_load(url, [{"input_data": [one]}] * 128, clients=16))
    assert not failures and len(latencies) == 128
    sizes = _new_batches(before, _stats(url))
    # Whether calls held several requests depends on scheduling here: that the batcher joins
    # requests that wait together is test_the_batcher_joins_requests_queued_during_a_call.
    assert sum(n * c for n, c in sizes.items()) == 128
    # 1 to max_images images per request: every compiled size, and batches spanning requests.
    before = _stats(url)
    bodies = [{"input_data": [one] * (1 + i % OPTIONS.max_images)} for i in range(64)]
    latencies, failures = asyncio.run(_load(url, bodies, clients=16))
    assert not failures and len(latencies) == 64
    sizes = _new_batches(before, _stats(url))
    assert sum(n * c for n, c in sizes.items()) == sum(len(b["input_data"]) for b in bodies)
    assert max(sizes) <= OPTIONS.max_batch
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  # Nothing compiled while serving: no backend compile at all, and no new jit cache entry.
  assert compiles == []
  assert clf._probs._cache_size() == cached == len(OPTIONS.sizes)  # pylint: disable=protected-access


def test_healthz_says_ready_only_after_warm_up(clf, images):
  gate = threading.Event()

  class Slow(predict.Classifier):
    def compile_batches(self, sizes):
      assert gate.wait(60)
      super().compile_batches(sizes)

  class Broken(predict.Classifier):
    def compile_batches(self, sizes):
      raise MemoryError("out of memory")

  fields = {f.name: getattr(clf, f.name) for f in dataclasses.fields(clf)}
  body = {"input_data": [b64(images["rgb.jpg"])]}
  with running(serve.create_app(Slow(**fields), serve.Options(batch_sizes=(1,))), wait=False) as url:
    wait_until = time.monotonic() + 30
    while True:  # until the server accepts connections
      with contextlib.suppress(httpx.TransportError):
        r = httpx.get(f"{url}/healthz")
        break
      assert time.monotonic() < wait_until
      time.sleep(0.05)
    assert (r.status_code, r.json()) == (503, {"status": "starting"})
    r = _post(url, json=body)
    assert (r.status_code, r.json()) == (503, {"error": "not ready: compiling"})
    gate.set()
    wait_ready(url)
    assert _post(url, json=body).status_code == 200
  with running(serve.create_app(Broken(**fields), serve.Options(batch_sizes=(1,))), wait=False) as url:
    time.sleep(0.5)
    for _ in range(100):
      with contextlib.suppress(httpx.TransportError):
        r = httpx.get(f"{url}/healthz")
        if r.status_code != 503:
          break
      time.sleep(0.1)
    assert (r.status_code, r.json()) == (500, {"status": "failed", "error": "MemoryError: out of memory"})
    assert _post(url, json=body).json() == {"error": "not ready: MemoryError: out of memory"}


def _post(url: str, **kw) -> httpx.Response:
  return httpx.post(f"{url}/score", timeout=30, **kw)


def test_every_bad_input_gets_a_4xx_naming_it_and_the_server_goes_on(url, images):
  good = b64(images["rgb.jpg"])
  with open(images["rgb.jpg"], "rb") as f:
    truncated = base64.b64encode(f.read()[:200]).decode()
  # (what is sent, expected status, a part of the message)
  cases = [
      (dict(content=b'{"input_data": ['), 400, "malformed JSON body"),
      (dict(content=b"\xff\xfe\x00garbage"), 400, "malformed JSON body"),
      (dict(content=b"[" * 100_000), 400, "malformed JSON body"),
      (dict(json=[good]), 400, "must be a JSON object"),
      (dict(json={"images": [good]}), 400, "unknown field 'images'"),
      (dict(json={}), 400, "missing field 'input_data'"),
      (dict(json={"input_data": []}), 400, "non-empty list"),
      (dict(json={"input_data": good}), 400, "non-empty list"),
      (dict(json={"input_data": [good, 7]}), 400, "input_data[1]: expected a base64 string or URL, not int"),
      (dict(json={"input_data": [good, "not base64!"]}), 400, "input_data[1]: not valid base64"),
      (dict(json={"input_data": [good, "abc"]}), 400, "input_data[1]: not valid base64 (Incorrect padding)"),
      (dict(json={"input_data": [base64.b64encode(b"hello").decode()]}), 400,
       "input_data[0]: not a readable image"),
      (dict(json={"input_data": [good, good, truncated]}), 400, "input_data[2]: not a readable image"),
      (dict(json={"input_data": [""]}), 400, "input_data[0]: not a readable image"),
      (dict(json={"input_data": [good, b64(images["big.png"])]}), 413,
       "input_data[1]: 400x400 pixels is over the limit of 100000"),
      (dict(json={"input_data": [good] * 9}), 422, "9 images in one request is over the limit of 8"),
      (dict(json={"input_data": ["x" * (300 << 10)]}), 413, "over the limit of 262144 bytes"),
      (dict(content=iter([b'{"input_data": ["', b"A" * (300 << 10), b'"]}'])), 413,  # chunked
       "request body is over the limit of 262144 bytes"),
      (dict(json={"input_data": [good, "http://127.0.0.1:9/x.png"]}), 400,
       "input_data[1]: URL inputs are disabled on this server"),
      (dict(json={"input_data": ["file:///etc/passwd"]}), 400, "input_data[0]: only http(s) URLs"),
      (dict(json={"input_data": [good], "top_k": 0}), 400, "top_k must be a positive integer"),
      (dict(json={"input_data": [good], "top_k": True}), 400, "top_k must be a positive integer"),
      (dict(json={"input_data": [good]}, params={"top_k": "five"}), 400, "top_k must be a positive"),
  ]
  for kwargs, status, message in cases:
    r = _post(url, **kwargs)
    assert r.status_code == status, (kwargs.get("json", kwargs.get("content")), r.text[:300])
    body = r.json()
    assert list(body) == ["error"] and message in body["error"], body
  # Not /score, or not POST: the same JSON shape.
  assert httpx.get(f"{url}/score").json() == {"error": "Method Not Allowed"}
  assert httpx.get(f"{url}/nothing-here").status_code == 404
  assert httpx.get(f"{url}/healthz").json() == {"status": "ready"}
  r = _post(url, json={"input_data": [good]})
  assert r.status_code == 200 and len(r.json()[0]) == 5
  errors = _stats(url)["errors"]
  assert errors["400"] >= 18 and errors["413"] >= 3 and errors["422"] >= 1


class _Files(http.server.SimpleHTTPRequestHandler):
  """Serves a directory; /slow answers after 3 s."""

  def do_GET(self):  # pylint: disable=invalid-name
    if self.path == "/slow":
      time.sleep(3)
    super().do_GET()

  def log_message(self, *args):  # quiet
    pass


def test_urls_are_fetched_only_when_allowed_with_a_timeout_and_a_size_cap(clf, images, tmp_path):
  for name in ("rgb.jpg", "pic.bmp"):
    shutil.copy(images[name], tmp_path / name)
  (tmp_path / "large.jpg").write_bytes(os.urandom(100_000))
  (tmp_path / "notes.txt").write_text("not an image")
  files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Files, directory=tmp_path))
  threading.Thread(target=files.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{files.server_address[1]}"
  options = serve.Options(batch_sizes=(1, 2), allow_urls=True, url_timeout_s=1, max_body_bytes=64 << 10)
  try:
    with running(serve.create_app(clf, options)) as url:
      from_url = _post(url, json={"input_data": [f"{base}/rgb.jpg", b64(images["gray.png"])]})
      from_b64 = _post(url, json={"input_data": [b64(images["rgb.jpg"]), b64(images["gray.png"])]})
      assert from_url.status_code == 200, from_url.text
      assert from_url.json() == from_b64.json()
      for item, status, message in [
          (f"{base}/missing.png", 400, "answered HTTP 404"),
          (f"{base}/large.jpg", 413, "over the limit of 65536"),
          (f"{base}/slow", 400, "cannot fetch"),
          ("http://127.0.0.1:1/x.png", 400, "cannot fetch"),
          ("http://127.0.0.1:99999/x.png", 400, "input_data[1]: not a valid URL (Port out of range"),
          ("http:///x.png", 400, "input_data[1]: not a valid URL (no host)"),
          (f"{base}/notes.txt", 400, "input_data[1]: not a readable image"),
      ]:
        r = _post(url, json={"input_data": [b64(images["rgb.jpg"]), item]})
        assert r.status_code == status and message in r.json()["error"], r.text
      assert _post(url, json={"input_data": [f"{base}/pic.bmp"]}).status_code == 200
  finally:
    files.shutdown()
    files.server_close()


def test_serve_options_are_checked(capsys, imagenet_ckpt):
  for flags, message in [(["--max-batch", "0"], "max_batch must be at least 1"),
                         (["--batch-sizes", "1,x"], "--batch-sizes 1,x: expected integers"),
                         (["--max-pixels", "0"], "max_pixels must be at least 1")]:
    assert cli.main(["serve", "--checkpoint", imagenet_ckpt, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_command_serves_1000_requests_from_16_clients_then_stops_on_ctrl_c(imagenet_ckpt, images, capsys):
  """The load test, against `vit-jax serve` in its own process (the clients' Python is not its)."""
  exe = os.path.join(os.path.dirname(sys.executable), "vit-jax")
  proc = subprocess.Popen([exe, "serve", "--checkpoint", imagenet_ckpt, "--port", "0", "--max-batch", "8",
                           "--max-wait-ms", "10", "--no-access-log"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    line = proc.stdout.readline()
    assert " listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
    url = line.split(" listening on ")[1].split()[0]
    wait_ready(url, proc)
    inputs = [b64(images[n]) for n in ("rgb.jpg", "gray.png", "pic.bmp", "palette.png")]
    bodies = [{"input_data": [inputs[i % len(inputs)]]} for i in range(1000)]
    # Unmeasured: the first requests start the server's decoding threads and connections.
    assert asyncio.run(_load(url, bodies[:64], clients=16))[1] == []
    before = _stats(url)
    start = time.perf_counter()
    latencies, failures = asyncio.run(_load(url, bodies, clients=16))
    elapsed = time.perf_counter() - start
    assert failures == [] and len(latencies) == 1000
    after = _stats(url)
    sizes = _new_batches(before, after)
    assert after["images"] - before["images"] == sum(n * c for n, c in sizes.items()) == 1000
    assert after["errors"] == {}
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    with capsys.disabled():
      print(f"\nserve load: 1000 requests from 16 clients in {elapsed:.1f} s ({1000 / elapsed:.0f}/s), "
            f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; model calls by images held: {sizes}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, err
  assert out.strip().endswith("vit-jax serve: stopped") and "Shutting down" in err
