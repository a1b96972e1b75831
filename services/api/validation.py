"""Edge validation of `POST /v1/chat/completions` bodies.

The body is parsed once and checked against the fields the router relies on; unknown fields
pass through untouched (the raw bytes travel on, not a re-serialised copy). Violations become
400s that name the offending `param` the way OpenAI does (`messages[0].role`).

Hostile input stops here: bodies that are not UTF-8 JSON (lone surrogates included, raw or
`\\ud800`-escaped, in values and keys: orjson refuses them), too many messages, absurd token
limits, and fields that would redirect outbound traffic (see `services.api.guards`) are 400s.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    TypeAdapter,
    ValidationError,
    create_model,
)
from pydantic_core import PydanticCustomError

from services.api.guards import extra_body_schema, openapi_properties, refuse_redirects
from shared.errors import InvalidRequestError

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

# A seed is an int64. The bound stops 1024 short of 2**63, the first double past it: tools that
# read the document compare numbers as doubles, and must not find a valid seed the API refuses.
SEED_BOUND = 2**63 - 1024
SCHEMA_REF = "#/components/schemas/{model}"
EXTRA_BODY_SCHEMA = "ExtraBody"
# As OpenAI: `stream_options` (unless null) only with `"stream": true`; the document says so too.
STREAM_OPTIONS_NEED_STREAM = {
    "if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
}


def _json_integer(value: Any) -> Any:
    """A JSON integer (2, or 2.0: JSON Schema counts both), never a string or a boolean."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


# No coercion, as OpenAI: `"n": "2"` and `"n": true` are refused (the body travels on as sent,
# so a coerced value would reach the upstream unchecked). StrictFloat takes 1 and 1.0 alike.
# (Bounds go before it in `Annotated`, or pydantic leaves them out of the JSON schema.)
NO_COERCION = BeforeValidator(_json_integer)


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """Bounds a request must keep (MAX_MESSAGES, MAX_TOKENS_LIMIT)."""

    max_messages: int = 2048
    max_tokens: int = 1_000_000


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
    n: Annotated[int, Field(ge=1, le=128), NO_COERCION] | None = None
    max_tokens: Annotated[int, Field(ge=1), NO_COERCION] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), NO_COERCION] | None = None
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, ge=0, le=1)
    seed: Annotated[int, Field(ge=-SEED_BOUND, le=SEED_BOUND), NO_COERCION] | None = None


def request_model(limits: EdgeLimits) -> type[ChatCompletionRequest]:
    """`ChatCompletionRequest` with the configured bounds on messages and token limits."""
    tokens = Annotated[int, Field(ge=1, le=limits.max_tokens), NO_COERCION] | None
    return create_model(
        "ChatCompletionRequest",
        __base__=ChatCompletionRequest,
        __doc__=ChatCompletionRequest.__doc__,
        messages=(list[ChatMessage], Field(min_length=1, max_length=limits.max_messages)),
        max_tokens=(tokens, None),
        max_completion_tokens=(tokens, None),
    )


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


# OpenAI's codes for the bounds it enforces; everything else is `invalid_value`.
_CODES = {
    "too_long": "array_above_max_length",
    "too_short": "empty_array",
    "less_than_equal": "integer_above_max_value",
    "greater_than_equal": "integer_below_min_value",
    "int_type": "invalid_type",
    "float_type": "invalid_type",
}


def invalid_request(error: ValidationError) -> InvalidRequestError:
    """The first violation as OpenAI would word it, naming the param."""
    first = error.errors(include_url=False)[0]
    param = param_path(first["loc"]) or None
    if first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {first['msg']}."
    return InvalidRequestError(
        message, param=param, code=_CODES.get(first["type"], "invalid_value")
    )


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body; 400 for anything else (invalid UTF-8 and lone surrogates too)."""
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


class ChatRequestParser:
    """Validates chat bodies against the OpenAI shape and the configured limits."""

    def __init__(self, limits: EdgeLimits | None = None) -> None:
        self.limits = limits or EdgeLimits()
        self._adapter: TypeAdapter[ChatCompletionRequest] = TypeAdapter(request_model(self.limits))

    def parse(self, body: bytes) -> ChatRequestView:
        """Parse and validate; raises InvalidRequestError naming the param on any violation."""
        data = parse_json_object(body)
        refuse_redirects(data)
        try:
            request = self._adapter.validate_python(data)
        except ValidationError as e:
            raise invalid_request(e) from e
        if request.stream_options is not None and not request.stream:
            raise InvalidRequestError(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return ChatRequestView(
            model=request.model,
            stream=bool(request.stream),
            include_usage=include_usage,
            body=body,
        )

    def json_schema(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the request body's JSON schema, the component schemas it refers to)."""
        schema = self._adapter.json_schema(ref_template=SCHEMA_REF)
        components: dict[str, Any] = schema.pop("$defs", {})
        ref = SCHEMA_REF.format(model=EXTRA_BODY_SCHEMA)
        schema["properties"].update(openapi_properties(ref))
        schema.update(copy.deepcopy(STREAM_OPTIONS_NEED_STREAM))
        components[EXTRA_BODY_SCHEMA] = extra_body_schema(ref)
        return schema, components


_default_parser = ChatRequestParser()


def parse_chat_request(body: bytes) -> ChatRequestView:
    """Parse and validate with the default limits (see `ChatRequestParser.parse`)."""
    return _default_parser.parse(body)
