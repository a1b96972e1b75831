"""Rewriting OpenAI bodies between the router and the inference server (pure functions).

Each body is parsed once with orjson and written once. Upstream errors come in two shapes
(vLLM's older `{"object":"error","message","type","code"}` and OpenAI's `{"error":{...}}`)
and leave as OpenAI's, keeping the upstream status. They leave in OpenAI's words too: vLLM
names its types after exception classes (`BadRequestError`) and repeats the status as an
integer `code`, where OpenAI's clients expect `invalid_request_error` and a string or null.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from shared.errors import error_body
from shared.request_bodies import dump_request, load_request

# An error type in OpenAI's style (`invalid_request_error`, `insufficient_quota`) is kept.
_OPENAI_TYPE = re.compile(r"[a-z][a-z0-9_]*")
# The type of any other error: what OpenAI answers with that status.
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class BodyError(ValueError):
    """A body that is not a JSON object."""


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BodyError("body is not JSON") from e
    if not isinstance(payload, dict):
        raise BodyError("body is not a JSON object")
    return payload


def with_model(body: bytes, model: str) -> bytes:
    """`body` with its `model` set: the served name on the way in, the router id on the way
    out. Everything else passes through as sent. Raises BodyError."""
    payload = _load_object(body)
    payload["model"] = model
    return orjson.dumps(payload)


def for_server(body: bytes, served: str, *, include_usage: bool) -> bytes:
    """The request as the inference server gets it: its served model name, and a stream's
    `stream_options.include_usage` spelled out as the router read it. vLLM reads a missing
    `include_usage` as true where OpenAI reads false, so a client's `stream_options: {}` would
    bring it a usage chunk it did not ask for (and a cache replay would not). Every other
    value as sent, integers past 64 bits included. Raises BodyError."""
    try:
        payload = load_request(body)
    except ValueError as e:
        raise BodyError("body is not JSON") from e
    if not isinstance(payload, dict):
        raise BodyError("body is not a JSON object")
    payload["model"] = served
    options = payload.get("stream_options")
    if payload.get("stream") is True and isinstance(options, dict):
        payload["stream_options"] = {**options, "include_usage": include_usage}
    return dump_request(payload)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One upstream `data:` event, sorted: a chunk to relay, the end, or an error."""

    chunk: bytes | None = None  # framed `data: {...}\n\n`, model rewritten
    done: bool = False
    error: UpstreamFailure | None = None


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """An error the server answered: the status to keep and OpenAI's body."""

    status: int
    body: bytes
    message: str


def stream_event(data: bytes, model: str) -> StreamEvent:
    """Classify one SSE `data:` payload and rewrite its model. Raises BodyError."""
    if data.strip() == b"[DONE]":
        return StreamEvent(done=True)
    payload = _load_object(data)
    # `"error": null` beside the choices, from some compatible servers, is no error.
    if payload.get("error") is not None or payload.get("object") == "error":
        return StreamEvent(error=normalise_error(200, data, parsed=payload))
    payload["model"] = model
    return StreamEvent(chunk=b"data: " + orjson.dumps(payload) + b"\n\n")


def normalise_error(
    status: int, body: bytes, *, parsed: dict[str, Any] | None = None
) -> UpstreamFailure:
    """Map an upstream error answer to OpenAI's `{"error":{message,type,param,code}}`.

    A status of 200 (an error event inside a stream) or one out of the 4xx/5xx range takes the
    error's own integer `code` when it has one, else 502.
    """
    payload = parsed
    if payload is None:
        try:
            loaded = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            loaded = None
        payload = loaded if isinstance(loaded, dict) else {}
    inner = payload.get("error")
    fields: dict[str, Any] = inner if isinstance(inner, dict) else payload
    if isinstance(inner, str):  # `{"error": "text"}`, seen from some servers
        fields = {"message": inner}
    code = fields.get("code")
    if not 400 <= status <= 599:
        status = code if isinstance(code, int) and 400 <= code <= 599 else 502
    if status == 401:
        # The server refused the agent's key, not the client's: no key of the client's can fix
        # that, and an SDK shown a 401 would tell its user to check their own key.
        refusal = "The inference server rejected the agent's key (VLLM_API_KEY)."
        body = error_body(refusal, "server_error", code="upstream_auth_failed")
        return UpstreamFailure(status=502, body=body, message=refusal)
    message = fields.get("message")
    if not isinstance(message, str) or not message:
        message = f"The inference server answered {status}."
    type_ = fields.get("type")
    if not isinstance(type_, str) or not _OPENAI_TYPE.fullmatch(type_):
        type_ = _STATUS_TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
    param = fields.get("param")
    if not isinstance(param, str):
        param = None
    if not isinstance(code, str):
        code = None
    return UpstreamFailure(
        status=status, body=error_body(message, type_, param=param, code=code), message=message
    )
