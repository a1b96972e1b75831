"""Body rewriting and upstream error normalisation."""

from __future__ import annotations

import orjson
import pytest

from services.agent.bodies import (
    BodyError,
    for_server,
    normalise_error,
    stream_event,
    with_model,
)
from shared import request_bodies
from shared.request_bodies import SEARCH_FIRST_FROM


def test_with_model_rewrites_only_the_model() -> None:
    body = b'{"model":"local_m","messages":[{"role":"user","content":"hi"}],"x_extra":{"k":[1]}}'
    out = orjson.loads(with_model(body, "served-m"))
    assert out == {
        "model": "served-m",
        "messages": [{"role": "user", "content": "hi"}],
        "x_extra": {"k": [1]},
    }


@pytest.mark.parametrize("body", [b"[1]", b"not json", b""])
def test_with_model_refuses_non_objects(body: bytes) -> None:
    with pytest.raises(BodyError):
        with_model(body, "m")


@pytest.mark.parametrize("include_usage", [False, True])
def test_the_server_gets_include_usage_spelled_out(include_usage: bool) -> None:
    """vLLM reads `stream_options: {}` as asking for usage, OpenAI (and the router) as not."""
    body = b'{"model":"local_m","stream":true,"stream_options":{"x":1},"messages":[]}'
    sent = orjson.loads(for_server(body, "served-m", include_usage=include_usage))
    assert sent["model"] == "served-m"
    assert sent["stream_options"] == {"x": 1, "include_usage": include_usage}


def test_a_request_without_stream_options_is_left_without() -> None:
    body = b'{"model":"local_m","stream":true,"messages":[]}'
    assert "stream_options" not in orjson.loads(for_server(body, "m", include_usage=False))


def test_stream_event_chunk_is_framed_with_the_router_model() -> None:
    event = stream_event(b'{"id":"c1","model":"served","choices":[]}', "local_m")
    assert event.chunk == b'data: {"id":"c1","model":"local_m","choices":[]}\n\n'
    assert not event.done and event.error is None


def test_stream_event_done() -> None:
    assert stream_event(b"[DONE]", "local_m").done


def test_stream_event_error() -> None:
    event = stream_event(b'{"error":{"message":"boom","type":"x","code":400}}', "local_m")
    assert event.error is not None
    assert event.error.status == 400
    assert event.error.message == "boom"


def test_a_chunk_with_a_null_error_is_a_chunk() -> None:
    """Some OpenAI-compatible servers send `"error": null` beside the choices of every chunk."""
    event = stream_event(b'{"choices":[{"delta":{"content":"hi"}}],"error":null}', "local_m")
    assert event.error is None and event.chunk is not None
    assert orjson.loads(event.chunk.removeprefix(b"data: "))["model"] == "local_m"


def error_of(status: int, body: bytes) -> tuple[int, dict[str, object]]:
    failure = normalise_error(status, body)
    return failure.status, orjson.loads(failure.body)


def test_vllm_flat_error_leaves_in_openai_words() -> None:
    body = b'{"object":"error","message":"bad","type":"BadRequestError","param":null,"code":400}'
    assert error_of(400, body) == (
        400,
        {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}},
    )


@pytest.mark.parametrize(
    ("status", "vllm_type", "openai_type"),
    [
        (404, "NotFoundError", "invalid_request_error"),
        (409, "ConflictError", "invalid_request_error"),
        (500, "InternalServerError", "server_error"),
        (503, "ServiceUnavailableError", "server_error"),
    ],
)
def test_vllm_wrapped_error_keeps_its_status_param_and_message(
    status: int, vllm_type: str, openai_type: str
) -> None:
    body = orjson.dumps(
        {"error": {"message": "nope", "type": vllm_type, "param": "model", "code": status}}
    )
    assert error_of(status, body) == (
        status,
        {"error": {"message": "nope", "type": openai_type, "param": "model", "code": None}},
    )


def test_an_openai_shaped_error_keeps_every_field() -> None:
    body = (
        b'{"error":{"message":"quota","type":"insufficient_quota","param":null,'
        b'"code":"insufficient_quota"}}'
    )
    assert error_of(429, body) == (429, orjson.loads(body))


@pytest.mark.parametrize(
    ("status", "body", "expected_status", "expected_type"),
    [
        (503, b"Service Unavailable", 503, "server_error"),
        (429, b"", 429, "rate_limit_error"),
        (400, b'{"error":"text only"}', 400, "invalid_request_error"),
        (200, b'{"error":{"message":"m"}}', 502, "server_error"),
        (302, b"{}", 502, "server_error"),
    ],
)
def test_unhelpful_errors_still_get_openai_shape(
    status: int, body: bytes, expected_status: int, expected_type: str
) -> None:
    got_status, payload = error_of(status, body)
    assert got_status == expected_status
    error = payload["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == expected_type
    assert isinstance(error["message"], str) and error["message"]


def test_error_text_is_kept_when_only_a_string() -> None:
    _, payload = error_of(400, b'{"error":"text only"}')
    assert payload["error"] == {
        "message": "text only",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize("literal", [b"123456789012345678901234567890", b"-9223372036854775809"])
def test_a_number_orjson_cannot_keep_reaches_the_server_as_sent(literal: bytes) -> None:
    """An integer past 64 bits left as the nearest float; the served name still changes."""
    body = b'{"model":"local_m","messages":[],"vllm_xargs":{"x":%s}}' % literal
    sent = for_server(body, "served-m", include_usage=False)
    assert sent == b'{"model":"served-m","messages":[],"vllm_xargs":{"x":%s}}' % literal


def test_a_body_without_such_numbers_is_written_by_orjson() -> None:
    body = b'{"model":"local_m","messages":[],"temperature":0.7,"seed":9223372036854775807}'
    assert for_server(body, "served-m", include_usage=False) == (
        b'{"model":"served-m","messages":[],"temperature":0.7,"seed":9223372036854775807}'
    )


def test_a_large_body_with_such_an_integer_is_found_by_its_digits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past SEARCH_FIRST_FROM bytes the body is searched for the digits before the walk, and
    one without them is not walked at all (a walk of 100,000 values took 14 ms)."""
    prompt = "word " * (SEARCH_FIRST_FROM // 5)
    body = orjson.dumps({"model": "local_m", "messages": [{"role": "user", "content": prompt}]})
    big = body[:-1] + b',"vllm_xargs":{"x":123456789012345678901234567890}}'
    assert b"123456789012345678901234567890" in for_server(big, "m", include_usage=False)
    walked: list[object] = []
    monkeypatch.setattr(request_bodies, "may_hold_a_lost_integer", walked.append)
    assert for_server(body, "m", include_usage=False) == body.replace(b"local_m", b"m", 1)
    assert walked == []
