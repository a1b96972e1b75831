"""Edge validation of chat completion bodies."""

from __future__ import annotations

import jsonschema_rs
import orjson
import pytest

from services.api.validation import ChatRequestParser, param_path, parse_chat_request
from shared.errors import InvalidRequestError

MESSAGES = [{"role": "user", "content": "hi"}]


def test_valid_body_keeps_its_raw_bytes() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x_new":{"a":1}}'
    view = parse_chat_request(body)
    assert view.body is body
    assert (view.model, view.stream, view.include_usage) == ("m", False, False)


def test_stream_options() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    view = parse_chat_request(body)
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
        parse_chat_request(body)


def test_n_and_max_tokens_limits_name_the_param() -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user"}], "n": 0})
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(body)
    assert info.value.param == "n"


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
