"""What a cloud provider is to the dispatcher: a request in, an answer or a stream of SSE out.

A provider raises only `RouterError`s: an upstream 4xx as `UpstreamHTTPError` (relayed as it
came), upstream failures that retries did not fix as `UpstreamError` (502) or
`GatewayTimeoutError` (504). Retries happen inside the provider, before any output.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One chat completion for a provider.

    `body` is the client's raw JSON with `model` already set to `model` (the upstream name);
    `deadline` is a Unix time past which nobody waits for the answer.
    """

    request_id: str
    model: str
    body: bytes
    stream: bool
    deadline: float


@dataclass(frozen=True, slots=True)
class ProviderResponse:
    """A whole (non-streamed) answer: the upstream's body and the headers worth relaying."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class ProviderStream(Protocol):
    """An open upstream stream whose first event has arrived (so nothing is retried after)."""

    @property
    def headers(self) -> dict[str, str]:
        """Response headers worth relaying to the client."""
        ...

    def events(self) -> AsyncIterator[bytes]:
        """Framed SSE events (`data: ...\\n\\n`) as sent, up to and without `data: [DONE]`.

        Raises UpstreamError (or GatewayTimeoutError) when the stream breaks or ends without
        `[DONE]`.
        """
        ...

    async def aclose(self) -> None:
        """Release the connection (aborting the upstream call if it is still running)."""
        ...


class Provider(Protocol):
    name: str

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        """The whole answer of a non-streaming request (retried within the deadline)."""
        ...

    async def stream(self, request: ProviderRequest) -> ProviderStream:
        """Open a stream; failures before its first event are retried like `complete`'s."""
        ...

    async def list_models(self) -> list[str]:
        """The upstream's model ids (raises RouterError when it cannot say)."""
        ...
