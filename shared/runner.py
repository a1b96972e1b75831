"""Running a long-lived service: uvloop, signals that only set a flag, a settled heap."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

# Python's collector makes a young-generation pass every 700 container objects allocated and
# not yet freed. A service with requests in flight holds more than that at any moment, so under
# load it made dozens of passes a second, and about every 8 s a full one over the 65-78k objects
# that importing FastAPI, pydantic, aio-pika and redis leaves behind: 25-33 ms each with the
# event loop stopped (bench/RESULTS.md). Reference counting frees nearly all of a request's
# objects; the collector is there for cycles, and a pass every 10,000 still finds them soon.
YOUNG_GENERATION_THRESHOLD = 10_000


def settle_heap() -> None:
    """Call once the service's code and configuration are loaded: what is alive then lives as
    long as the process, so the collector stops scanning it (`gc.freeze`), and young passes
    come every YOUNG_GENERATION_THRESHOLD allocations instead of 700."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def run_service(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run `main(stop)` on uvloop, after `settle_heap()`; SIGTERM and SIGINT set `stop` and
    `main` shuts down."""

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    settle_heap()
    uvloop.run(wrapper())
