"""Cancellations: request ids whose client went away, and the work running for them.

Fed by the `cancel` fanout. A job consumed after its cancel arrived is dropped; one running when
it arrives has its task cancelled (which aborts its upstream HTTP call). Ids are remembered for
`ttl` seconds, bounded in number, so the set never grows without limit.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any


class Cancellations:
    def __init__(self, *, ttl: float = 600.0, max_size: int = 100_000) -> None:
        self._ttl = ttl
        self._max_size = max_size
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self._running: dict[str, asyncio.Task[None]] = {}

    def cancel(self, request_id: str, now: float) -> bool:
        """Remember the id and cancel its running task; True if one was running."""
        self._cancelled[request_id] = now
        self._cancelled.move_to_end(request_id)
        self._expire(now)
        task = self._running.pop(request_id, None)
        if task is not None and not task.done():
            task.cancel()
            return True
        return False

    def is_cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

    async def run(self, request_id: str, work: Coroutine[Any, Any, None]) -> bool:
        """Run `work` unless its request is cancelled; False if it was (before or during).

        The work runs as a child task so that a cancel stops just it, never the caller (which
        still has to settle the message it holds).
        """
        if request_id in self._cancelled:
            work.close()
            return False
        task = asyncio.create_task(work)
        self._running[request_id] = task
        try:
            await task
            return True
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or current.cancelling() == 0):
                return False
            raise
        finally:
            if self._running.get(request_id) is task:
                del self._running[request_id]

    def _expire(self, now: float) -> None:
        while self._cancelled:
            oldest_id, at = next(iter(self._cancelled.items()))
            if now - at <= self._ttl and len(self._cancelled) <= self._max_size:
                break
            del self._cancelled[oldest_id]
