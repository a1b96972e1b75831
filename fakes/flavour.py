"""The interface a wire flavour (vLLM, OpenAI) gives the generic server.

Contract: a flavour owns every byte that differs between upstreams (ids,
bodies, error shapes, headers, extra routes); `fakes.server` owns the HTTP
flow, pacing, faults and stats, and never formats a body itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from fakes.core import ApiError, Completion, Event, JsonObj

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete non-streamed response."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)


class Flavour(Protocol):
    """What the generic server asks of a flavour."""

    name: str  # "fake-vllm" / "fake-openai": the process banner
    model_required: bool  # False: a request without "model" gets the first one
    strict_stream_options: bool  # see `fakes.core.parse_chat_request`
    usage_by_default: bool  # likewise
    enforces_context: bool  # refuses what does not fit `max_model_len` (vLLM)
    known_fields: frozenset[str] | None  # the request fields it takes; None: any (vLLM)

    def completion_id(self, request: web.Request) -> str:
        """A fresh `chatcmpl-...` id for one request."""
        ...

    def tool_call_id(self) -> str:
        """A fresh id for one tool call."""
        ...

    def format_arguments(self, arguments: JsonObj) -> str:
        """Tool-call arguments as this upstream's model would print them."""
        ...

    def check_auth(self, request: web.Request) -> Reply | None:
        """None when the request may proceed, else the 401 to send."""
        ...

    def response_headers(self, started: float) -> dict[str, str]:
        """Headers on every /v1 response; `started` is the monotonic arrival time."""
        ...

    def error(self, error: ApiError) -> Reply:
        """The flavour's reply for a rejected request."""
        ...

    def status_error(self, status: int, model: str | None) -> Reply:
        """The flavour's real error body for a scripted status (e.g. 429, 500)."""
        ...

    def json_body(self, completion: Completion) -> bytes:
        """The non-streamed chat completion body."""
        ...

    def stream_events(self, completion: Completion) -> list[Event]:
        """Every SSE event of the stream, [DONE] included, tagged with its step."""
        ...

    def stream_failure(self, message: str) -> list[bytes]:
        """What ends a stream whose generation failed: the error event, and what follows."""
        ...

    def models_body(self) -> bytes:
        """The `GET /v1/models` body."""
        ...

    def extra_routes(self) -> list[web.RouteDef]:
        """Routes only this upstream has (e.g. vLLM's /health)."""
        ...
