"""`vit-jax serve`'s HTTP app: an endpoint that classifies images, batching requests that arrive
together.

    POST /score    {"input_data": ["<base64 image, data: URI or http(s) URL>", ...], "top_k": 5}
                   -> [[{"label": ..., "score": ...}, ...], ...]  (one list per image, sorted)
    GET  /healthz  200 {"status": "ready"} once every batch size is compiled, 503 before
    GET  /metadata model name, image size, classes, labels, batch sizes, limits
    GET  /stats    requests, errors by status, images queued, requests in flight, and how
                   many images each model call held

The images of concurrent requests share one compiled call: a single worker
collects them for up to `max_wait_ms` or `max_batch` images, pads the batch to
the smallest compiled size that holds it, and runs the model in its own thread
while the event loop goes on accepting and decoding. Every size is compiled
before /healthz says ready, so no request compiles. Input that cannot be served
gets a 4xx with `{"error": "..."}` naming the input; see docs/bad_input.md.

At most `max_queue` images wait for the model (being fetched, decoded or
queued): a request that would put more there gets 503 with `Retry-After` at
once, so an accepted request waits for at most max_queue / max_batch + 1 model
calls and memory stays bounded under any load. URL inputs are fetched only
from public addresses unless `allow_private_urls`: the host is resolved once,
every address it resolves to is checked, and the connection goes to a checked
address (so a name that resolves differently the second time cannot reach
inside); redirects are followed by hand, each hop checked the same way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import copy
import io
import json
import logging
import re
import signal
import socket
import urllib.parse
from collections.abc import AsyncIterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
import uvicorn
import uvicorn.config
from fastapi import FastAPI
from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException

from vit_jax.apps import classifier
from vit_jax.apps.serving import protocol
from vit_jax.apps.serving.batcher import Batcher
from vit_jax.apps.serving.batcher import QueueFull
from vit_jax.apps.serving.protocol import Options
from vit_jax.apps.serving.protocol import RequestError
from vit_jax.apps.serving.urls import UrlFetcher
from vit_jax.data import preprocess

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)
_FIELDS = ("input_data", "top_k")


class _Server:
  """What the handlers share: the classifier and the options, readiness, the batcher, counters.

  One per app, as `app.state.server`; the handlers below are module functions that read it.
  """

  def __init__(self, clf: classifier.Classifier, options: Options):
    self.clf, self.options, self.sizes = clf, options, options.sizes
    self.status: str = "starting"
    self.error: str | None = None
    self.batcher: Batcher | None = None
    self.fetcher: UrlFetcher | None = None  # when URLs are allowed
    self.requests = 0
    self.in_flight = 0  # /score requests begun and not yet answered
    self.images = 0
    self.errors: collections.Counter[int] = collections.Counter()

  def run_batch(self, images: list[np.ndarray]) -> np.ndarray:
    return self.clf.probs(np.stack(images), self.sizes)

  def warm_up(self) -> None:
    # eval_resize imports TensorFlow on first use: pay that here, not in the first request.
    size = self.clf.image_size
    preprocess.eval_resize(np.zeros((size, size, 3), np.uint8), size)
    self.clf.compile_batches(self.sizes)

  def refuse(self, status: int, message: str, headers: Mapping[str, str] | None = None):
    """A counted error answer in the server's shape: {"error": message}."""
    self.errors[status] += 1
    return JSONResponse({"error": message}, status_code=status, headers=headers)

  def check_url(self, url: str, index: int) -> None:
    if not url.lower().startswith(("http://", "https://")):
      raise RequestError(400, f"input_data[{index}]: only http(s) URLs can be fetched")
    if not self.options.allow_urls:
      raise RequestError(
        400,
        f"input_data[{index}]: URL inputs are disabled on this server "
        "(send the image as base64, or start it with --allow-urls)",
      )
    try:
      parts = urllib.parse.urlsplit(url)
      if parts.port is not None and not 0 < parts.port < 65536:  # urlsplit accepts port 0
        raise ValueError(f"port {parts.port}")
    except ValueError as e:
      raise RequestError(400, f"input_data[{index}]: not a valid URL ({e})") from None
    if not parts.hostname:
      raise RequestError(400, f"input_data[{index}]: not a valid URL (no host)")

  def prepare(self, item: str | bytes, index: int) -> np.ndarray:
    data = _decode_base64(item, index) if isinstance(item, str) else item
    return _prepare(data, index, self.clf.image_size, self.options.max_pixels)

  async def score(self, request: Request) -> JSONResponse:
    options = self.options
    body = await protocol.read_limited(
      request.headers, request.stream(), options.max_body_bytes, "request body"
    )
    inputs, k = await asyncio.to_thread(_parse, body, options)  # a large body parses off the loop
    if k is None:
      query = request.query_params.get("top_k")
      k = options.top_k if query is None else _top_k(query, "query parameter")
    urls = [i for i, item in enumerate(inputs) if _URL.match(item)]
    for i in urls:
      self.check_url(inputs[i], i)
    # Places in the queue are held from here: what is fetched and decoded waits for the model too.
    with self.batcher.admit(len(inputs)) as ticket:
      fetched = await asyncio.gather(
        *(self.fetcher.fetch(inputs[i], i, options.max_body_bytes) for i in urls),
        return_exceptions=True,
      )
      _raise_first(fetched)
      items: list[str | bytes] = list(inputs)
      for i, data in zip(urls, fetched, strict=True):
        items[i] = data
      # Decoding and resizing run in threads, so the event loop goes on accepting; of several
      # bad inputs, the first in order is named.
      prepared = await asyncio.gather(
        *(asyncio.to_thread(self.prepare, item, i) for i, item in enumerate(items)),
        return_exceptions=True,
      )
      _raise_first(prepared)
      rows = await self.batcher.classify(prepared, ticket)
    self.images += len(rows)
    ranked = self.clf.rank(np.stack(rows), k)
    # A bare list, one ranked list per image: the managed endpoint's answer, which its
    # clients index directly.
    return JSONResponse(
      [[{"label": p["label"], "score": p["score"]} for p in preds] for preds in ranked]
    )

  def metadata(self) -> dict[str, Any]:
    clf, options = self.clf, self.options
    return {
      "model": clf.model_name,
      "image_size": clf.image_size,
      "dtype": clf.dtype,
      "num_classes": len(clf.class_names),
      "labels": clf.class_names,
      # A sigmoid head scores each class on its own; a softmax's scores sum to 1.
      "head": "sigmoid" if clf.multilabel else "softmax",
      "threshold": clf.threshold,
      "batch_sizes": list(self.sizes),
      "max_wait_ms": options.max_wait_ms,
      "top_k": options.top_k,
      "allow_urls": options.allow_urls,
      "allow_private_urls": options.allow_private_urls,
      "limits": {
        "max_body_bytes": options.max_body_bytes,
        "max_pixels": options.max_pixels,
        "max_images": options.max_images,
        "max_queue": options.max_queue,
      },
    }

  def stats(self) -> dict[str, Any]:
    sizes_seen = self.batcher.batch_sizes if self.batcher else collections.Counter()
    return {
      "status": self.status,
      "requests": self.requests,
      "images": self.images,
      "queued": self.batcher.waiting if self.batcher else 0,
      "in_flight": self.in_flight,
      "errors": {str(k): v for k, v in sorted(self.errors.items())},
      "batches": sum(sizes_seen.values()),
      "batch_sizes": {str(k): v for k, v in sorted(sizes_seen.items())},
    }


def _decode_base64(text: str, index: int) -> bytes:
  """The bytes of a base64 string (standard alphabet, padded; an optional data: URI prefix)."""
  text = _DATA_URI.sub("", text, count=1)
  try:
    return base64.b64decode("".join(text.split()), validate=True)
  except (binascii.Error, ValueError) as e:
    raise RequestError(400, f"input_data[{index}]: not valid base64 ({e})") from None


def _prepare(data: bytes, index: int, size: int, max_pixels: int) -> np.ndarray:
  """Encoded bytes to the model's input [S, S, 3], or a RequestError saying why not."""
  name = f"input_data[{index}]"
  try:  # the header alone tells the size: too many pixels is 413, not "not an image"
    with Image.open(io.BytesIO(data)) as im:
      width, height = im.size
  except Image.DecompressionBombError as e:
    raise RequestError(413, f"{name}: too many pixels ({e})") from None
  except Exception:
    width = height = 0  # unreadable: decode_rgb below says how
  if width * height > max_pixels:
    raise RequestError(413, f"{name}: {width}x{height} pixels is over the limit of {max_pixels}")
  try:
    rgb = preprocess.decode_rgb(data, name=name, max_pixels=max_pixels)
  except preprocess.ImageError as e:
    raise RequestError(400, str(e)) from None
  return preprocess.eval_resize(rgb, size)


def _top_k(value: Any, where: str) -> int:
  """A top_k from JSON or the query string: a positive integer."""
  if isinstance(value, str):
    with contextlib.suppress(ValueError):
      value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise RequestError(
      400, f"{where} top_k must be a positive integer, not {protocol.short(value)}"
    )
  return value


def _parse(body: bytes, options: Options) -> tuple[list[str], int | None]:
  """The inputs and top_k of a /score body, or a RequestError naming what is wrong."""
  try:
    payload = json.loads(body)
  except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
    raise RequestError(400, f"malformed JSON body ({str(e).splitlines()[0][:200]})") from None
  if not isinstance(payload, dict):
    raise RequestError(
      400, f"the body must be a JSON object with 'input_data', not a {type(payload).__name__}"
    )
  unknown = sorted(set(payload) - set(_FIELDS))
  if unknown:
    raise RequestError(
      400, f"unknown field {protocol.short(unknown[0])} (the fields are {', '.join(_FIELDS)})"
    )
  if "input_data" not in payload:
    raise RequestError(400, "missing field 'input_data': a list of base64 images or URLs")
  inputs = payload["input_data"]
  if not isinstance(inputs, list) or not inputs:
    raise RequestError(400, "'input_data' must be a non-empty list of base64 images or URLs")
  if len(inputs) > options.max_images:
    raise RequestError(
      422, f"{len(inputs)} images in one request is over the limit of {options.max_images}"
    )
  for i, item in enumerate(inputs):
    if not isinstance(item, str):
      raise RequestError(
        400, f"input_data[{i}]: expected a base64 string or URL, not {type(item).__name__}"
      )
  k = _top_k(payload["top_k"], "JSON") if "top_k" in payload else None
  return inputs, k


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
  """Starts the batcher and compiles every batch size in the background; stops them at exit."""
  server: _Server = app.state.server
  options, loop = server.options, asyncio.get_running_loop()
  # One thread for the model: warm-up first, then one batch at a time, in order.
  model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vit-jax-model")
  server.batcher = Batcher(
    server.run_batch,
    max(server.sizes),
    options.max_wait_ms / 1000,
    model_thread,
    max_queue=options.max_queue,
  )
  worker = asyncio.create_task(server.batcher.serve_forever())
  if options.allow_urls:
    server.fetcher = UrlFetcher(options)

  async def become_ready() -> None:
    try:
      await loop.run_in_executor(model_thread, server.warm_up)
    except Exception as e:
      log.exception("warm-up failed")
      server.status, server.error = "failed", f"{e.__class__.__name__}: {e}"
      return
    server.status = "ready"
    clf = server.clf
    log.info(
      "ready: %s, %dpx, %d classes, %s, batch sizes %s",
      clf.model_name,
      clf.image_size,
      len(clf.class_names),
      clf.dtype,
      list(server.sizes),
    )

  log.info("compiling batch sizes %s", list(server.sizes))
  ready = asyncio.create_task(become_ready())
  try:
    yield
  finally:
    for task in (ready, worker):
      task.cancel()
    await asyncio.gather(ready, worker, return_exceptions=True)
    if server.fetcher is not None:
      await server.fetcher.aclose()
    model_thread.shutdown(wait=False, cancel_futures=True)


def _server(request: Request) -> _Server:
  return request.app.state.server


async def _score(request: Request) -> JSONResponse:
  server = _server(request)
  server.requests += 1
  if server.status != "ready":
    raise RequestError(503, f"not ready: {server.error or 'compiling'}")
  batcher = server.batcher
  if batcher.full:  # refused before its body is read: a flood costs little
    raise QueueFull(None, batcher.waiting, server.options.max_queue, batcher.retry_after_s())
  server.in_flight += 1
  try:
    return await server.score(request)
  finally:
    server.in_flight -= 1


async def _healthz(request: Request) -> JSONResponse:
  server = _server(request)
  code = {"ready": 200, "starting": 503}.get(server.status, 500)
  body = {"status": server.status} | ({"error": server.error} if server.error else {})
  return JSONResponse(body, status_code=code)


async def _metadata(request: Request) -> dict[str, Any]:
  return _server(request).metadata()


async def _stats(request: Request) -> dict[str, Any]:
  return _server(request).stats()


async def _request_error(request: Request, e: RequestError) -> JSONResponse:
  return _server(request).refuse(e.status, e.message, e.headers)


async def _queue_full(request: Request, e: QueueFull) -> JSONResponse:
  return _server(request).refuse(503, str(e), {"Retry-After": str(e.retry_after_s)})


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
  # Unknown paths and methods, in the same shape.
  return _server(request).refuse(e.status_code, str(e.detail))


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
  log.error("internal error: %s: %s", e.__class__.__name__, e)
  return _server(request).refuse(500, f"internal error ({e.__class__.__name__})")


def create_app(clf: classifier.Classifier, options: Options | None = None) -> FastAPI:
  """The FastAPI application serving `clf`; compiles every batch size when it starts."""
  app = FastAPI(
    title="vit-jax", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None
  )
  app.state.server = _Server(clf, options or Options())
  app.add_api_route("/score", _score, methods=["POST"])
  app.add_api_route("/healthz", _healthz, methods=["GET"])
  app.add_api_route("/metadata", _metadata, methods=["GET"])
  app.add_api_route("/stats", _stats, methods=["GET"])
  app.add_exception_handler(RequestError, _request_error)
  app.add_exception_handler(QueueFull, _queue_full)
  app.add_exception_handler(HTTPException, _http_error)
  app.add_exception_handler(Exception, _internal_error)
  return app


def _raise_first(results: Sequence[Any]) -> None:
  """Re-raises the first exception among gathered results (by input order, not by time)."""
  for r in results:
    if isinstance(r, BaseException):
      raise r


def bind(host: str, port: int) -> socket.socket:
  """A listening TCP socket; port 0 picks a free one (read it off getsockname)."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError:
    sock.close()
    raise
  sock.listen(2048)
  return sock


def server(
  app: FastAPI, *, access_log: bool = True, log_level: str = "info", drain_timeout_s: float = 25.0
) -> uvicorn.Server:
  """A uvicorn server for `app`, logging in uvicorn's format; SIGTERM or Ctrl-C drains it."""
  log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
  log_config["loggers"][__name__] = {"handlers": ["default"], "level": "INFO", "propagate": False}
  # Draining: stop accepting, answer the requests in flight for at most drain_timeout_s (then
  # they are cancelled), shut the app down.
  config = uvicorn.Config(
    app,
    log_config=log_config,
    log_level=log_level,
    access_log=access_log,
    timeout_graceful_shutdown=drain_timeout_s,
  )
  return uvicorn.Server(config)


def run(
  app: FastAPI, sock: socket.socket, *, access_log: bool = True, drain_timeout_s: float = 25.0
) -> None:
  """Serves `app` on `sock` until SIGTERM or Ctrl-C, then drains and returns (the socket closed)."""
  srv = server(app, access_log=access_log, drain_timeout_s=drain_timeout_s)

  def interrupt(_signum, _frame):
    raise KeyboardInterrupt

  # uvicorn drains on SIGTERM as on Ctrl-C, then raises the signal again for the handler it
  # found: this one ends the run as Ctrl-C does, so a drained server exits 0, not killed by it.
  sigterm = signal.signal(signal.SIGTERM, interrupt)
  try:
    srv.run(sockets=[sock])
  except KeyboardInterrupt:  # uvicorn has shut down cleanly, then re-raised the signal
    pass
  finally:
    signal.signal(signal.SIGTERM, sigterm)
    sock.close()


def url_of(sock: socket.socket) -> str:
  """http://host:port of a bound socket."""
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
