"""Gathers work items from concurrent requests into batches for one call at a time, with a bounded
queue.

Nothing here knows about images or HTTP: `run` takes a list of items and
returns one result row per item.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
  """A request's images do not fit in the queue: the client should come back later."""

  def __init__(self, images: int | None, waiting: int, limit: int, retry_after_s: int):
    more = "" if images is None else f", and {images} more would pass the limit of {limit}"
    super().__init__(
      f"the queue is full: {waiting} images wait for the model{more}; retry after {retry_after_s} s"
    )
    self.retry_after_s = retry_after_s


class _Ticket:
  """The places one request holds in the queue: one per image no model call has taken yet."""

  def __init__(self, images: int):
    self.held = images


class Batcher:
  """Gathers images from concurrent requests into batches for one compiled call at a time."""

  def __init__(
    self,
    run: Callable[[list[np.ndarray]], np.ndarray],
    max_batch: int,
    max_wait_s: float,
    executor: concurrent.futures.Executor,
    max_queue: int | None = None,
  ):
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

  async def classify(
    self, images: Sequence[np.ndarray], ticket: _Ticket | None = None
  ) -> list[np.ndarray]:
    """One row of the model's output per image, in order (admitted first, without `ticket`)."""
    if ticket is None:
      with self.admit(len(images)) as ticket:
        return await self.classify(images, ticket)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in images]
    for image, future in zip(images, futures, strict=True):
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
      except Exception as e:
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
      for (_, future), row in zip(items, rows, strict=True):
        if not future.done():
          future.set_result(row)
