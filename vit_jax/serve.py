"""`vit-jax serve`: an HTTP endpoint that classifies images, batching requests that arrive together.

    POST /score    {"input_data": ["<base64 image, data: URI or http(s) URL>", ...], "top_k": 5}
                   -> [[{"label": ..., "score": ...}, ...], ...]  (one list per image, sorted)
    GET  /healthz  200 {"status": "ready"} once every batch size is compiled, 503 before
    GET  /metadata model name, image size, classes, labels, batch sizes, limits
    GET  /stats    requests, errors by status, and how many images each model call held

The images of concurrent requests share one compiled call: a single worker
collects them for up to `max_wait_ms` or `max_batch` images, pads the batch to
the smallest compiled size that holds it, and runs the model in its own thread
while the event loop goes on accepting and decoding. Every size is compiled
before /healthz says ready, so no request compiles. Input that cannot be served
gets a 4xx with `{"error": "..."}` naming the input; see docs/bad_input.md.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import io
import json
import logging
import re
import reprlib
import socket
import urllib.parse
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import httpx
import numpy as np
import uvicorn
import uvicorn.config
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException

from vit_jax import predict
from vit_jax import preprocess

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)
_FIELDS = ("input_data", "top_k")
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 100


@dataclasses.dataclass(frozen=True)
class Options:
  """What a server accepts and how it batches; every limit is a command-line flag."""
  top_k: int = 5
  max_batch: int = 16
  batch_sizes: tuple[int, ...] = ()  # empty: powers of two up to max_batch
  max_wait_ms: float = 5.0
  max_body_bytes: int = 16 << 20
  max_pixels: int = 25_000_000
  max_images: int = 64
  allow_urls: bool = False
  url_timeout_s: float = 10.0

  def __post_init__(self):
    for name in ("top_k", "max_batch", "max_body_bytes", "max_pixels", "max_images"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
    if self.max_wait_ms < 0 or self.url_timeout_s <= 0:
      raise ValueError("max_wait_ms must be >= 0 and url_timeout_s > 0")
    if any(s < 1 for s in self.batch_sizes):
      raise ValueError(f"batch sizes must be at least 1: {self.batch_sizes}")

  @property
  def sizes(self) -> tuple[int, ...]:
    """The compiled batch sizes; the largest is the most images one model call holds."""
    return tuple(sorted(set(self.batch_sizes))) or predict.batch_sizes(self.max_batch)


class RequestError(Exception):
  """A request that cannot be served as sent: the HTTP status and what was wrong."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


class Batcher:
  """Gathers images from concurrent requests into batches for one compiled call at a time."""

  def __init__(self, run: Callable[[list[np.ndarray]], np.ndarray], max_batch: int,
               max_wait_s: float, executor: concurrent.futures.Executor):
    self._run = run
    self._max_batch = max_batch
    self._max_wait_s = max_wait_s
    self._executor = executor
    self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
    self.batch_sizes: collections.Counter[int] = collections.Counter()

  async def classify(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One row of the model's output per image, in order."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in images]
    for image, future in zip(images, futures):
      self._queue.put_nowait((image, future))
    return list(await asyncio.gather(*futures))

  async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future]]:
    """The next batch: what is queued, plus what arrives within the wait bound, up to max_batch."""
    loop = asyncio.get_running_loop()
    items = [await self._queue.get()]
    deadline = loop.time() + self._max_wait_s
    while len(items) < self._max_batch:
      if not self._queue.empty():
        items.append(self._queue.get_nowait())
        continue
      left = deadline - loop.time()
      if left <= 0:
        break
      try:
        items.append(await asyncio.wait_for(self._queue.get(), left))
      except TimeoutError:
        break
    return items

  async def serve_forever(self) -> None:
    """The worker: collect a batch, run it off the event loop, hand each request its rows."""
    loop = asyncio.get_running_loop()
    while True:
      # A request whose client went away has cancelled its futures: skip its images.
      items = [(im, f) for im, f in await self._collect() if not f.done()]
      if not items:
        continue
      try:
        rows = await loop.run_in_executor(self._executor, self._run, [im for im, _ in items])
      except Exception as e:  # pylint: disable=broad-except
        # A failed call fails its requests (500), never the worker.
        log.exception("model call on %d images failed", len(items))
        for _, future in items:
          if not future.done():
            future.set_exception(e)
        continue
      self.batch_sizes[len(items)] += 1
      for (_, future), row in zip(items, rows):
        if not future.done():
          future.set_result(row)


@dataclasses.dataclass
class _State:
  """What the handlers share: readiness, the batcher, counters."""
  status: str = "starting"
  error: str | None = None
  batcher: Batcher | None = None
  http: httpx.AsyncClient | None = None  # when URLs are allowed
  requests: int = 0
  images: int = 0
  errors: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)


def _short(value: Any) -> str:
  """A client's value quoted in an error message: a one-line repr of bounded length."""
  return _REPR.repr(value)


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
  except Exception:  # pylint: disable=broad-except
    width = height = 0  # unreadable: decode_rgb below says how
  if width * height > max_pixels:
    raise RequestError(413, f"{name}: {width}x{height} pixels is over the limit of {max_pixels}")
  try:
    rgb = preprocess.decode_rgb(data, name=name, max_pixels=max_pixels)
  except preprocess.ImageError as e:
    raise RequestError(400, str(e)) from None
  return preprocess.eval_resize(rgb, size)


async def _fetch(http: httpx.AsyncClient, url: str, index: int, max_bytes: int) -> bytes:
  """The body at an http(s) URL, at most max_bytes, or a RequestError saying why not."""
  name = f"input_data[{index}]"
  try:
    async with http.stream("GET", url) as response:
      if response.status_code != 200:
        raise RequestError(400, f"{name}: GET {_short(url)} answered HTTP {response.status_code}")
      return await _read_limited(response.headers, response.aiter_bytes(), max_bytes,
                                 f"{name}: {_short(url)}")
  except RequestError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Whatever a client's URL makes the HTTP client raise (a bad port or host name ends in
    # InvalidURL, ExceptionGroup, OSError, ...) is the client's bad input.
    raise RequestError(400, f"{name}: cannot fetch {_short(url)} "
                            f"({e.__class__.__name__}: {_short(str(e))})") from None


async def _read_limited(headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int,
                        what: str) -> bytes:
  """A request or response body, refused with 413 as soon as it is known to be over `limit` bytes."""
  declared = headers.get("content-length")
  if declared and declared.isdigit() and int(declared) > limit:
    raise RequestError(413, f"{what} of {declared} bytes is over the limit of {limit} bytes")
  parts, total = [], 0
  async for chunk in chunks:
    total += len(chunk)
    if total > limit:
      raise RequestError(413, f"{what} is over the limit of {limit} bytes")
    parts.append(chunk)
  return b"".join(parts)


def _top_k(value: Any, where: str) -> int:
  """A top_k from JSON or the query string: a positive integer."""
  if isinstance(value, str):
    with contextlib.suppress(ValueError):
      value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise RequestError(400, f"{where} top_k must be a positive integer, not {_short(value)}")
  return value


def _parse(body: bytes, options: Options) -> tuple[list[str], int | None]:
  """The inputs and top_k of a /score body, or a RequestError naming what is wrong."""
  try:
    payload = json.loads(body)
  except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
    raise RequestError(400, f"malformed JSON body ({str(e).splitlines()[0][:200]})") from None
  if not isinstance(payload, dict):
    raise RequestError(400, f"the body must be a JSON object with 'input_data', not a "
                            f"{type(payload).__name__}")
  unknown = sorted(set(payload) - set(_FIELDS))
  if unknown:
    raise RequestError(400, f"unknown field {_short(unknown[0])} (the fields are "
                            f"{', '.join(_FIELDS)})")
  if "input_data" not in payload:
    raise RequestError(400, "missing field 'input_data': a list of base64 images or URLs")
  inputs = payload["input_data"]
  if not isinstance(inputs, list) or not inputs:
    raise RequestError(400, "'input_data' must be a non-empty list of base64 images or URLs")
  if len(inputs) > options.max_images:
    raise RequestError(422, f"{len(inputs)} images in one request is over the limit of "
                            f"{options.max_images}")
  for i, item in enumerate(inputs):
    if not isinstance(item, str):
      raise RequestError(400, f"input_data[{i}]: expected a base64 string or URL, not "
                              f"{type(item).__name__}")
  k = _top_k(payload["top_k"], "JSON") if "top_k" in payload else None
  return inputs, k


def create_app(clf: predict.Classifier, options: Options = Options()) -> FastAPI:
  """The FastAPI application serving `clf`; compiles every batch size when it starts."""
  sizes = options.sizes
  state = _State()

  def run_batch(images: list[np.ndarray]) -> np.ndarray:
    return clf.probs(np.stack(images), sizes)

  def warm_up() -> None:
    # eval_resize imports TensorFlow on first use: pay that here, not in the first request.
    preprocess.eval_resize(np.zeros((clf.image_size, clf.image_size, 3), np.uint8), clf.image_size)
    clf.compile_batches(sizes)

  @contextlib.asynccontextmanager
  async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    # One thread for the model: warm-up first, then one batch at a time, in order.
    model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vit-jax-model")
    state.batcher = Batcher(run_batch, max(sizes), options.max_wait_ms / 1000, model_thread)
    worker = asyncio.create_task(state.batcher.serve_forever())
    if options.allow_urls:
      state.http = httpx.AsyncClient(timeout=options.url_timeout_s, follow_redirects=True,
                                     max_redirects=3)

    async def become_ready() -> None:
      try:
        await loop.run_in_executor(model_thread, warm_up)
      except Exception as e:  # pylint: disable=broad-except
        log.exception("warm-up failed")
        state.status, state.error = "failed", f"{e.__class__.__name__}: {e}"
        return
      state.status = "ready"
      log.info("ready: %s, %dpx, %d classes, batch sizes %s", clf.model_name, clf.image_size,
               len(clf.class_names), list(sizes))

    log.info("compiling batch sizes %s", list(sizes))
    ready = asyncio.create_task(become_ready())
    try:
      yield
    finally:
      for task in (ready, worker):
        task.cancel()
      await asyncio.gather(ready, worker, return_exceptions=True)
      if state.http is not None:
        await state.http.aclose()
      model_thread.shutdown(wait=False, cancel_futures=True)

  app = FastAPI(title="vit-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

  def error(status: int, message: str) -> JSONResponse:
    state.errors[status] += 1
    return JSONResponse({"error": message}, status_code=status)

  @app.exception_handler(RequestError)
  async def _request_error(_request: Request, e: RequestError) -> JSONResponse:
    return error(e.status, e.message)

  @app.exception_handler(HTTPException)
  async def _http_error(_request: Request, e: HTTPException) -> JSONResponse:
    return error(e.status_code, str(e.detail))  # unknown paths and methods, in the same shape

  @app.exception_handler(Exception)
  async def _internal_error(_request: Request, e: Exception) -> JSONResponse:
    log.error("internal error: %s: %s", e.__class__.__name__, e)
    return error(500, f"internal error ({e.__class__.__name__})")

  def check_url(url: str, index: int) -> None:
    if not url.lower().startswith(("http://", "https://")):
      raise RequestError(400, f"input_data[{index}]: only http(s) URLs can be fetched")
    if not options.allow_urls:
      raise RequestError(400, f"input_data[{index}]: URL inputs are disabled on this server "
                              "(send the image as base64, or start it with --allow-urls)")
    try:
      parts = urllib.parse.urlsplit(url)
      if parts.port is not None and not 0 < parts.port < 65536:  # urlsplit accepts port 0
        raise ValueError(f"port {parts.port}")
    except ValueError as e:
      raise RequestError(400, f"input_data[{index}]: not a valid URL ({e})") from None
    if not parts.hostname:
      raise RequestError(400, f"input_data[{index}]: not a valid URL (no host)")

  def prepare(item: str | bytes, index: int) -> np.ndarray:
    data = _decode_base64(item, index) if isinstance(item, str) else item
    return _prepare(data, index, clf.image_size, options.max_pixels)

  @app.post("/score")
  async def score(request: Request) -> JSONResponse:
    state.requests += 1
    if state.status != "ready":
      raise RequestError(503, f"not ready: {state.error or 'compiling'}")
    body = await _read_limited(request.headers, request.stream(), options.max_body_bytes,
                              "request body")
    inputs, k = await asyncio.to_thread(_parse, body, options)  # a large body parses off the loop
    if k is None:
      query = request.query_params.get("top_k")
      k = options.top_k if query is None else _top_k(query, "query parameter")
    urls = [i for i, item in enumerate(inputs) if _URL.match(item)]
    for i in urls:
      check_url(inputs[i], i)
    fetched = await asyncio.gather(*(_fetch(state.http, inputs[i], i, options.max_body_bytes)
                                     for i in urls), return_exceptions=True)
    _raise_first(fetched)
    items: list[str | bytes] = list(inputs)
    for i, data in zip(urls, fetched):
      items[i] = data
    # Decoding and resizing run in threads, so the event loop goes on accepting; of several
    # bad inputs, the first in order is named.
    prepared = await asyncio.gather(*(asyncio.to_thread(prepare, item, i)
                                      for i, item in enumerate(items)), return_exceptions=True)
    _raise_first(prepared)
    rows = await state.batcher.classify(prepared)
    state.images += len(rows)
    ranked = clf.rank(np.stack(rows), k)
    # A bare list, one ranked list per image: the managed endpoint's answer, which its
    # clients index directly.
    return JSONResponse([[{"label": p["label"], "score": p["score"]} for p in preds]
                         for preds in ranked])

  @app.get("/healthz")
  async def healthz() -> JSONResponse:
    code = {"ready": 200, "starting": 503}.get(state.status, 500)
    body = {"status": state.status} | ({"error": state.error} if state.error else {})
    return JSONResponse(body, status_code=code)

  @app.get("/metadata")
  async def metadata() -> dict[str, Any]:
    return {"model": clf.model_name, "image_size": clf.image_size,
            "num_classes": len(clf.class_names), "labels": clf.class_names,
            "batch_sizes": list(sizes), "max_wait_ms": options.max_wait_ms,
            "top_k": options.top_k, "allow_urls": options.allow_urls,
            "limits": {"max_body_bytes": options.max_body_bytes,
                       "max_pixels": options.max_pixels, "max_images": options.max_images}}

  @app.get("/stats")
  async def stats() -> dict[str, Any]:
    sizes_seen = state.batcher.batch_sizes if state.batcher else collections.Counter()
    return {"status": state.status, "requests": state.requests, "images": state.images,
            "errors": {str(k): v for k, v in sorted(state.errors.items())},
            "batches": sum(sizes_seen.values()),
            "batch_sizes": {str(k): v for k, v in sorted(sizes_seen.items())}}

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


def server(app: FastAPI, *, access_log: bool = True, log_level: str = "info") -> uvicorn.Server:
  """A uvicorn server for `app`, with this module's log lines in uvicorn's format."""
  log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
  log_config["loggers"][__name__] = {"handlers": ["default"], "level": "INFO", "propagate": False}
  config = uvicorn.Config(app, log_config=log_config, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=5)
  return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
  """http://host:port of a bound socket."""
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
