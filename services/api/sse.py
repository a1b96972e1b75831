"""Relaying a reply stream to the client as Server-Sent Events, byte-exact with OpenAI.

Chunk messages arrive already framed (`data: {...}\\n\\n`), so the relay writes them as they
are and adds `data: [DONE]\\n\\n` on the end message. After the status line is sent, every
failure (a deadline, a lost chunk, an upstream error) ends the stream with a
`data: {"error": {...}}` event and no `[DONE]`: a truncated stream never looks complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.api.rpc import PendingCall
from shared.errors import GatewayTimeoutError, RouterError, UpstreamError, to_openai_error
from shared.messages import Reply, ReplyKind

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"
NO_OUTPUT = "No output from the model in time."
STOPPED = "The model stopped sending output in time."
UNFINISHED = "The model did not finish in time."  # REQUEST_TIMEOUT, while it still sent
SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
# How long past the request's deadline a write to the client may still wait: enough to send
# the deadline's own error event to a client that reads.
SEND_GRACE = 1.0


def error_event(exc: BaseException) -> bytes:
    _, body, _ = to_openai_error(exc)
    return b"data: " + body + b"\n\n"


class ClientGoneError(Exception):
    """The client disconnected; nobody reads the answer any more."""


class StreamLimits:
    """The deadlines of one stream, as absolute monotonic times."""

    __slots__ = ("deadline", "first_chunk_by", "idle")

    def __init__(self, *, total: float, ttft: float, idle: float, now: float) -> None:
        self.deadline = now + total
        self.first_chunk_by = now + min(ttft, total)
        self.idle = idle


class SseRelay(Response):
    """A streaming response fed by a `PendingCall`.

    `first` is the first reply when it came before the stream committed to 200; None means the
    router committed early and pings until the first reply arrives. `on_finish(completed)` runs
    exactly once when the stream ends, however it ends.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        call: PendingCall,
        first: Reply | None,
        limits: StreamLimits,
        *,
        headers: dict[str, str],
        ping_interval: float,
        on_finish: Callable[[bool], Awaitable[None]],
    ) -> None:
        # Not Response.__init__: it would add `content-length: 0` to an endless body.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in {**SSE_HEADERS, **headers}.items()
        ]
        self._call = call
        self._first = first
        self._limits = limits
        self._ping_interval = ping_interval
        self._on_finish = on_finish
        self._completed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A client that stops reading fills its TCP window, and the server's send then waits
        # where no deadline of `_events` sees it, while replies pile up in the call. So every
        # write shares the request's deadline, plus the time to send the deadline's own error
        # event: one timer per stream (a timer per write cost 9 us each).
        limit = max(self._limits.deadline - time.monotonic(), 0) + SEND_GRACE
        try:
            async with asyncio.timeout(limit):
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                async for piece in self._events():
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            log.warning(
                "client of stream %s stopped reading; dropped at its deadline",
                self._call.request_id,
            )
        except (OSError, ClientGoneError):
            log.info("client left stream %s", self._call.request_id)
        finally:
            await self._on_finish(self._completed)

    async def _replies(self) -> AsyncGenerator[Reply | bytes, None]:
        """The call's replies in turn, and a ping for each `ping_interval` of silence, before
        the first or between two (a model reasoning, a long prefill): proxies cut connections
        idle for 60 s (nginx, AWS ALB). A stream committed early pings at once: its first body
        bytes leave with the headers, for proxies that time out the first byte. Ends with an
        error event at a deadline, or when the call fails."""
        until, late = self._limits.first_chunk_by, NO_OUTPUT
        if self._first is None:
            yield PING
        else:
            yield self._first
            until, late = self._quiet_until()
        while True:
            try:
                reply = await self._call.next(min(self._ping_interval, until - time.monotonic()))
            except TimeoutError:
                if time.monotonic() >= until:
                    yield error_event(GatewayTimeoutError(late))
                    return
                yield PING
                continue
            except RouterError as e:
                yield error_event(e)
                return
            yield reply
            until, late = self._quiet_until()

    def _quiet_until(self) -> tuple[float, str]:
        """When the next reply is due, and what the client is told if it is not: the idle
        limit's words, or the request's deadline's when that comes first."""
        idle_end = time.monotonic() + self._limits.idle
        if idle_end < self._limits.deadline:
            return idle_end, STOPPED
        return self._limits.deadline, UNFINISHED

    async def _events(self) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(self._replies()) as replies:
            async for reply in replies:
                if isinstance(reply, bytes):  # a ping, or the error event that ends the stream
                    yield reply
                elif reply.kind is ReplyKind.CHUNK:
                    self._call.output_started = True
                    yield reply.body
                elif reply.kind is ReplyKind.END:
                    self._completed = True
                    yield DONE
                    return
                elif reply.kind is ReplyKind.ERROR:
                    self._completed = True  # the backend ended it: nothing left to cancel
                    yield b"data: " + reply.body + b"\n\n"
                    return
                else:
                    message = "The backend answered a stream with a non-stream."
                    yield error_event(UpstreamError(message))
                    return
