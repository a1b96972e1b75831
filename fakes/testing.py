"""Helpers for tests that drive a fake (this repo's and the router's own).

Contract: `FakeControl` wraps the `/_fake/*` endpoints of a running fake;
`sse_payloads` splits a raw SSE body and raises ValueError on any framing
that real vLLM/OpenAI would not send.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp


class FakeControl:
    """Script faults into, reset, and read the stats of the fake at `base_url`."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session

    async def script(self, *steps: dict[str, Any]) -> int:
        """Queue steps (see fakes.faults); returns how many are queued now."""
        return int((await self._call("POST", "/_fake/script", list(steps)))["queued"])

    async def reset(self) -> None:
        await self._call("POST", "/_fake/reset")

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/_fake/stats")

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 1.0
    ) -> dict[str, Any]:
        """Poll the stats until `predicate` holds or `timeout` passes; returns the last."""
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.stats()
            if predicate(stats) or time.monotonic() >= deadline:
                return stats
            await asyncio.sleep(0.02)

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        async with self.session.request(method, self.base_url + path, json=body) as resp:
            result: dict[str, Any] = await resp.json()
            if resp.status != 200:
                raise ValueError(f"{method} {path} -> {resp.status}: {result}")
            return result


def sse_payloads(raw: bytes) -> list[bytes]:
    """The `data:` payloads of a raw SSE body, [DONE] included.

    Every event must be exactly `data: <payload>\\n\\n` (one line, no CR, no
    other fields), which is what both upstreams send.
    """
    if not raw.endswith(b"\n\n"):
        raise ValueError(f"SSE body does not end with a blank line: {raw[-40:]!r}")
    payloads = []
    for event in raw[:-2].split(b"\n\n"):
        if not event.startswith(b"data: ") or b"\n" in event or b"\r" in event:
            raise ValueError(f"not a single-line data event: {event!r}")
        payloads.append(event[len(b"data: ") :])
    return payloads
