"""Edge validation of chat completion bodies."""

from __future__ import annotations

import orjson
import pytest

from services.api.validation import param_path, parse_chat_request
from shared.errors import InvalidRequestError


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
