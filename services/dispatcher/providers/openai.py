"""OpenAI's Chat Completions API over one pooled httpx client (aiohttp transport).

The HTTP shell only: what to retry, which headers to relay and how errors map live in
`retry` and `upstream`. The key goes into the `Authorization` header of each request and
nowhere else (httpx masks it in a `Headers` repr; no log line here prints headers).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from services.dispatcher.providers.base import ProviderRequest, ProviderResponse
from services.dispatcher.providers.retry import RetryableFailure, RetryPolicy, call_with_retries
from services.dispatcher.providers.sse import MAX_EVENT_BYTES, SseEventTooLargeError, SseSplitter
from services.dispatcher.providers.upstream import (
    broken_stream,
    check_response,
    raise_for_status,
    relay_headers,
    stream_error,
    transport_failure,
    upstream_error,
)
from shared.errors import AnswerTooLargeError, UpstreamError, read_within
from shared.messages import MAX_REPLY_BYTES

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# What an exchange with the upstream can fail with besides an answer: httpx's transport
# errors, a body its declared encoding cannot decode (`httpx.DecodingError`), and aiohttp's
# errors for an answer that is not valid HTTP (a bad status line, header or chunk), which the
# aiohttp transport passes on unmapped. All of them are the upstream's failure, not ours.
HTTP_FAILURES = (httpx.RequestError, aiohttp.ClientError)
USER_AGENT = "router/0.1"

T = TypeVar("T")


def build_http_client(*, max_connections: int, connect_timeout: float) -> httpx.AsyncClient:
    """The process's pooled client: aiohttp underneath (twice httpx's own throughput here)."""
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits),
        timeout=httpx.Timeout(connect_timeout),
        follow_redirects=False,
    )


class OpenAIProvider:
    name = "openai"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        policy: RetryPolicy | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        max_reply_bytes: int = MAX_REPLY_BYTES,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        self._policy = policy or RetryPolicy()
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_reply_bytes = max_reply_bytes
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={self._base_url!r})"

    # --- chat completions ----------------------------------------------------------------------
    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        return await self._with_retries(request, lambda: self._post_once(request))

    async def stream(self, request: ProviderRequest) -> OpenAIStream:
        return await self._with_retries(request, lambda: self._open_stream_once(request))

    async def _with_retries(
        self, request: ProviderRequest, attempt: Callable[[], Awaitable[T]]
    ) -> T:
        return await call_with_retries(
            attempt,
            policy=self._policy,
            deadline=request.deadline,
            label=f"{self.name} {request.request_id}",
            clock=self._clock,
            sleep=self._sleep,
            jitter=self._jitter,
        )

    async def _post_once(self, request: ProviderRequest) -> ProviderResponse:
        try:
            async with self._client.stream(
                "POST",
                f"{self._base_url}/chat/completions",
                content=request.body,
                headers=self._headers("application/json"),
                timeout=self._timeout(request.deadline, stream=False),
            ) as response:
                body = await read_at_most(response, self._max_reply_bytes)
        except HTTP_FAILURES as e:
            raise transport_failure(e, provider=self.name) from e
        return check_response(
            response.status_code,
            body,
            response.headers,
            provider=self.name,
            secret=self._api_key,
        )

    async def _open_stream_once(self, request: ProviderRequest) -> OpenAIStream:
        http_request = self._client.build_request(
            "POST",
            f"{self._base_url}/chat/completions",
            content=request.body,
            # identity: a compressed SSE stream would be held back by the decoder.
            headers={**self._headers("text/event-stream"), "accept-encoding": "identity"},
            timeout=self._timeout(request.deadline, stream=True),
        )
        try:
            response = await self._client.send(http_request, stream=True)
        except HTTP_FAILURES as e:
            raise transport_failure(e, provider=self.name) from e
        stream = OpenAIStream(
            response,
            provider=self.name,
            secret=self._api_key,
            max_event_bytes=self._max_reply_bytes,
        )
        try:
            if not 200 <= response.status_code < 300:
                raise_for_status(
                    response.status_code,
                    await read_at_most(response, self._max_reply_bytes),
                    response.headers,
                    provider=self.name,
                    secret=self._api_key,
                )
            content_type = response.headers.get("content-type", "")
            if "text/event-stream" not in content_type:
                if "json" in content_type:  # an error object in its place is that error
                    body = await read_at_most(response, self._max_reply_bytes)
                    check_response(
                        response.status_code,
                        body,
                        response.headers,
                        provider=self.name,
                        secret=self._api_key,
                    )
                raise UpstreamError(
                    f"The provider `{self.name}` did not answer with a stream.",
                    headers=stream.headers,
                )
            await stream.start()
        except HTTP_FAILURES as e:
            await stream.aclose()
            raise transport_failure(e, provider=self.name) from e
        except BaseException:
            await stream.aclose()
            raise
        return stream

    # --- models --------------------------------------------------------------------------------
    async def list_models(self) -> list[str]:
        try:
            response = await self._client.get(
                f"{self._base_url}/models",
                headers=self._headers("application/json"),
                timeout=httpx.Timeout(self._connect_timeout),
            )
        except HTTP_FAILURES as e:
            raise transport_failure(e, provider=self.name).error from e
        if response.status_code != 200:
            raise upstream_error(response.status_code, b"", response.headers, provider=self.name)
        return model_ids(response.content)

    # --- plumbing ------------------------------------------------------------------------------
    def _headers(self, accept: str) -> dict[str, str]:
        return {
            "authorization": f"Bearer {self._api_key}",
            "content-type": "application/json",
            "accept": accept,
            "user-agent": USER_AGENT,
        }

    def _timeout(self, deadline: float, *, stream: bool) -> httpx.Timeout:
        """Connect and read timeouts, neither past the deadline (read: between two bytes).

        A stream's read timeout bounds its silences (the first byte, between chunks). A JSON
        answer has none: its first byte comes only once the whole generation is done, so a
        slower answer would be cut, then paid for again by a retry; the job's deadline (the
        worker's timer) bounds it instead.
        """
        remaining = max(0.001, deadline - self._clock())
        connect = min(self._connect_timeout, remaining)
        silence = min(self._read_timeout, remaining)
        read = silence if stream else None
        return httpx.Timeout(connect=connect, read=read, write=silence, pool=connect)


class OpenAIStream:
    """An upstream SSE response, its events split as they arrive.

    `events()` ends at the upstream's `[DONE]`, or raises: at an error event (the upstream's
    error, which the worker sends as the stream's last event), or when the stream breaks.
    """

    def __init__(
        self,
        response: httpx.Response,
        *,
        provider: str,
        secret: str = "",
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self._response = response
        self._provider = provider
        self._secret = secret
        self._chunks = response.aiter_bytes()
        self._splitter = SseSplitter(max_event_bytes)
        self._ready: deque[bytes] = deque()
        self.headers = relay_headers(response.headers)

    async def start(self) -> None:
        """Read until the first event; raises RetryableFailure if the stream ends first."""
        while not self._ready and not self._splitter.done:
            if not await self._read_more():
                message = f"The provider `{self._provider}` ended a stream without output."
                raise RetryableFailure(UpstreamError(message, headers={**self.headers}))

    async def events(self) -> AsyncIterator[bytes]:
        while True:
            while self._ready:
                yield self._ready.popleft()
            if self._splitter.error is not None:
                raise stream_error(
                    self._splitter.error, provider=self._provider, secret=self._secret
                )
            if self._splitter.done:
                return
            try:
                more = await self._read_more()
            except HTTP_FAILURES as e:
                raise broken_stream(e, provider=self._provider) from e
            if not more:
                # A last `data: [DONE]` (or error event) cut from its blank line still ends
                # the stream as it says; anything else unfinished is a stream cut short.
                if self._splitter.feed(b"\n\n") == [] and self._splitter.done:
                    continue
                raise UpstreamError(f"The stream from the provider `{self._provider}` ended early.")

    async def _read_more(self) -> bool:
        """Read one piece into the event queue; False at the end of the body."""
        try:
            data = await anext(self._chunks)
        except StopAsyncIteration:
            return False
        try:
            self._ready.extend(self._splitter.feed(data))
        except SseEventTooLargeError as e:
            raise AnswerTooLargeError(
                f"The provider `{self._provider}` sent {e} (MAX_REPLY_BYTES).", headers=self.headers
            ) from e
        return True

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        await self._response.aclose()


async def read_at_most(response: httpx.Response, limit: int) -> bytes:
    """The whole body, or AnswerTooLargeError once it passes `limit` bytes (the upstream's
    headers kept): refused by its `content-length` before a byte is read, else while it
    arrives, so a huge answer never sits in memory whole. The same request would be as large
    again: not retried."""
    length = response.headers.get("content-length", "")
    return await read_within(
        response.aiter_bytes(),
        limit,
        length=int(length) if length.isdigit() else None,
        headers=relay_headers(response.headers),
    )


def model_ids(body: bytes) -> list[str]:
    """The ids of an OpenAI model list body (`{"data": [{"id": ...}]}`)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise UpstreamError("The provider's model list is not JSON.") from e
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise UpstreamError("The provider's model list has no `data`.")
    return sorted(
        {e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)}
    )
