"""`vit-jax serve`: an HTTP endpoint that classifies images, batching requests that arrive together.

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
import dataclasses
import io
import ipaddress
import json
import logging
import math
import re
import reprlib
import socket
import time
import urllib.parse
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence

import httpx
import numpy as np
import uvicorn
import uvicorn.config
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException

from vit_jax import errors
from vit_jax import classifier
from vit_jax import preprocess

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)
_FIELDS = ("input_data", "top_k")
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 100
_MAX_REDIRECTS = 3


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
  max_queue: int = 256  # images waiting for the model; more: 503
  allow_urls: bool = False
  allow_private_urls: bool = False  # also fetch loopback, private, link-local, ... addresses
  url_timeout_s: float = 10.0

  def __post_init__(self):
    for name in ("top_k", "max_batch", "max_body_bytes", "max_pixels", "max_images", "max_queue"):
      if getattr(self, name) < 1:
        raise errors.ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
    if self.max_wait_ms < 0 or self.url_timeout_s <= 0:
      raise errors.ConfigError("max_wait_ms must be >= 0 and url_timeout_s > 0")
    if any(s < 1 for s in self.batch_sizes):
      raise errors.ConfigError(f"batch sizes must be at least 1: {self.batch_sizes}")
    if self.max_queue < self.max_images:
      raise errors.ConfigError(f"max_queue {self.max_queue} is below max_images {self.max_images}: "
                               "a request of max_images images could never be queued")
    if self.allow_private_urls and not self.allow_urls:
      raise errors.ConfigError("allow_private_urls needs allow_urls")

  @property
  def sizes(self) -> tuple[int, ...]:
    """The compiled batch sizes; the largest is the most images one model call holds."""
    return tuple(sorted(set(self.batch_sizes))) or classifier.batch_sizes(self.max_batch)


class RequestError(Exception):
  """A request that cannot be served as sent: the HTTP status and what was wrong."""

  def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.headers = dict(headers or {})


class QueueFull(Exception):
  """A request's images do not fit in the queue: the client should come back later."""

  def __init__(self, images: int | None, waiting: int, limit: int, retry_after_s: int):
    more = "" if images is None else f", and {images} more would pass the limit of {limit}"
    super().__init__(f"the queue is full: {waiting} images wait for the model{more}; retry "
                     f"after {retry_after_s} s")
    self.retry_after_s = retry_after_s


class _Ticket:
  """The places one request holds in the queue: one per image no model call has taken yet."""

  def __init__(self, images: int):
    self.held = images


class Batcher:
  """Gathers images from concurrent requests into batches for one compiled call at a time."""

  def __init__(self, run: Callable[[list[np.ndarray]], np.ndarray], max_batch: int,
               max_wait_s: float, executor: concurrent.futures.Executor,
               max_queue: int | None = None):
    self._run = run
    self._max_batch = max_batch
    self._max_wait_s = max_wait_s
    self._executor = executor
    self._max_queue = max_queue  # None: unbounded
    self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future, _Ticket]] = asyncio.Queue()
    self.batch_sizes: collections.Counter[int] = collections.Counter()
    self.waiting = 0  # images admitted that no model call has taken: being decoded, or queued
    self._call_s = 0.0  # a running mean of one model call's time, for Retry-After

  @property
  def full(self) -> bool:
    """Whether not even one more image would be admitted."""
    return self._max_queue is not None and self.waiting >= self._max_queue

  def retry_after_s(self) -> int:
    """Whole seconds (at least 1) until the model calls ahead have taken what waits now."""
    calls = self.waiting / self._max_batch + 1
    return max(1, math.ceil(calls * self._call_s))

  @contextlib.contextmanager
  def admit(self, images: int) -> Iterator[_Ticket]:
    """Holds places for a request's images until model calls take them; QueueFull if none fit."""
    if self._max_queue is not None and self.waiting + images > self._max_queue:
      raise QueueFull(images, self.waiting, self._max_queue, self.retry_after_s())
    ticket = _Ticket(images)
    self.waiting += images
    try:
      yield ticket
    finally:
      # A request that failed (bad input, a client gone) gives back what no call took.
      self.waiting -= ticket.held
      ticket.held = 0

  async def classify(self, images: Sequence[np.ndarray],
                     ticket: _Ticket | None = None) -> list[np.ndarray]:
    """One row of the model's output per image, in order (admitted first, without `ticket`)."""
    if ticket is None:
      with self.admit(len(images)) as ticket:
        return await self.classify(images, ticket)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in images]
    for image, future in zip(images, futures):
      self._queue.put_nowait((image, future, ticket))
    return list(await asyncio.gather(*futures))

  def _take(self, ticket: _Ticket) -> None:
    """A model call has taken one image: its place in the queue is free."""
    if ticket.held > 0:  # 0: its request has ended and given its places back
      ticket.held -= 1
      self.waiting -= 1

  async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future, _Ticket]]:
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
      collected = await self._collect()
      for _, _, ticket in collected:
        self._take(ticket)
      # A request whose client went away has cancelled its futures: skip its images.
      items = [(im, f) for im, f, _ in collected if not f.done()]
      if not items:
        continue
      start = time.perf_counter()
      try:
        rows = await loop.run_in_executor(self._executor, self._run, [im for im, _ in items])
      except Exception as e:  # pylint: disable=broad-except
        # A failed call fails its requests (500), never the worker.
        log.exception("model call on %d images failed", len(items))
        for _, future in items:
          if not future.done():
            future.set_exception(e)
        continue
      elapsed = time.perf_counter() - start
      # The mean of the last ~10 calls: recent enough to follow load, steady enough to quote.
      self._call_s = elapsed if not self.batch_sizes else 0.9 * self._call_s + 0.1 * elapsed
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
  fetcher: UrlFetcher | None = None  # when URLs are allowed
  requests: int = 0
  in_flight: int = 0  # /score requests begun and not yet answered
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


# The kinds of address a server must not fetch from unless told to, tested in this order (an
# address can be several: 127.0.0.1 is loopback and private; the first names it best).
_INTERNAL = (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
             ("is_link_local", "link-local"), ("is_multicast", "multicast"),
             ("is_reserved", "reserved"), ("is_private", "private"))


def internal_kind(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
  """The kind of non-public address this is ("loopback", "private", ...); None for a public one."""
  ip = ipaddress.ip_address(address) if isinstance(address, str) else address
  if isinstance(ip, ipaddress.IPv6Address):
    if ip.ipv4_mapped:  # ::ffff:a.b.c.d is a.b.c.d, on an IPv6 socket
      return internal_kind(ip.ipv4_mapped)
    # 6to4 (2002:7f00:1::) and Teredo carry an IPv4 address that a relay would reach.
    embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
    if embedded is not None and internal_kind(embedded):
      return internal_kind(embedded)
  for test, kind in _INTERNAL:
    if getattr(ip, test):
      return kind
  # What is left and still not global: shared address space (100.64.0.0/10) and the like.
  return None if ip.is_global else "non-global"


Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
  """The addresses a host name resolves to, in the resolver's order (an IP literal: itself)."""
  infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
  return list(dict.fromkeys(str(info[4][0]) for info in infos))


class UrlFetcher:
  """GETs URL inputs from public addresses only (unless allowed), connecting to the one checked."""

  def __init__(self, options: Options, resolve: Resolver = resolve_host,
               transport: httpx.AsyncBaseTransport | None = None):
    self._options = options
    self._resolve = resolve
    # Redirects are followed here, each hop checked; proxies from the environment are not used
    # (a proxy would resolve the name again); no connection is kept alive, since the pool keys
    # one by address, and a TLS connection checked for one name could carry another's request.
    self._http = httpx.AsyncClient(timeout=options.url_timeout_s, follow_redirects=False,
                                   trust_env=False, transport=transport,
                                   limits=httpx.Limits(max_keepalive_connections=0))

  async def aclose(self) -> None:
    await self._http.aclose()

  async def fetch(self, url: str, index: int, max_bytes: int) -> bytes:
    """The body at an http(s) URL, at most max_bytes, or a RequestError saying why not."""
    name = f"input_data[{index}]"
    try:
      async with asyncio.timeout(self._options.url_timeout_s):  # the whole fetch, every hop
        return await self._follow(url, name, max_bytes)
    except RequestError:
      raise
    except TimeoutError:
      raise RequestError(400, f"{name}: cannot fetch {_short(url)} (no answer within "
                              f"{self._options.url_timeout_s:g} s)") from None
    except Exception as e:  # pylint: disable=broad-except
      # Whatever a client's URL makes the HTTP client raise (a bad port or host name ends in
      # InvalidURL, ExceptionGroup, OSError, ...) is the client's bad input. Only addresses that
      # passed the check get here, so the message tells nothing of an internal one.
      raise RequestError(400, f"{name}: cannot fetch {_short(url)} "
                              f"({e.__class__.__name__}: {_short(str(e))})") from None

  async def _follow(self, url: str, name: str, max_bytes: int) -> bytes:
    """GETs `url`, and the URL it redirects to, up to _MAX_REDIRECTS times."""
    target = httpx.URL(url)
    for hop in range(_MAX_REDIRECTS + 1):
      response = await self._send(target, url, name, redirected=hop > 0)
      try:
        location = response.headers.get("location")
        if response.is_redirect and location:
          target = target.join(location)
          if target.scheme not in ("http", "https") or not target.host:
            raise RequestError(400, f"{name}: {_short(url)} redirects to something other than "
                                    "an http(s) URL")
          continue
        if response.status_code != 200:
          raise RequestError(400, f"{name}: GET {_short(url)} answered HTTP {response.status_code}")
        return await _read_limited(response.headers, response.aiter_bytes(), max_bytes,
                                   f"{name}: {_short(url)}")
      finally:
        await response.aclose()
    raise RequestError(400, f"{name}: {_short(url)} redirects more than {_MAX_REDIRECTS} times")

  async def _send(self, target: httpx.URL, url: str, name: str, redirected: bool) -> httpx.Response:
    """The response to a GET of `target`, sent to an address of its host that passed the check."""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
      addresses = (list(await self._resolve(target.host, port)) if _is_name(target.host)
                   else [target.host])
    except OSError:  # socket.gaierror, and the like
      addresses = []
    if not addresses:
      # Said without the resolver's words: they would tell of internal names.
      raise RequestError(400, f"{name}: cannot fetch {_short(url)} (its host name does not "
                              "resolve)")
    if not self._options.allow_private_urls:
      for address in addresses:
        kind = internal_kind(address)
        if kind:
          # Said without anything from the target: no address, status or error of what is there.
          where = (("it redirects to a host that" if redirected else "its host")
                   + (" resolves to" if _is_name(target.host) else " is"))
          article = "an" if kind[0] in "aeiou" else "a"
          raise RequestError(400, f"{name}: refused to fetch {_short(url)}: {where} {article} "
                                  f"{kind} address (this server fetches only from public "
                                  "addresses; --allow-private-urls allows the others)")
    headers = {"Host": target.netloc.decode("ascii")}
    # TLS: the name goes in SNI and the certificate is checked against it, not the address.
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    error = None
    for address in addresses:
      request = self._http.build_request("GET", target.copy_with(host=address), headers=headers,
                                         extensions=extensions)
      try:
        return await self._http.send(request, stream=True)
      except httpx.ConnectError as e:  # no connection made: the next address may answer
        error = e
    raise error


def _is_name(host: str) -> bool:
  """Whether a URL's host is a name rather than an IP literal."""
  try:
    ipaddress.ip_address(host)
  except ValueError:
    return True
  return False


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


def create_app(clf: classifier.Classifier, options: Options = Options()) -> FastAPI:
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
    state.batcher = Batcher(run_batch, max(sizes), options.max_wait_ms / 1000, model_thread,
                            max_queue=options.max_queue)
    worker = asyncio.create_task(state.batcher.serve_forever())
    if options.allow_urls:
      state.fetcher = UrlFetcher(options)

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
      if state.fetcher is not None:
        await state.fetcher.aclose()
      model_thread.shutdown(wait=False, cancel_futures=True)

  app = FastAPI(title="vit-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

  def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    state.errors[status] += 1
    return JSONResponse({"error": message}, status_code=status, headers=headers)

  @app.exception_handler(RequestError)
  async def _request_error(_request: Request, e: RequestError) -> JSONResponse:
    return error(e.status, e.message, e.headers)

  @app.exception_handler(QueueFull)
  async def _queue_full(_request: Request, e: QueueFull) -> JSONResponse:
    return error(503, str(e), {"Retry-After": str(e.retry_after_s)})

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
    if state.batcher.full:  # refused before its body is read: a flood costs little
      raise QueueFull(None, state.batcher.waiting, options.max_queue, state.batcher.retry_after_s())
    state.in_flight += 1
    try:
      return await scored(request)
    finally:
      state.in_flight -= 1

  async def scored(request: Request) -> JSONResponse:
    body = await _read_limited(request.headers, request.stream(), options.max_body_bytes,
                              "request body")
    inputs, k = await asyncio.to_thread(_parse, body, options)  # a large body parses off the loop
    if k is None:
      query = request.query_params.get("top_k")
      k = options.top_k if query is None else _top_k(query, "query parameter")
    urls = [i for i, item in enumerate(inputs) if _URL.match(item)]
    for i in urls:
      check_url(inputs[i], i)
    # Places in the queue are held from here: what is fetched and decoded waits for the model too.
    with state.batcher.admit(len(inputs)) as ticket:
      fetched = await asyncio.gather(*(state.fetcher.fetch(inputs[i], i, options.max_body_bytes)
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
      rows = await state.batcher.classify(prepared, ticket)
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
            "allow_private_urls": options.allow_private_urls,
            "limits": {"max_body_bytes": options.max_body_bytes,
                       "max_pixels": options.max_pixels, "max_images": options.max_images,
                       "max_queue": options.max_queue}}

  @app.get("/stats")
  async def stats() -> dict[str, Any]:
    sizes_seen = state.batcher.batch_sizes if state.batcher else collections.Counter()
    return {"status": state.status, "requests": state.requests, "images": state.images,
            "queued": state.batcher.waiting if state.batcher else 0, "in_flight": state.in_flight,
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


def server(app: FastAPI, *, access_log: bool = True, log_level: str = "info",
           drain_timeout_s: float = 25.0) -> uvicorn.Server:
  """A uvicorn server for `app`, logging in uvicorn's format; SIGTERM or Ctrl-C drains it."""
  log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
  log_config["loggers"][__name__] = {"handlers": ["default"], "level": "INFO", "propagate": False}
  # Draining: stop accepting, answer the requests in flight for at most drain_timeout_s (then
  # they are cancelled), shut the app down.
  config = uvicorn.Config(app, log_config=log_config, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=drain_timeout_s)
  return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
  """http://host:port of a bound socket."""
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
