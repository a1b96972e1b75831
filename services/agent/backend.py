"""The inference server's HTTP API (vLLM or any OpenAI-compatible server).

One pooled httpx client on the aiohttp transport (httpx's own transport measured at half the
throughput). Tests pass an `httpx.MockTransport`. Failures to reach the server map to
`UpstreamUnavailableError`, chained; an answer with an error status is returned as it is,
for the caller to relay with its status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from services.agent.models import served_names_from_listing
from shared.errors import UpstreamError

JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
SSE_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


class UpstreamUnavailableError(UpstreamError):
    """The inference server could not be reached, or dropped the connection mid-answer."""


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


class VllmClient:
    """Calls to one inference server. The caller bounds each call's total time."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.root = server_root(url)
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client = httpx.AsyncClient(
            base_url=self.root,
            # No read timeout: a long generation is bounded by the job's deadline instead.
            timeout=httpx.Timeout(None, connect=connect_timeout, pool=connect_timeout),
            transport=transport or AiohttpTransport(limits=limits),
            limits=limits,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def is_healthy(self) -> bool:
        """True when `/health` answers 200 (vLLM's readiness probe)."""
        try:
            response = await self._client.get("/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def served_models(self) -> list[str]:
        """The ids at `/v1/models`. Raises UpstreamUnavailableError (also for a bad answer)."""
        try:
            response = await self._client.get("/v1/models", headers=JSON_HEADERS, timeout=10.0)
            response.raise_for_status()
            return served_names_from_listing(orjson.loads(response.content))
        except (httpx.HTTPError, ValueError) as e:
            raise UpstreamUnavailableError(f"cannot list the server's models: {e!r}") from e

    async def complete(self, body: bytes) -> Answer:
        """POST a non-streaming chat completion. Raises UpstreamUnavailableError."""
        try:
            response = await self._client.post(
                "/v1/chat/completions", content=body, headers=JSON_HEADERS
            )
        except httpx.HTTPError as e:
            raise UpstreamUnavailableError(_describe(e)) from e
        return Answer(response.status_code, response.content)

    @asynccontextmanager
    async def stream(self, body: bytes) -> AsyncIterator[httpx.Response]:
        """POST a streaming chat completion; the response's body is not read yet.

        Leaving the block closes the connection if the body was not read to its end, which is
        how a cancelled job stops the server generating. Raises UpstreamUnavailableError when
        the server cannot be reached (reads from the yielded response raise `httpx` errors).
        """
        request = self._client.build_request(
            "POST", "/v1/chat/completions", content=body, headers=SSE_HEADERS
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise UpstreamUnavailableError(_describe(e)) from e
        try:
            yield response
        finally:
            await response.aclose()


def _describe(exc: httpx.HTTPError) -> str:
    return f"The inference server could not be reached ({type(exc).__name__})."
