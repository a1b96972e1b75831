"""Calls made while one is in flight leave together: one round trip for a burst, not one each.

Under load a dispatcher consumes jobs (and cache writes) in bursts: the deliveries read from
one socket read all run before the event loop polls again. Sent one by one, each probe costs
redis-py's whole command path, a send and a wakeup for its reply. `Batcher` lets the first
call go out at the end of the current turn of the loop with every call queued by then, and
the calls queued while it is in flight go out together when it is back. A lone call waits for
nothing but the end of the current turn. Plain asyncio, no Redis: the store decides what one
batch is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 64


class Batcher(Generic[T, R]):
    """Runs `run(items)` for the calls queued since the last batch, one batch at a time.

    `run` returns one result per item, in order; if it raises, every call of that batch raises
    the same exception. A caller that is cancelled while waiting leaves its item in the batch
    (the work is done or not; its result is dropped).
    """

    def __init__(
        self, run: Callable[[Sequence[T]], Awaitable[Sequence[R]]], *, max_batch: int = MAX_BATCH
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self._max_batch = max_batch
        self._queued: list[tuple[T, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0  # how many `run` calls so far (for tests and diagnostics)

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if self._sender is None:
            # A task, not a direct call: it starts after the deliveries already scheduled in
            # this turn of the loop have queued their calls too.
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queued:
                batch = self._queued[: self._max_batch]
                del self._queued[: self._max_batch]
                self.batches += 1
                try:
                    results = await self._run([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"{len(results)} results for {len(batch)} calls")
                except Exception as e:  # every caller of the batch gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            # Anything still unanswered is only left when this task itself was cancelled
            # (the loop is shutting down): its callers must not wait forever.
            for _, future in (*batch, *self._queued):
                if not future.done():
                    future.cancel()
            self._queued.clear()
            self._sender = None
