"""Dynamic batching: requests wait up to ``max_wait`` for batch-mates, up to ``max_batch`` images per call.

One asyncio task forms batches and hands each to a single worker thread, so the defense is never called
concurrently (a :class:`~dent.defenses.Dent` keeps per-call state) and the event loop keeps accepting
requests while it runs. The queue of waiting requests is bounded (:class:`QueueFull`, with a Retry-After
estimate); a request not answered within ``timeout`` is dropped from the queue (:class:`RequestTimeout`).
Batches are taken first come, first served. When batches may not mix requests (``mixes=False``, isolation
``client``), each batch is one request. :meth:`Batcher.close` answers every request already queued before
it stops.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: ``on_batch(images, requests, seconds)``: called after each batch the defense answered.
BatchObserver = Callable[[int, int, float], None]


class QueueFull(Exception):
    """The queue holds ``queue_size`` requests; ``retry_after`` estimates, in seconds, when it has room."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The service is shutting down and takes no new request."""


class RequestTimeout(Exception):
    """A request was not answered within the timeout."""


@dataclass(frozen=True)
class Answer:
    """One request's logits and the batch that computed them."""

    logits: Tensor
    batch_images: int
    batch_requests: int


@dataclass(eq=False)  # compared by identity: a job is one request
class _Job:
    images: Tensor
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Batches ``predict([N, C, H, W]) -> logits [N, K]`` calls over concurrent requests."""

    def __init__(self, predict: Callable[[Tensor], Tensor], *, max_batch: int, max_wait_s: float, queue_size: int,
                 timeout_s: float, mixes: bool, on_batch: Optional[BatchObserver] = None):
        self._predict = predict
        self.max_batch, self.max_wait_s, self.queue_size, self.timeout_s = max_batch, max_wait_s, queue_size, timeout_s
        self._mixes = mixes
        self._on_batch = on_batch
        self._pending: deque[_Job] = deque()
        self._arrived: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dent-serve-defense")
        self._closing = False
        self._batch_seconds = 0.0  # moving average of a call's time, for Retry-After

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._pending)

    def start(self) -> None:
        """Start forming batches (in the running event loop)."""
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dent-serve-batcher")

    async def close(self) -> None:
        """Take no new request, answer those queued, then stop."""
        self._closing = True
        if self._task is not None:
            self._arrived.set()
            await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, images: Tensor) -> Answer:
        """``images``' logits, computed in a batch with other requests' where the policy allows."""
        if self._closing or self._task is None:
            raise ShuttingDown()
        if len(self._pending) >= self.queue_size:
            raise QueueFull(self._retry_after())
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"not answered within {self.timeout_s:g} s (the queue holds {self.depth} "
                                 "request(s)); retry later or with fewer images") from None
        finally:
            if not job.future.done():  # timed out or cancelled: nobody awaits its answer any more
                job.future.cancel()
                if job in self._pending:
                    self._pending.remove(job)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._batch_seconds * (self._queued_images() / self.max_batch + 1)))

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                return
            await self._answer(batch)

    async def _next_batch(self) -> list[_Job]:
        """The next batch, once its first request has waited ``max_wait`` or it is full; [] once closed."""
        while not self._pending:
            if self._closing:
                return []
            await self._wait_arrival(None)
        if self._mixes:
            deadline = self._pending[0].arrived + self.max_wait_s
            while self._queued_images() < self.max_batch and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await self._wait_arrival(remaining):
                    break
        return self._take()

    async def _wait_arrival(self, timeout: Optional[float]) -> bool:
        """Wait for a new request (or closing); False when ``timeout`` passed first."""
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _queued_images(self) -> int:
        return sum(len(job.images) for job in self._pending)

    def _take(self) -> list[_Job]:
        """The oldest requests that fit in one batch, in order (one request when batches do not mix)."""
        batch = [self._pending.popleft()]
        size = len(batch[0].images)
        while self._mixes and self._pending and size + len(self._pending[0].images) <= self.max_batch:
            job = self._pending.popleft()
            batch.append(job)
            size += len(job.images)
        return batch

    async def _answer(self, batch: list[_Job]) -> None:
        images = torch.cat([job.images for job in batch])
        started = time.monotonic()
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self._executor, self._predict, images)
        except Exception as exc:  # the batch's requests get the error; the service keeps serving
            log.exception("the defense failed on a batch of %d image(s)", len(images))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        seconds = time.monotonic() - started
        self._batch_seconds = seconds if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * seconds
        if self._on_batch is not None:
            self._on_batch(len(images), len(batch), seconds)
        start = 0
        for job in batch:
            end = start + len(job.images)
            if not job.future.done():
                job.future.set_result(Answer(logits[start:end], len(images), len(batch)))
            start = end
