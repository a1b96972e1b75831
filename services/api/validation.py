"""Edge validation of `POST /v1/chat/completions` bodies.

The body is parsed once and checked against the fields the router relies on; unknown fields
pass through untouched (the raw bytes travel on, not a re-serialised copy). Violations become
400s that name the offending `param` the way OpenAI does (`messages[0].role`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, TypeAdapter, ValidationError

from shared.errors import InvalidRequestError

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None


class ChatCompletionRequest(BaseModel):
    """The fields the router validates; everything else is passed through as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None


_adapter: TypeAdapter[ChatCompletionRequest] = TypeAdapter(ChatCompletionRequest)


@dataclass(frozen=True, slots=True)
class ChatRequestView:
    """What the router itself needs from a valid request; the body travels as raw bytes."""

    model: str
    stream: bool
    include_usage: bool
    body: bytes


def param_path(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role', OpenAI's way of naming a param."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def invalid_request(error: ValidationError) -> InvalidRequestError:
    """The first violation as OpenAI would word it, naming the param."""
    first = error.errors(include_url=False)[0]
    param = param_path(first["loc"]) or None
    if first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {first['msg']}."
    return InvalidRequestError(message, param=param, code="invalid_value")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body; 400 for anything else."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            code="invalid_json",
        ) from e
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_type")
    return data


def parse_chat_request(body: bytes) -> ChatRequestView:
    """Parse and validate; raises InvalidRequestError naming the param on any violation."""
    data = parse_json_object(body)
    try:
        request = _adapter.validate_python(data)
    except ValidationError as e:
        raise invalid_request(e) from e
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return ChatRequestView(
        model=request.model,
        stream=bool(request.stream),
        include_usage=include_usage,
        body=body,
    )


def openapi_request_schema() -> dict[str, Any]:
    """The JSON schema of the request body, for the OpenAPI document."""
    return _adapter.json_schema(ref_template="#/components/schemas/{model}")
