"""The SSE relay against the server's `send`: a client that stops reading, a send that fails."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from services.api import sse
from services.api.rpc import PendingCall
from services.api.sse import SseRelay, StreamLimits
from shared.errors import ServiceUnavailableError, to_openai_error
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


def silent_relay(
    *, idle: float, ping_interval: float, total: float = 30
) -> tuple[PendingCall, SseRelay]:
    """A stream whose first chunk came; what follows is up to the test."""
    call = PendingCall("r1", "local_m")
    first = Reply(ReplyKind.CHUNK, "r1", "a1", CHUNK, 0, 200, {})
    call.attempt, call.next_seq = "a1", 1  # as the first reply leaves them
    limits = StreamLimits(total=total, ttft=total, idle=idle, now=time.monotonic())

    async def on_finish(completed: bool) -> None:
        pass

    relay = SseRelay(
        call, first, limits, headers={}, ping_interval=ping_interval, on_finish=on_finish
    )
    return call, relay


async def body_of(relay: SseRelay) -> bytes:
    sent: list[bytes] = []

    async def send(message: Any) -> None:
        sent.append(message.get("body", b""))

    async with asyncio.timeout(5):
        await relay({}, no_receive, send)
    return b"".join(sent)


def chunk_then_end_later(call: PendingCall, delay: float, *, seq: int) -> asyncio.Task[None]:
    """After `delay` s, a chunk numbered `seq` and the stream's end arrive for `call`."""

    async def deliver() -> None:
        await asyncio.sleep(delay)
        call.deliver(Reply(ReplyKind.CHUNK, "r1", "a1", CHUNK, seq, 200, {}))
        call.deliver(Reply(ReplyKind.END, "r1", "a1", b"", seq + 1, 200, {}))

    return asyncio.create_task(deliver())


async def test_a_pause_between_chunks_is_filled_with_pings_and_the_stream_goes_on() -> None:
    """A model that pauses mid-answer (reasoning, a tool call being prepared): the connection
    gets a ping every `ping_interval`, so no proxy cuts it for idleness."""
    call, relay = silent_relay(idle=5, ping_interval=0.05)

    resuming = chunk_then_end_later(call, 0.3, seq=1)
    body = await body_of(relay)
    await resuming
    first, rest = body.split(CHUNK, 1)
    assert first == b""
    pings, tail = rest.split(CHUNK, 1)
    assert pings == sse.PING * pings.count(sse.PING) and pings.count(sse.PING) >= 3
    assert tail == sse.DONE


async def test_a_pause_past_the_idle_limit_ends_with_an_error_event_after_its_pings() -> None:
    _, relay = silent_relay(idle=0.3, ping_interval=0.05)
    body = await body_of(relay)
    events = body.split(b"\n\n")[:-1]
    assert events[0] + b"\n\n" == CHUNK and events[1:-1] and set(events[1:-1]) == {b": ping"}
    assert b"stopped sending output" in events[-1] and sse.DONE not in body


async def test_a_stream_cut_by_the_requests_deadline_says_so_not_that_the_model_paused() -> None:
    """REQUEST_TIMEOUT came before the idle limit would have: the error names the deadline."""
    _, relay = silent_relay(idle=5, ping_interval=0.05, total=0.3)
    body = await body_of(relay)
    last = body.split(b"\n\n")[-2]
    assert b"did not finish in time" in last and b"stopped sending" not in last


async def test_a_stream_committed_early_pings_with_its_headers_not_an_interval_later() -> None:
    """The commit (STREAM_KEEPALIVE_AFTER without output) sends a ping at once: a proxy that
    times out the first body byte must not wait another whole interval for it."""
    call = PendingCall("r1", "local_m")
    limits = StreamLimits(total=30, ttft=30, idle=30, now=time.monotonic())

    async def on_finish(completed: bool) -> None:
        pass

    relay = SseRelay(call, None, limits, headers={}, ping_interval=5, on_finish=on_finish)

    answering = chunk_then_end_later(call, 0.2, seq=0)  # well within the first interval
    body = await body_of(relay)
    await answering
    assert body == sse.PING + CHUNK + sse.DONE


RESTARTED = "The backend restarted the stream after output was sent."
NO_AGENT = ServiceUnavailableError(
    "No agent serving `local_m` took the request in time; retry shortly.",
    code="no_agent_available",
)


@pytest.mark.parametrize(
    ("other", "message", "code"),
    [
        (Reply(ReplyKind.CHUNK, "r1", "a2", CHUNK, 0, 200, {}), RESTARTED, "upstream_error"),
        (
            Reply(ReplyKind.ERROR, "r1", "a2", to_openai_error(NO_AGENT)[1], 0, 503, {}),
            NO_AGENT.message,
            "no_agent_available",
        ),
    ],
    ids=["restarted", "failed"],
)
async def test_another_attempt_after_output_ends_the_stream_with_what_it_said(
    other: Reply, message: str, code: str
) -> None:
    """Output was sent, then another attempt's reply comes: a chunk means the job restarted,
    but an error (the dispatcher's 503 for a job that came back from its agent queue) is
    relayed as it is, so the client learns what happened."""
    call, relay = silent_relay(idle=5, ping_interval=5)
    call.output_started = True
    call.deliver(other)
    body = await body_of(relay)
    assert body.startswith(CHUNK) and sse.DONE not in body
    last = body.split(b"\n\n")[-2]
    error = orjson.loads(last.removeprefix(b"data: "))["error"]
    assert (error["message"], error["code"]) == (message, code)
