"""`POST /v1/chat/completions`: validate at the edge, publish a job, wait for its reply.

The status line waits for the first reply, so errors that come first keep their status and
OpenAI body; only a stream with no reply after STREAM_KEEPALIVE_AFTER commits to 200 without one
(and pings), after which any failure, a deadline too, is an error event in the stream. A client
that goes away makes the API broadcast a cancel, so whoever holds the job stops spending tokens
on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive

from services.api.bus import ApiBus
from services.api.rpc import PendingCall
from services.api.settings import ApiSettings
from services.api.sse import NO_OUTPUT, ClientGoneError, SseRelay, StreamLimits
from services.api.validation import ChatRequestParser, EdgeLimits
from shared.errors import (
    DeadlineError,
    InternalError,
    PayloadTooLargeError,
    RequestTimeoutError,
    RouterError,
    UpstreamError,
)
from shared.http_headers import cache_directives, relayable
from shared.messages import Job, Reply, ReplyKind

log = logging.getLogger(__name__)

JSON = "application/json"


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` (chunked bodies too), and
    with 408 if it has not all arrived within `timeout` seconds (a stalled upload would hold
    its connection and buffer for ever); ClientGoneError if the client disconnects first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The request body is larger than {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise PayloadTooLargeError(f"The request body is larger than {limit} bytes.")
                parts.append(part)
    except ClientDisconnect as e:  # mid-upload: nobody is left to answer
        raise ClientGoneError() from e
    except TimeoutError as e:
        raise RequestTimeoutError(f"The request body did not arrive within {timeout:g} s.") from e
    return b"".join(parts)


def watch_disconnect(receive: Receive, call: PendingCall) -> asyncio.Task[None]:
    """Fail the call with ClientGoneError when the client disconnects."""

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                call.fail(ClientGoneError())
                return

    return asyncio.create_task(watch())


def reply_headers(reply: Reply, request_id: str) -> dict[str, str]:
    """The headers a reply may relay (`shared.http_headers`), and the router's request id."""
    return {**relayable(reply.http_headers), "x-request-id": request_id}


def reply_status(reply: Reply) -> int:
    """A final answer is a 200; an error keeps its status if it is an error status, else 502."""
    if reply.kind is ReplyKind.FINAL:
        return 200
    return reply.status if 400 <= reply.status <= 599 else 502


class CompletionsEndpoint:
    def __init__(self, settings: ApiSettings, bus: ApiBus) -> None:
        self.settings = settings
        self.upload_timeout = min(settings.body_timeout, settings.request_timeout)
        self.bus = bus
        self.parser = ChatRequestParser(
            EdgeLimits(max_messages=settings.max_messages, max_tokens=settings.max_tokens_limit)
        )

    async def __call__(
        self,
        request: Request,
        tenant: str = "anonymous",
        check_model: Callable[[str], None] | None = None,
    ) -> Response:
        """Answer one request for `tenant` (the caller's key id, never read from the body);
        `check_model` raises for a model the caller may not use."""
        request_id = uuid.uuid4().hex
        try:
            return await self._complete(request, request_id, tenant, check_model)
        except ClientGoneError:
            log.info("client left before the answer to %s", request_id)
            return Response(status_code=499)
        except RouterError as e:
            e.headers["x-request-id"] = request_id  # every answer names its request
            raise
        except Exception as e:
            # A bug: the client gets a 500 naming the request id; the log keeps the rest.
            log.exception("request %s failed", request_id)
            raise InternalError(request_id) from e

    async def _complete(
        self,
        request: Request,
        request_id: str,
        tenant: str,
        check_model: Callable[[str], None] | None,
    ) -> Response:
        body = await read_body(request, self.settings.max_body_bytes, self.upload_timeout)
        view = self.parser.parse(body)
        if check_model is not None:
            check_model(view.model)
        started = time.monotonic()
        job = Job(
            request_id=request_id,
            model=view.model,
            reply_to=self.bus.reply_queue,
            deadline=time.time() + self.settings.request_timeout,
            body=view.body,
            stream=view.stream,
            include_usage=view.include_usage,
            tenant=tenant,
            cache_control=cache_directives(request.headers.getlist("cache-control")),
        )
        call = self.bus.replies.open(request_id, view.model)
        watcher = watch_disconnect(request.receive, call)
        handed_to_stream = False
        try:
            await self.bus.submit(job)
            if view.stream:
                response = await self._stream(call, started, watcher)
                handed_to_stream = isinstance(response, SseRelay)
                return response
            return await self._json(call, started)
        except (ClientGoneError, asyncio.CancelledError):
            # Cancelled: the server cut the request off (its stop's last seconds); its job,
            # if it went out, must not run on for nobody.
            self.bus.cancel_soon(call)
            raise
        finally:
            if not handed_to_stream:
                watcher.cancel()
                self.bus.replies.close(request_id)

    async def _json(self, call: PendingCall, started: float) -> Response:
        remaining = self.settings.request_timeout - (time.monotonic() - started)
        try:
            reply = await call.next(remaining)
        except TimeoutError as e:
            self.bus.cancel_soon(call)
            raise DeadlineError("The model did not answer in time.") from e
        if reply.kind not in (ReplyKind.FINAL, ReplyKind.ERROR):
            self.bus.cancel_soon(call)  # else the backend streams on for nobody
            raise UpstreamError("The backend streamed an answer to a non-streaming request.")
        return Response(
            reply.body,
            status_code=reply_status(reply),
            media_type=JSON,
            headers=reply_headers(reply, call.request_id),
        )

    async def _stream(
        self, call: PendingCall, started: float, watcher: asyncio.Task[None]
    ) -> Response:
        settings = self.settings
        limits = StreamLimits(
            total=settings.request_timeout - (time.monotonic() - started),
            ttft=settings.ttft_timeout,
            idle=settings.stream_idle_timeout,
            now=time.monotonic(),
        )
        ttft_left = limits.first_chunk_by - time.monotonic()
        # Decided before waiting, not by the clock after it: a timer may fire a hair early.
        commits_early = settings.stream_keepalive_after < ttft_left
        first: Reply | None
        try:
            first = await call.next(settings.stream_keepalive_after if commits_early else ttft_left)
        except TimeoutError as e:
            if not commits_early:
                self.bus.cancel_soon(call)
                raise DeadlineError(NO_OUTPUT) from e
            first = None  # commit to 200 now and ping until the first chunk
        if first is not None and first.kind is ReplyKind.FINAL:
            # As after the commit (SseRelay): a stream is never answered with a non-stream.
            self.bus.cancel_soon(call)
            raise UpstreamError("The backend answered a stream with a non-stream.")
        if first is not None and first.kind is ReplyKind.ERROR:
            # An error before any output keeps its own status and body.
            return Response(
                first.body,
                status_code=reply_status(first),
                media_type=JSON,
                headers=reply_headers(first, call.request_id),
            )
        if first is None:
            headers = {"x-request-id": call.request_id}
        else:
            headers = reply_headers(first, call.request_id)

        async def finish(completed: bool) -> None:
            watcher.cancel()
            self.bus.replies.close(call.request_id)
            if not completed:
                await self.bus.cancel(call)

        return SseRelay(
            call,
            first,
            limits,
            headers=headers,
            ping_interval=settings.stream_keepalive_after,
            on_finish=finish,
        )
