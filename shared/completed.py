"""`job.completed` events held for a moment and published together, in one message.

Only the cache writer reads a `job.completed` (and, through it, the single-flight followers of
an identical deterministic request). Published one per answer, each event was a message the
broker routed and a dispatcher read and wrote to Redis on its own: at c=32 the cache's writes
took 14% of the whole path's CPU per request, and 23% of the dispatcher's (bench/RESULTS.md).
`CompletedBatcher` holds a process's events for up to `delay` seconds and publishes them as one
message; a batch that grows past `max_bytes` or `max_events` goes at once.

Best effort, like the cache itself: events still held when a process dies are lost (their
entries are not written, and a single-flight follower waits out its lock and goes upstream).
`flush()` publishes what is held before a process closes its connections on purpose.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from shared.errors import RouterError
from shared.messages import Completed, Envelope, encode_completed

log = logging.getLogger(__name__)

COMPLETED_DELAY = 0.010  # seconds: ~8 events a message at 800 answers/s
MAX_HELD_BYTES = 1 << 20  # one big answer is not held back for the others
MAX_HELD_EVENTS = 256  # keeps the header arrays well inside one AMQP frame


class CompletedBatcher:
    """One process's held `job.completed` events; `publish` sends one message of them."""

    def __init__(
        self,
        publish: Callable[[Envelope], Awaitable[None]],
        *,
        delay: float = COMPLETED_DELAY,
        max_bytes: int = MAX_HELD_BYTES,
        max_events: int = MAX_HELD_EVENTS,
    ) -> None:
        self._publish = publish
        self._delay = delay
        self._max_bytes = max_bytes
        self._max_events = max_events
        self._held: list[Completed] = []
        self._held_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def add(self, event: Completed) -> None:
        """Publish `event` within `delay` seconds, with whatever else arrives meanwhile."""
        self._held.append(event)
        self._held_bytes += len(event.body)
        if self._held_bytes >= self._max_bytes or len(self._held) >= self._max_events:
            self._send_held()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._send_held)

    @property
    def held(self) -> int:
        return len(self._held)

    def _send_held(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held:
            return
        events, self._held, self._held_bytes = self._held, [], 0
        task = asyncio.create_task(self._send(events))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, events: list[Completed]) -> None:
        try:
            await self._publish(encode_completed(events))
        except RouterError as e:  # the clients have their answers; only the cache misses out
            log.warning("%d job.completed events not published: %s", len(events), e)

    async def flush(self, timeout: float = 5.0) -> None:
        """Publish every held event now and wait (at most `timeout`) until the broker has them."""
        self._send_held()
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=timeout)
