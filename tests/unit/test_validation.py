"""Edge validation of chat completion bodies."""

from __future__ import annotations

import jsonschema_rs
import orjson
import pytest
from pydantic import ValidationError

from services.api.validation import (
    MAX_JSON_VALUES,
    ORJSON_MAX_DEPTH,
    ChatRequestParser,
    EdgeLimits,
    invalid_request,
    param_path,
)
from shared.errors import InvalidRequestError
from shared.messages import AgentHeartbeat

MESSAGES = [{"role": "user", "content": "hi"}]


def test_valid_body_keeps_its_raw_bytes() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x_new":{"a":1}}'
    view = ChatRequestParser().parse(body)
    assert view.body is body
    assert (view.model, view.stream, view.include_usage) == ("m", False, False)


def nested(depth: int) -> bytes:
    """A body `depth` levels deep (the object, then lists in lists in its field `x_deep`)."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    return b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x_deep":%s}' % (
        inner.encode()
    )


def test_a_body_nested_deeper_than_the_services_can_write_is_a_400() -> None:
    """Accepted, it failed where the dispatcher or agent writes the body again (orjson writes
    254 levels at most) and its client waited out REQUEST_TIMEOUT."""
    ChatRequestParser().parse(nested(ORJSON_MAX_DEPTH))
    orjson.dumps(orjson.loads(nested(ORJSON_MAX_DEPTH)))  # what passes can be written again
    with pytest.raises(InvalidRequestError) as info:
        ChatRequestParser().parse(nested(ORJSON_MAX_DEPTH + 1))
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_a_body_of_too_many_values_is_refused_before_it_is_parsed() -> None:
    """12 MiB of `[],` parsed to four million lists: 600 MB and 15 s of the API's and the
    dispatcher's loops for one request within MAX_BODY_BYTES (review 2026-11-29)."""
    many = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x":[%s]}' % b",".join(
        [b"[]"] * MAX_JSON_VALUES
    )
    with pytest.raises(InvalidRequestError) as info:
        ChatRequestParser().parse(many)
    assert info.value.code == "invalid_json" and "lists, objects and commas" in info.value.message


@pytest.mark.parametrize(
    "tail",
    [
        b'"' + b'\\"' * 200_000,  # a string never closed, full of escaped quotes
        b'"a\\' * 200_000,  # quotes, each opening a string cut by a backslash
    ],
)
def test_a_string_never_closed_is_refused_in_linear_time(tail: bytes) -> None:
    """The string search failed from every quote of a body without a closing one: 164 KB
    held the API's loop for 25 s; this 1 MB body would have taken hours (pytest's timeout
    ends a regression)."""
    body = b'{"model":"m","x":[' + b"," * (MAX_JSON_VALUES + 1) + tail
    with pytest.raises(InvalidRequestError) as info:
        ChatRequestParser().parse(body)
    assert info.value.code == "invalid_json"


def test_brackets_and_commas_inside_strings_are_not_values() -> None:
    """A long prompt (a pasted CSV file, code) holds far more of them than any limit."""
    text = 'a, b, "c", [d], {e}, \\, " ' * (MAX_JSON_VALUES // 4)
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
    assert ChatRequestParser().parse(body).model == "m"


def test_many_lists_side_by_side_are_not_depth() -> None:
    flat = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x":[%s]}' % b",".join(
        [b"[{}]"] * 500
    )
    assert ChatRequestParser().parse(flat).model == "m"


def test_stream_options() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    view = ChatRequestParser().parse(body)
    assert view.stream and view.include_usage


@pytest.mark.parametrize(
    ("loc", "path"),
    [(("model",), "model"), (("messages", 0, "role"), "messages[0].role"), ((), "")],
)
def test_param_path(loc: tuple, path: str) -> None:
    assert param_path(loc) == path


@pytest.mark.parametrize(
    "body",
    [b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}', b"\xc3\x28"],
)
def test_lone_surrogates_and_bad_utf8_are_400(body: bytes) -> None:
    with pytest.raises(InvalidRequestError):
        ChatRequestParser().parse(body)


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("n", 0, "integer_below_min_value"),
        ("n", 129, "integer_above_max_value"),
        ("max_tokens", 0, "integer_below_min_value"),
        ("max_tokens", EdgeLimits().max_tokens + 1, "integer_above_max_value"),
        ("max_completion_tokens", EdgeLimits().max_tokens + 1, "integer_above_max_value"),
        ("temperature", 3, "decimal_above_max_value"),
        ("temperature", -0.5, "decimal_below_min_value"),
        ("top_p", 1.5, "decimal_above_max_value"),
    ],
)
def test_numeric_bounds_name_the_param_and_the_kind_of_number(
    field: str, value: float, code: str
) -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user"}], field: value})
    with pytest.raises(InvalidRequestError) as info:
        ChatRequestParser().parse(body)
    assert (info.value.status, info.value.param, info.value.code) == (400, field, code)


STREAM_OPTIONS = {"include_usage": True}


@pytest.mark.parametrize("stream", [{"stream": False}, {"stream": None}, {}])
def test_stream_options_without_a_stream_are_refused_as_openai_does(stream: dict) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream_options": STREAM_OPTIONS, **stream}
    with pytest.raises(InvalidRequestError) as info:
        ChatRequestParser().parse(orjson.dumps(body))
    error = info.value
    assert (error.status, error.param, error.code) == (400, "stream_options", None)
    assert error.message == (
        "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    )


def test_null_stream_options_need_no_stream() -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": False, "stream_options": None}
    assert not ChatRequestParser().parse(orjson.dumps(body)).include_usage


@pytest.mark.parametrize(
    ("fields", "valid"),
    [
        ({"stream": True, "stream_options": STREAM_OPTIONS}, True),
        ({"stream": False, "stream_options": None}, True),
        ({"stream_options": None}, True),
        ({"stream": False, "stream_options": STREAM_OPTIONS}, False),
        ({"stream": None, "stream_options": STREAM_OPTIONS}, False),
        ({"stream_options": STREAM_OPTIONS}, False),
    ],
)
def test_the_document_states_the_stream_options_rule(fields: dict, valid: bool) -> None:
    schema, components = ChatRequestParser().json_schema()
    document = {**schema, "components": {"schemas": components}}  # where its $refs point
    body = {"model": "m", "messages": MESSAGES, **fields}
    assert jsonschema_rs.validator_for(document).is_valid(body) is valid


def user(**fields: object) -> list[dict[str, object]]:
    return [{"role": "user", **fields}]


@pytest.mark.parametrize(
    ("fields", "param", "code", "message"),
    [
        (
            {"messages": user(content=5)},
            "messages[0].content",
            "invalid_type",
            "Invalid type for 'messages[0].content': expected a string or an array, "
            "but got an integer instead.",
        ),
        (
            {"messages": user(content=[1])},
            "messages[0].content[0]",
            "invalid_type",
            "Invalid type for 'messages[0].content[0]': expected an object, "
            "but got an integer instead.",
        ),
        (
            {"messages": ["hi"]},
            "messages[0]",
            "invalid_type",
            "Invalid type for 'messages[0]': expected an object, but got a string instead.",
        ),
        (
            {"messages": [{"role": 5, "content": "hi"}]},
            "messages[0].role",
            "invalid_type",  # OpenAI's code for a wrong JSON type, not pydantic's wrong literal
            "Invalid type for 'messages[0].role': expected a string, but got an integer instead.",
        ),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages[0].role",
            "invalid_value",
            "Invalid value for 'messages[0].role': Input should be 'system', 'developer', "
            "'user', 'assistant', 'tool' or 'function'.",
        ),
        (
            {"messages": [{"content": "hi"}]},
            "messages[0].role",
            "missing_required_parameter",
            "Missing required parameter: 'messages[0].role'.",
        ),
        (
            {"messages": "hi"},
            "messages",
            "invalid_type",
            "Invalid type for 'messages': expected an array, but got a string instead.",
        ),
        (
            {"model": 5},
            "model",
            "invalid_type",
            "Invalid type for 'model': expected a string, but got an integer instead.",
        ),
        (
            {"stream": "yes"},
            "stream",
            "invalid_type",
            "Invalid type for 'stream': expected a boolean, but got a string instead.",
        ),
        (
            {"n": "2"},
            "n",
            "invalid_type",
            "Invalid type for 'n': expected an integer, but got a string instead.",
        ),
        (
            {"temperature": True},
            "temperature",
            "invalid_type",
            "Invalid type for 'temperature': expected a number, but got a boolean instead.",
        ),
        (
            {"stream": True, "stream_options": "x"},
            "stream_options",
            "invalid_type",
            "Invalid type for 'stream_options': expected an object, but got a string instead.",
        ),
        (
            {"stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
            "invalid_type",
            "Invalid type for 'stream_options.include_usage': expected a boolean, "
            "but got an integer instead.",
        ),
        (
            {"messages": user(content="x", name=None, tool_call_id=3), "n": 0},
            "n",
            "integer_below_min_value",
            "Invalid value for 'n': Input should be greater than or equal to 1.",
        ),
    ],
)
def test_violations_name_the_param_in_jsons_words(
    fields: dict, param: str, code: str, message: str
) -> None:
    body = {"model": "m", "messages": MESSAGES, **fields}
    with pytest.raises(InvalidRequestError) as info:
        ChatRequestParser().parse(orjson.dumps(body))
    error = info.value
    assert (error.param, error.code, error.message) == (param, code, message)


def test_agent_payloads_are_worded_the_same_way() -> None:
    with pytest.raises(ValidationError) as info:
        AgentHeartbeat.model_validate({"name": "a", "load": True})
    error = invalid_request(info.value, AgentHeartbeat)
    assert (error.param, error.code) == ("load", "invalid_type")
    assert error.message == "Invalid type for 'load': expected a number, but got a boolean instead."
