"""Upstream answers to router errors: what is relayed, retried, rewritten or hidden."""

from __future__ import annotations

import httpx
import orjson
import pytest

from services.dispatcher.providers.retry import RetryableFailure
from services.dispatcher.providers.upstream import (
    check_response,
    relay_headers,
    rewrite_model,
    scrub,
    stream_error,
    transport_failure,
    upstream_error,
)
from shared.errors import (
    GatewayTimeoutError,
    UpstreamError,
    UpstreamHTTPError,
    to_openai_error,
)

KEY = "sk-secret-canary-1234"
OPENAI_400 = b"""{
    "error": {
        "message": "Invalid 'messages': empty array.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "empty_array"
    }
}
"""
RATE_HEADERS = {
    "Retry-After": "7",
    "retry-after-ms": "7000",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-tokens": "1s",
    "x-request-id": "req_abc",
    "openai-organization": "org-x",
    "set-cookie": "a=b",
}


def test_relay_headers_keep_rate_limits_and_retry_hints_only() -> None:
    assert relay_headers(RATE_HEADERS) == {
        "retry-after": "7",
        "retry-after-ms": "7000",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-tokens": "1s",
        "x-upstream-request-id": "req_abc",
    }


def test_a_400_is_relayed_with_its_body_compacted_and_no_retry() -> None:
    error = upstream_error(400, OPENAI_400, {}, provider="openai")
    status, body, headers = to_openai_error(error)
    assert status == 400
    assert body == orjson.dumps(orjson.loads(OPENAI_400))
    assert b"\n" not in body  # fits one SSE data line
    assert headers == {"x-should-retry": "false"}
    assert error.message == "Invalid 'messages': empty array."


def test_a_429_keeps_its_rate_limit_headers_and_may_be_retried_by_the_client() -> None:
    body = orjson.dumps(
        {"error": {"message": "Rate limit", "type": "requests", "param": None, "code": "x"}}
    )
    status, relayed, headers = to_openai_error(
        upstream_error(429, body, RATE_HEADERS, provider="openai")
    )
    assert (status, relayed) == (429, body)
    assert headers["retry-after"] == "7" and headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in headers


def test_a_4xx_that_is_not_an_openai_error_gets_one() -> None:
    error = upstream_error(404, b"<html>nope</html>", {}, provider="openai")
    assert isinstance(error, UpstreamHTTPError)
    parsed = orjson.loads(to_openai_error(error)[1])
    assert parsed["error"]["type"] == "invalid_request_error"
    assert "HTTP 404" in parsed["error"]["message"]


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (400, {"message": "bad"}, ["bad", "invalid_request_error", None, None]),
        (429, {"message": "slow"}, ["slow", "rate_limit_error", None, None]),
        (
            400,
            {"message": "m", "type": 7, "param": ["x"], "code": True, "extra": 1},
            ["m", "invalid_request_error", None, None],
        ),
        (422, {"message": "m", "type": "t", "param": "p", "code": 42}, ["m", "t", "p", 42]),
    ],
)
def test_a_relayed_error_has_all_four_fields_of_the_right_type(
    status: int, error: dict[str, object], expected: list[object]
) -> None:
    """An upstream's partial or odd OpenAI error reaches the client whole: its own fields
    where they have the right type, defaults for the rest, nothing else."""
    body = orjson.dumps({"error": error, "extra": True})
    _, relayed, _ = to_openai_error(upstream_error(status, body, {}, provider="openai"))
    fields = orjson.loads(relayed)
    assert list(fields) == ["error"]
    assert list(fields["error"]) == ["message", "type", "param", "code"]
    assert list(fields["error"].values()) == expected


def test_the_key_is_scrubbed_from_relayed_bodies() -> None:
    body = orjson.dumps({"error": {"message": f"Incorrect API key {KEY}", "type": "x"}})
    _, relayed, _ = to_openai_error(upstream_error(403, body, {}, provider="openai", secret=KEY))
    assert KEY.encode() not in relayed and b"[redacted]" in relayed
    assert scrub(b"abc", "") == b"abc"


def test_a_401_is_the_routers_problem_not_relayed() -> None:
    body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {KEY}", "type": "x"}})
    error = upstream_error(401, body, {"x-request-id": "req_1"}, provider="openai", secret=KEY)
    status, relayed, headers = to_openai_error(error)
    assert status == 502 and b"credentials" in relayed and KEY.encode() not in relayed
    # The upstream's request id stays: it is what the operator quotes to its support.
    assert headers == {"x-should-retry": "false", "x-upstream-request-id": "req_1"}


def test_a_5xx_the_upstream_marks_not_to_retry_is_final() -> None:
    with pytest.raises(UpstreamError) as info:
        check_response(500, b"{}", {"X-Should-Retry": "false"}, provider="openai")
    assert not isinstance(info.value, RetryableFailure)
    with pytest.raises(RetryableFailure):
        check_response(500, b"{}", {"x-should-retry": "true"}, provider="openai")


@pytest.mark.parametrize("body", [b'{"id":"x","choices":[', b'{"id":"x"}{"id":"y"}', b"{"])
def test_a_2xx_whose_body_is_not_one_json_object_is_an_upstream_error(body: bytes) -> None:
    with pytest.raises(UpstreamError, match="not JSON") as info:
        check_response(200, body, RATE_HEADERS, provider="o")
    # The upstream's request id and rate limits, which its support and the client need.
    assert info.value.headers == relay_headers(RATE_HEADERS)


@pytest.mark.parametrize(
    ("status", "kind", "client_status"),
    [(500, UpstreamError, 502), (503, UpstreamError, 502), (504, GatewayTimeoutError, 504)],
)
def test_5xx_are_retryable_then_502_or_504(status: int, kind: type, client_status: int) -> None:
    with pytest.raises(RetryableFailure) as info:
        check_response(status, b"{}", {"retry-after": "2"}, provider="openai")
    assert isinstance(info.value.error, kind)
    assert info.value.error.status == client_status
    assert info.value.retry_after == 2.0


@pytest.mark.parametrize(
    ("status", "client_status"), [(503, 502), (500, 502), (504, 504), (408, 504), (302, 502)]
)
def test_5xx_keep_the_upstreams_relayed_headers_for_the_client(
    status: int, client_status: int
) -> None:
    """Once retries are spent, the client waits as long as the upstream asked, and has its
    rate limits and its request id (to quote to its support), as with a 4xx or a 2xx."""
    error = upstream_error(status, b"{}", RATE_HEADERS, provider="openai")
    status_sent, body, headers = to_openai_error(error)
    assert status_sent == client_status
    assert headers == relay_headers(RATE_HEADERS)
    assert headers["x-upstream-request-id"] == "req_abc"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert orjson.loads(body)["error"]["type"] in ("server_error", "timeout_error")
    assert upstream_error(503, b"{}", {}, provider="openai").headers == {}


def test_2xx_answers_are_relayed_as_they_are() -> None:
    response = check_response(200, b'{"id":"x"}', {"x-ratelimit-limit-requests": "5"}, provider="o")
    assert response.body == b'{"id":"x"}'
    assert response.headers == {"x-ratelimit-limit-requests": "5"}
    with pytest.raises(UpstreamError):
        check_response(200, b"<html>", {}, provider="o")


def test_a_2xx_whose_body_is_an_error_object_is_that_error_as_a_502() -> None:
    """Some OpenAI-compatible servers answer their errors with a 200: relayed as a success,
    the SDKs failed to read it (APIResponseValidationError) instead of seeing the error."""
    body = b'{"error":{"message":"overloaded ' + KEY.encode() + b'","type":"server_error"}}'
    with pytest.raises(UpstreamHTTPError) as info:
        check_response(200, body, RATE_HEADERS, provider="o", secret=KEY)
    assert info.value.status == 502 and info.value.headers == relay_headers(RATE_HEADERS)
    assert orjson.loads(info.value.body)["error"] == {
        "message": "overloaded [redacted]",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(UpstreamError, match="answered with an error"):
        check_response(200, b'{"error":"busy"}', {}, provider="o")
    # `"error": null` beside the choices, from some compatible servers, is no error.
    answer = b'{"id":"x","choices":[],"error":null}'
    assert check_response(200, answer, {}, provider="o").body == answer


def test_a_streams_error_event_is_relayed_or_replaced_by_the_routers_own() -> None:
    relayed = stream_error(
        b'{"error":{"message":"oops ' + KEY.encode() + b'"}}', provider="o", secret=KEY
    )
    assert relayed.status == 502
    assert orjson.loads(to_openai_error(relayed)[1])["error"] == {
        "message": "oops [redacted]",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    own = stream_error(b'{"error":"just text"}', provider="o")
    assert isinstance(own, UpstreamError) and "ended the stream with an error" in own.message


def test_transport_failures() -> None:
    assert isinstance(
        transport_failure(httpx.ReadTimeout("t"), provider="o").error, GatewayTimeoutError
    )
    assert isinstance(transport_failure(httpx.ConnectError("c"), provider="o").error, UpstreamError)
    # httpx-aiohttp reports a dropped connection as ConnectTimeout: not a timeout underneath.
    lost = httpx.ConnectTimeout("Server disconnected")
    lost.__cause__ = ConnectionResetError()
    failure = transport_failure(lost, provider="o")
    assert isinstance(failure.error, UpstreamError) and failure.error.status == 502


def test_rewrite_model_changes_only_the_model() -> None:
    body = (
        b'{"model":"openai/gpt-4o","messages":[{"role":"user","content":"hi"}],"n":2,'
        b'"tools":[{"type":"function","function":{"name":"f"}}],"logprobs":true,'
        b'"response_format":{"type":"json_object"},"stream_options":{"include_usage":true},'
        b'"x_unknown":{"deep":[1,2.5,null]}}'
    )
    rewritten = rewrite_model(body, "openai/gpt-4o", "gpt-4o")
    expected = orjson.loads(body)
    expected["model"] = "gpt-4o"
    assert orjson.loads(rewritten) == expected
    assert list(orjson.loads(rewritten)) == list(expected)  # order kept


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o","model":"gpt-4o-mini","messages":[]}',
        b'{"mod\\u0065l":"gpt-4o","model":"gpt-4o-mini","messages":[]}',
    ],
)
def test_a_key_given_twice_reaches_the_upstream_as_the_router_read_it(body: bytes) -> None:
    """The router checks the last copy (as orjson reads it) against a client key's models; an
    upstream that read the first would have served a model the key may not use."""
    sent = rewrite_model(body, "gpt-4o-mini", "gpt-4o-mini")
    assert sent == b'{"model":"gpt-4o-mini","messages":[]}'


def test_an_integer_past_64_bits_reaches_the_upstream_as_sent() -> None:
    """Written again by orjson, it left as the nearest float (`1.2345678901234568e+29`)."""
    body = b'{"model":"gpt-4o","messages":[],"x_trace":123456789012345678901234567890}'
    sent = rewrite_model(body, "gpt-4o", "gpt-4o")
    assert sent == body
