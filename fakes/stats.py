"""What a fake saw, for tests and benchmarks to assert on (`GET /_fake/stats`).

Contract: counters cover chat requests only. Every chat request ends in
exactly one of: `completed` (its response was fully written, error statuses
included), `aborted` (the client left first) or `cut` (a scripted
`cut_after_chunks` dropped the connection). Lists keep the last 100 entries.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

HISTORY = 100


class Stats:
    """Mutable counters; the aiohttp handlers run on one loop, so no locking."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Forget history; `in_flight` is a live gauge and survives a reset."""
        self.requests = 0
        self.completed = 0
        self.aborted = 0
        self.cut = 0
        self.max_in_flight = self.in_flight
        self.aborted_ids: deque[str | None] = deque(maxlen=HISTORY)
        # Wall-clock (time.time()) so a test can compare with its own clock.
        self.aborted_at: deque[float] = deque(maxlen=HISTORY)
        self.bodies: deque[Any] = deque(maxlen=HISTORY)
        self.auth: deque[str | None] = deque(maxlen=HISTORY)

    def begin(self, authorization: str | None) -> None:
        """A chat request arrived (before any validation)."""
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.auth.append(authorization)

    def end(self) -> None:
        """The handler of a chat request returned or was cancelled."""
        self.in_flight -= 1

    def record_body(self, body: Any) -> None:
        self.bodies.append(body)

    def record_completed(self) -> None:
        self.completed += 1

    def record_cut(self) -> None:
        self.cut += 1

    def record_abort(self, completion_id: str | None) -> None:
        self.aborted += 1
        self.aborted_ids.append(completion_id)
        self.aborted_at.append(time.time())

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view served by `GET /_fake/stats`."""
        return {
            "requests": self.requests,
            "completed": self.completed,
            "aborted": self.aborted,
            "cut": self.cut,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "aborted_ids": list(self.aborted_ids),
            "aborted_at": list(self.aborted_at),
            "bodies": list(self.bodies),
            "auth": list(self.auth),
        }
