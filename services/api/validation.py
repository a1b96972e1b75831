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
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

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


def _json_string(value: Any) -> Any:
    """A JSON string, before a `Literal` checks its value: pydantic calls `"role": 5` a wrong
    value, and OpenAI a wrong type (`invalid_type`)."""
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a valid string")
    return value


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """Bounds a request must keep (MAX_MESSAGES, MAX_TOKENS_LIMIT)."""

    max_messages: int = 2048
    max_tokens: int = 1_000_000


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Annotated[Role, BeforeValidator(_json_string)]
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


# OpenAI's codes for what it enforces; every `*_type` error is `invalid_type`, anything else
# `invalid_value`. A bound's code names the kind of number: `decimal_above_max_value` for
# `temperature`, `integer_above_max_value` for `n`.
_CODES = {
    "missing": "missing_required_parameter",
    "too_long": "array_above_max_length",
    "too_short": "empty_array",
    "less_than_equal": "{number}_above_max_value",
    "greater_than_equal": "{number}_below_min_value",
}
# What a `*_type` error expected, in JSON's words rather than pydantic's (which name classes).
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
}


def invalid_request(error: ValidationError, model: type[BaseModel]) -> InvalidRequestError:
    """The first violation of `model` as OpenAI would word it, naming the param (a JSON path
    without pydantic's union tags)."""
    fields = field_names(model)
    errors = [(_without_union_tags(e["loc"], fields), e) for e in error.errors(include_url=False)]
    first_loc = errors[0][0]
    # A union's members fail together; the deepest failure is the telling one (`[1]` for a
    # string-or-array is an array with a bad item, not a wrong string).
    related = [(loc, e) for loc, e in errors if loc[: len(first_loc)] == first_loc]
    loc, reported = max(related, key=lambda pair: len(pair[0]))
    param = param_path(loc) or None
    kind = reported["type"]
    if kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif kind.endswith("_type"):
        expected = dict.fromkeys(
            _EXPECTED.get(e["type"], "another type")
            for at, e in related
            if at == loc and e["type"].endswith("_type")
        )
        message = (
            f"Invalid type for '{param}': expected {' or '.join(expected)}, "
            f"but got {json_kind(reported['input'])} instead."
        )
    else:
        message = f"Invalid value for '{param}': {reported['msg']}."
    code = "invalid_type" if kind.endswith("_type") else _CODES.get(kind, "invalid_value")
    number = "decimal" if loc and loc[-1] in decimal_fields(model) else "integer"
    return InvalidRequestError(message, param=param, code=code.format(number=number))


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, as OpenAI names it in its messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


@functools.cache
def field_names(model: type[BaseModel]) -> frozenset[str]:
    """The field names of `model` and of every model nested in it."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(info.alias or name)
        for nested in _models_in(info.annotation):
            names |= field_names(nested)
    return frozenset(names)


@functools.cache
def decimal_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` (nested models too) that take any number, not only integers."""
    names = {
        info.alias or name
        for name, info in model.model_fields.items()
        if float in _types_in(info.annotation)
    }
    for info in model.model_fields.values():
        for nested in _models_in(info.annotation):
            names |= decimal_fields(nested)
    return frozenset(names)


def _types_in(annotation: Any) -> Iterator[Any]:
    """`StrictFloat | None` -> float, NoneType (through unions and `Annotated`)."""
    yield annotation
    for arg in get_args(annotation):
        yield from _types_in(arg)


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The models an annotation refers to (`list[ChatMessage] | None` -> ChatMessage)."""
    for kind in _types_in(annotation):
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield kind


def _without_union_tags(
    loc: tuple[int | str, ...], fields: frozenset[str]
) -> tuple[int | str, ...]:
    """`loc` without the union members pydantic names in it: ('messages', 0, 'content', 'str')
    -> ('messages', 0, 'content'). A name that is no field of the model is such a tag."""
    return tuple(part for part in loc if isinstance(part, int) or part in fields)


# Parsing makes a Python object per JSON value: 12 MiB of `[],` is four million lists, 600 MB
# and seconds of CPU in the API and again in the dispatcher. Real requests (tool schemas
# included) hold a few thousand values; strings (a prompt, an image) count as one.
MAX_JSON_VALUES = 100_000
# orjson reads 1024 levels of nesting but writes 254, and the dispatcher and agents write a body
# again (its cache key, the served model's name): a job nested deeper failed there, twice, and
# its client waited out REQUEST_TIMEOUT. Only a body with more brackets can nest that deep.
ORJSON_MAX_DEPTH = 254
# A string, or an unterminated one up to the end: a match that must find its closing quote
# fails from every quote of a body that has none, and scanned 164 KB for 25 s (review
# 2026-11-29). This one always matches, once per string: linear.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)


def _structure(raw: bytes) -> int:
    """Lists, objects and commas in `raw`: every value but the first of each list or object
    follows a comma, so this bounds how many values a body holds (counted at C speed; the
    commas and brackets inside strings too, unless they were taken out)."""
    return raw.count(b"[") + raw.count(b"{") + raw.count(b",")


def too_many_values(body: bytes) -> bool:
    """More than MAX_JSON_VALUES lists, objects and commas outside strings (each value counts
    once or twice: a list in a list is a bracket and a comma). Only a body with that many in
    all is searched for its strings (linear: ~0.2 s for a 12 MiB prompt)."""
    return _structure(body) > MAX_JSON_VALUES and (
        _structure(_JSON_STRING.sub(b"", body)) > MAX_JSON_VALUES
    )


def too_deep_to_write(data: Any, body: bytes) -> bool:
    """Whether the services could not write `data` again (nested past ORJSON_MAX_DEPTH)."""
    if body.count(b"[") + body.count(b"{") <= ORJSON_MAX_DEPTH:
        return False
    try:
        orjson.dumps(data)
    except orjson.JSONEncodeError:
        return True
    return False


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body; 400 for anything else (invalid UTF-8 and lone surrogates too,
    more than MAX_JSON_VALUES values, nesting past ORJSON_MAX_DEPTH)."""
    if too_many_values(body):
        raise InvalidRequestError(
            f"The JSON body has more than {MAX_JSON_VALUES} lists, objects and commas "
            "outside its strings.",
            code="invalid_json",
        )
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
    if too_deep_to_write(data, body):
        raise InvalidRequestError(
            f"The JSON body nests lists and objects more than {ORJSON_MAX_DEPTH} levels deep.",
            code="invalid_json",
        )
    return data


class ChatRequestParser:
    """Validates chat bodies against the OpenAI shape and the configured limits."""

    def __init__(self, limits: EdgeLimits | None = None) -> None:
        self.limits = limits or EdgeLimits()
        self._model = request_model(self.limits)
        self._adapter: TypeAdapter[ChatCompletionRequest] = TypeAdapter(self._model)

    def parse(self, body: bytes) -> ChatRequestView:
        """Parse and validate; raises InvalidRequestError naming the param on any violation."""
        data = parse_json_object(body)
        refuse_redirects(data)
        try:
            request = self._adapter.validate_python(data)
        except ValidationError as e:
            raise invalid_request(e, self._model) from e
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
