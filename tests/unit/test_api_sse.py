"""The SSE relay against the server's `send`: a client that stops reading, a send that fails."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from services.api import sse
from services.api.rpc import PendingCall
from services.api.sse import SseRelay, StreamLimits
from shared.messages import Reply, ReplyKind

CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[]}\n\n'


def relay(total: float, finished: list[bool]) -> SseRelay:
    call = PendingCall("r1", "local_m")
    for seq in range(3):
        call.deliver(Reply(ReplyKind.CHUNK, "r1", "a1", CHUNK, seq, 200, {}))

    async def on_finish(completed: bool) -> None:
        finished.append(completed)

    first = Reply(ReplyKind.CHUNK, "r1", "a1", CHUNK, 0, 200, {})
    call.next_seq = 1
    limits = StreamLimits(total=total, ttft=total, idle=total, now=time.monotonic())
    return SseRelay(call, first, limits, headers={}, ping_interval=5, on_finish=on_finish)


async def no_receive() -> Any:
    await asyncio.Event().wait()


async def test_a_client_that_stops_reading_is_dropped_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its TCP window is full: the server's send waits for ever (here: after the first chunk).
    The relay gives up past the deadline and finishes the call, which cancels the job."""
    monkeypatch.setattr(sse, "SEND_GRACE", 0.05)
    sent: list[dict[str, Any]] = []

    async def stalled_send(message: Any) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()

    finished: list[bool] = []
    async with asyncio.timeout(5):
        await relay(0.2, finished)({}, no_receive, stalled_send)
    assert finished == [False]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_a_failed_start_still_finishes_the_call() -> None:
    """The server refuses the response's start (a header it cannot write): the job is still
    cancelled and the call forgotten."""

    async def refusing_send(message: Any) -> None:
        raise RuntimeError("Invalid HTTP header name")

    finished: list[bool] = []
    with pytest.raises(RuntimeError):
        await relay(5, finished)({}, no_receive, refusing_send)
    assert finished == [False]
