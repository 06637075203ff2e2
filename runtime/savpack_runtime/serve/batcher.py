"""Dynamic batching: concurrent requests share one classifier call, which runs on a worker thread, off the event loop.

A request is admitted (or refused with QueueFull: the server answers 429) for its items and image pixels, then
submitted. The worker waits for a first submission, gives others up to `max_wait` seconds to arrive while the batch
holds fewer than `max_batch` items, and hands whole submissions, in arrival order, to `run_batch` (at most
`max_batch` items; a single submission larger than that runs alone, split into forwards of `max_batch` by the
classifier). A submission is never split, so an error names the item by its index in its own request: when a batch
fails, each submission in it runs again alone and only the one at fault gets the error.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

RunBatch = Callable[[Sequence[Any]], list[Any]]  # items -> one result per item, in order


class QueueFull(Exception):
    """The server holds as much work as it may; `retry_after` is a guess, in whole seconds, of when room frees up."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The batcher stopped before this submission ran."""


@dataclass
class _Submission:
    items: Sequence[Any]
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, run_batch: RunBatch, max_batch: int, max_wait: float, max_queue: int, max_pixels: int,
                 on_batch: Callable[[int, float], None] | None = None):
        """max_queue: items admitted and not yet answered; max_pixels: image pixels they may hold (decoded RGB
        images wait in memory). on_batch(items, seconds) is called on the event loop after each batch."""
        self.run_batch = run_batch
        self.max_batch, self.max_wait, self.max_queue, self.max_pixels = max_batch, max_wait, max_queue, max_pixels
        self.on_batch = on_batch
        self.admitted_items = 0
        self.admitted_pixels = 0
        self._waiting: deque[_Submission] = deque()
        self._waiting_items = 0
        self._arrived = asyncio.Event()
        self._batch_seconds = 0.0  # running mean of a batch's duration, for Retry-After
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task | None = None

    @property
    def queued_items(self) -> int:
        """Items waiting for a batch (not the ones running)."""
        return self._waiting_items

    async def start(self) -> None:
        # One thread: one model, one forward at a time; onnxruntime uses its own threads inside the forward.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="savpack-forward")
        self._worker = asyncio.create_task(self._run(), name="savpack-batcher")

    async def stop(self) -> None:
        """Stop the worker; submissions still waiting fail with ShuttingDown (the server drains requests first)."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._waiting:
            _settle(self._waiting.popleft().future, error=ShuttingDown("the server is shutting down"))
        self._waiting_items = 0
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @asynccontextmanager
    async def admit(self, items: int, pixels: int = 0) -> AsyncIterator[None]:
        """Hold room for a request's items and pixels while it is decoded, waits and runs; QueueFull when none is left."""
        if self.admitted_items + items > self.max_queue or self.admitted_pixels + pixels > self.max_pixels:
            retry_after = self.retry_after(items)
            raise QueueFull(f"the server is at capacity ({self.admitted_items} items of {self.max_queue} admitted, "
                            f"{self.admitted_pixels} image pixels of {self.max_pixels}); retry in {retry_after} s", retry_after)
        self.admitted_items += items
        self.admitted_pixels += pixels
        try:
            yield
        finally:
            self.admitted_items -= items
            self.admitted_pixels -= pixels

    def retry_after(self, items: int = 1) -> int:
        """Whole seconds until the items admitted now, and `items` more, have likely run (at least 1)."""
        batches_ahead = math.ceil((self.admitted_items + items) / self.max_batch)
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        """Results of `items`, in order, once a batch holding them has run. Raises what run_batch raised for them."""
        if self._worker is None or self._worker.done():
            raise ShuttingDown("the batcher is not running")
        submission = _Submission(items, asyncio.get_running_loop().create_future())
        self._waiting.append(submission)
        self._waiting_items += len(items)
        self._arrived.set()
        return await submission.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            while self._waiting_items < self.max_batch and loop.time() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            started = loop.time()
            await self._execute(batch)
            seconds = loop.time() - started
            self._batch_seconds = seconds if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * seconds
            if self.on_batch is not None:
                self.on_batch(sum(len(submission.items) for submission in batch), seconds)

    def _take(self) -> list[_Submission]:
        """Whole submissions in arrival order, up to max_batch items (at least one submission)."""
        batch = [self._waiting.popleft()]
        size = len(batch[0].items)
        while self._waiting and size + len(self._waiting[0].items) <= self.max_batch:
            size += len(self._waiting[0].items)
            batch.append(self._waiting.popleft())
        self._waiting_items -= size
        return batch

    async def _execute(self, batch: list[_Submission]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for submission in batch for item in submission.items]
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, items)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].future, error=exc)
                return
            # Which request was at fault? Each runs alone; its error (item indices its own) goes to it alone.
            for submission in batch:
                try:
                    _settle(submission.future, await loop.run_in_executor(self._executor, self.run_batch, submission.items))
                except Exception as own:
                    _settle(submission.future, error=own)
            return
        position = 0
        for submission in batch:
            _settle(submission.future, results[position : position + len(submission.items)])
            position += len(submission.items)


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
