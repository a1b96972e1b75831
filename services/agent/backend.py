"""The inference server's HTTP API (vLLM or any OpenAI-compatible server), on raw aiohttp.

One pooled `aiohttp.ClientSession`, created on first use (it must be made inside the event
loop). Raw aiohttp rather than httpx: httpx on its aiohttp transport cost about three times
the agent's CPU per call (540-690 us against 170-210 us for a JSON call: `python -m
bench.clients`, bench/RESULTS.md), a third of the agent's whole budget per request. The
surface stays small and free of aiohttp types: `complete()` returns an `Answer`, `stream()`
yields an `UpstreamStream`.

Errors: failing to reach the server (or losing the connection before an answer) raises
`UpstreamUnavailableError`; a stream that breaks off once its status arrived raises
`UpstreamBrokenError` from `UpstreamStream.chunks()`. Both are chained to aiohttp's error. An
answer with an error status is returned as it is, for the caller to relay with its status.

Leaving `stream()` before the body's end closes the connection, and so does cancelling
`complete()`: that is how a cancelled job stops the server generating.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import orjson
from yarl import URL

from services.agent.models import served_names_from_listing
from shared.errors import UpstreamError, read_within
from shared.http_headers import upstream_hints

JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
SSE_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


class UpstreamUnavailableError(UpstreamError):
    """The inference server could not be reached, or dropped the connection before answering."""


class UpstreamBrokenError(UpstreamError):
    """The inference server's stream broke off after its status line."""


def server_root(url: str) -> str:
    """`http://h:8000/v1/` or `http://h:8000` -> `http://h:8000` (the URL without `/v1`)."""
    root = url.strip().rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    if not root.startswith(("http://", "https://")):
        raise ValueError(f"VLLM_URL must be an http(s) URL, got {url!r}")
    return root


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    hints: dict[str, str] = field(default_factory=dict)  # retry and rate-limit headers


async def _read_at_most(response: aiohttp.ClientResponse, limit: int | None) -> bytes:
    """The whole body, or AnswerTooLargeError once it passes `limit` bytes: refused by its
    `content-length` before a byte is read (vLLM sends one), else while it arrives."""
    if limit is None:
        return await response.read()
    length = response.content_length
    if length is not None and length <= limit:
        return await response.read()
    return await read_within(response.content.iter_any(), limit, length=length)


class UpstreamStream:
    """A streaming answer whose body has not been read yet."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status

    @property
    def hints(self) -> dict[str, str]:
        """The answer's retry and rate-limit headers (read for an error answer only)."""
        return upstream_hints(self._response.headers)

    async def read(self) -> bytes:
        """The whole body (an error answer). Raises UpstreamBrokenError."""
        try:
            return await self._response.read()
        except aiohttp.ClientError as e:
            raise UpstreamBrokenError(_broke_off(e)) from e

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Raises UpstreamBrokenError."""
        content = self._response.content
        try:
            async for chunk in content.iter_any():
                yield chunk
        except aiohttp.ClientError as e:
            raise UpstreamBrokenError(_broke_off(e)) from e

    @property
    def finished(self) -> bool:
        return self._response.content.is_eof()


class VllmClient:
    """Calls to one inference server. The caller bounds each call's total time."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, api_key: str = "") -> None:
        self.root = server_root(url)
        # vLLM's --api-key guards every /v1 route (not /health).
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._chat_url = URL(f"{self.root}/v1/chat/completions")
        self._models_url = URL(f"{self.root}/v1/models")
        self._health_url = URL(f"{self.root}/health")
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # No pool limit: the agent's slots bound its calls (AGENT_CONCURRENCY per
                # model). A limit below models x slots made calls and the health check wait
                # for a connection, and the watchdog took a busy agent for a dead one.
                connector=aiohttp.TCPConnector(limit=0),
                # No read timeout: a long generation is bounded by the job's deadline instead.
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
                cookie_jar=aiohttp.DummyCookieJar(),  # an inference server sets no cookies
                headers=self._auth,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def is_healthy(self) -> bool:
        """True when `/health` answers 200 (vLLM's readiness probe). A server without that
        route (404 or 405: an OpenAI-compatible server that is not vLLM) counts as healthy
        when `/v1/models` answers 200, so the agent does not take it for a dead one."""
        timeout = aiohttp.ClientTimeout(total=5.0)
        try:
            async with self._http().get(self._health_url, timeout=timeout) as response:
                if response.status not in (404, 405):
                    return response.status == 200
            async with self._http().get(self._models_url, timeout=timeout) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def served_models(self) -> list[str]:
        """The ids at `/v1/models`. Raises UpstreamUnavailableError (also for a bad answer)."""
        try:
            timeout = aiohttp.ClientTimeout(total=10.0)
            async with self._http().get(
                self._models_url, headers=JSON_HEADERS, timeout=timeout
            ) as response:
                if response.status == 401:
                    refused = "refused" if self._auth else "wants"
                    raise UpstreamUnavailableError(
                        f"the server {refused} the agent's key: set VLLM_API_KEY to its --api-key"
                    )
                response.raise_for_status()
                return served_names_from_listing(orjson.loads(await response.read()))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise UpstreamUnavailableError(
                f"cannot list the server's models: {type(e).__name__}: {e}"
            ) from e

    async def complete(self, body: bytes, *, max_bytes: int | None = None) -> Answer:
        """POST a non-streaming chat completion. Raises UpstreamUnavailableError, and
        AnswerTooLargeError for a body past `max_bytes` (not read into memory whole)."""
        try:
            async with self._http().post(
                self._chat_url, data=body, headers=JSON_HEADERS
            ) as response:
                # Headers for the client of an error answer only: not on every 200.
                hints = upstream_hints(response.headers) if response.status != 200 else {}
                return Answer(response.status, await _read_at_most(response, max_bytes), hints)
        except aiohttp.ClientError as e:
            raise UpstreamUnavailableError(_describe(e)) from e

    @asynccontextmanager
    async def stream(self, body: bytes) -> AsyncIterator[UpstreamStream]:
        """POST a streaming chat completion; the answer's body is not read yet.

        Raises UpstreamUnavailableError when the server cannot be reached.
        """
        try:
            response = await self._http().post(self._chat_url, data=body, headers=SSE_HEADERS)
        except aiohttp.ClientError as e:
            raise UpstreamUnavailableError(_describe(e)) from e
        stream = UpstreamStream(response)
        try:
            yield stream
        finally:
            if stream.finished:
                response.release()  # read to its end: the connection goes back to the pool
            else:
                response.close()  # closing the connection is what stops the generation


def _describe(exc: BaseException) -> str:
    return f"The inference server could not be reached ({type(exc).__name__})."


def _broke_off(exc: BaseException) -> str:
    return f"The inference server's stream broke off ({type(exc).__name__})."
