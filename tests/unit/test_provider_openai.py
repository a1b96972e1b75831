"""The OpenAI provider against httpx.MockTransport: requests sent, answers, retries, streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from aiohttp import web

from services.dispatcher.providers.base import ProviderRequest
from services.dispatcher.providers.openai import OpenAIProvider, build_http_client, model_ids
from services.dispatcher.providers.retry import RetryPolicy
from services.dispatcher.providers.sse import MAX_EVENT_BYTES
from shared.errors import (
    AnswerTooLargeError,
    GatewayTimeoutError,
    UpstreamError,
    UpstreamHTTPError,
)
from tests.support.upstream import UpstreamServer

KEY = "sk-unit-key"
BASE = "https://upstream.test/v1"
BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"x_extra":1}'
ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024","choices":[]}'
EVENTS = [
    b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n',
    b'data: {"id":"c","choices":[],"usage":{"total_tokens":3}}\n\n',
]
SSE = {"content-type": "text/event-stream"}

Handler = Callable[[httpx.Request], httpx.Response]
E = TypeVar("E", bound=Exception)


class Upstream:
    """A scripted upstream: one handler per request, in order; records what it was sent."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        await request.aread()
        return self.handlers.pop(0)(request)


def provider(
    upstream: Upstream, *, max_retries: int = 2, **options: Any
) -> tuple[OpenAIProvider, list[float]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    return (
        OpenAIProvider(
            client,
            api_key=KEY,
            base_url=BASE + "/",
            policy=RetryPolicy(max_retries=max_retries, backoff_base=0.1),
            clock=lambda: 1000.0,
            sleep=sleep,
            jitter=lambda: 0.0,
            **options,
        ),
        slept,
    )


def request(*, stream: bool = False) -> ProviderRequest:
    return ProviderRequest(request_id="r1", model="gpt-4o", body=BODY, stream=stream, deadline=1060)


def status(code: int, body: bytes = b"{}", headers: dict[str, str] | None = None) -> Handler:
    return lambda _: httpx.Response(code, content=body, headers=headers)


def fail(exc: Exception) -> Handler:
    def handler(_: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def sse(*events: bytes, error: Exception | None = None) -> Handler:
    async def body() -> AsyncIterator[bytes]:
        for event in events:
            yield event
        if error is not None:
            raise error

    return lambda _: httpx.Response(200, content=body(), headers=SSE)


async def read_to_its_error(
    p: OpenAIProvider, error: type[E], match: str | None = None
) -> tuple[list[bytes], E]:
    """Open a stream and read it to the error it must end in: the events before it, and it."""
    stream = await p.stream(request(stream=True))
    got: list[bytes] = []
    with pytest.raises(error, match=match) as info:
        async for event in stream.events():
            got.append(event)
    await stream.aclose()
    return got, info.value


async def test_json_request_and_answer_pass_through() -> None:
    upstream = Upstream(status(200, ANSWER, {"x-ratelimit-remaining-tokens": "9"}))
    p, _ = provider(upstream)
    response = await p.complete(request())
    assert response.body == ANSWER
    assert response.headers == {"x-ratelimit-remaining-tokens": "9"}
    sent = upstream.requests[0]
    assert sent.method == "POST" and str(sent.url) == f"{BASE}/chat/completions"
    assert sent.content == BODY
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert KEY not in repr(sent.headers) and KEY not in repr(p)


@pytest.mark.parametrize("declared", [True, False])
async def test_a_json_answer_past_the_reply_limit_is_not_read_whole_nor_retried(
    declared: bool,
) -> None:
    """The whole body was read and parsed before any size check (a 135 MB answer took the
    dispatcher from 70 to 503 MB). Now a `content-length` past the limit is refused before a
    byte is read, a body without one once it passes the limit; the same request would be as
    large again, so it is not retried either, and the upstream's headers are kept."""
    pieces: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for _ in range(100):
            pieces.append(b"x" * 10)
            yield pieces[-1]

    def answer(_: httpx.Request) -> httpx.Response:
        headers = {"x-request-id": "req_9", "x-ratelimit-remaining-tokens": "5"}
        if declared:
            headers["content-length"] = "1000"
        return httpx.Response(200, content=body(), headers=headers)

    upstream = Upstream(answer, status(200, ANSWER))
    p, _ = provider(upstream, max_reply_bytes=100)
    with pytest.raises(AnswerTooLargeError) as info:
        await p.complete(request())
    assert len(upstream.requests) == 1 and len(pieces) == (0 if declared else 11)
    assert info.value.status == 502 and info.value.headers == {
        "x-upstream-request-id": "req_9",
        "x-ratelimit-remaining-tokens": "5",
        "x-should-retry": "false",
    }


async def test_a_streams_error_answer_past_the_reply_limit_is_not_read_whole() -> None:
    upstream = Upstream(status(500, b"x" * 101), status(200, ANSWER))
    p, _ = provider(upstream, max_reply_bytes=100)
    with pytest.raises(AnswerTooLargeError):
        await p.stream(request(stream=True))
    assert len(upstream.requests) == 1


async def test_a_json_answer_as_large_as_the_reply_limit_is_relayed() -> None:
    upstream = Upstream(status(200, ANSWER))
    p, _ = provider(upstream, max_reply_bytes=len(ANSWER))
    assert (await p.complete(request())).body == ANSWER


async def test_two_500s_then_a_200_is_answered_after_backoff() -> None:
    upstream = Upstream(status(500), status(502), status(200, ANSWER))
    p, slept = provider(upstream)
    assert (await p.complete(request())).body == ANSWER
    assert len(upstream.requests) == 3 and slept == [0.05, 0.1]


async def test_5xx_past_the_retries_is_a_502_with_the_last_retry_after() -> None:
    upstream = Upstream(status(500), status(500), status(503, headers={"retry-after": "4"}))
    p, _ = provider(upstream)
    with pytest.raises(UpstreamError) as info:
        await p.complete(request())
    assert info.value.status == 502 and len(upstream.requests) == 3
    assert info.value.headers == {"retry-after": "4", "x-should-retry": "false"}


async def test_a_5xx_with_retries_off_is_a_502_the_client_may_retry() -> None:
    upstream = Upstream(status(500))
    p, _ = provider(upstream, max_retries=0)
    with pytest.raises(UpstreamError) as info:
        await p.complete(request())
    assert len(upstream.requests) == 1 and "x-should-retry" not in info.value.headers


async def test_a_retry_after_longer_than_the_backoff_cap_is_relayed_at_once() -> None:
    upstream = Upstream(status(503, headers={"retry-after": "30"}), status(200, ANSWER))
    p, slept = provider(upstream)
    with pytest.raises(UpstreamError) as info:
        await p.complete(request())
    assert len(upstream.requests) == 1 and slept == []
    assert info.value.status == 502 and info.value.headers["retry-after"] == "30"


async def test_timeouts_past_the_retries_are_a_504() -> None:
    upstream = Upstream(fail(httpx.ReadTimeout("slow")), fail(httpx.ReadTimeout("slow")))
    p, _ = provider(upstream, max_retries=1)
    with pytest.raises(GatewayTimeoutError):
        await p.complete(request())
    assert len(upstream.requests) == 2


async def test_a_connection_error_is_retried() -> None:
    upstream = Upstream(fail(httpx.ConnectError("refused")), status(200, ANSWER))
    p, _ = provider(upstream)
    assert (await p.complete(request())).body == ANSWER


@pytest.mark.parametrize("code", [400, 404, 429])
async def test_4xx_is_relayed_at_once(code: int) -> None:
    body = b'{"error":{"message":"nope","type":"invalid_request_error","param":null,"code":null}}'
    upstream = Upstream(status(code, body, {"retry-after": "3"}))
    p, _ = provider(upstream)
    with pytest.raises(UpstreamHTTPError) as info:
        await p.complete(request())
    assert info.value.status == code and info.value.body == body
    assert info.value.headers["retry-after"] == "3"
    assert len(upstream.requests) == 1


async def test_a_stream_yields_every_event_until_done() -> None:
    upstream = Upstream(sse(*EVENTS, b"data: [DONE]\n\n"))
    p, _ = provider(upstream)
    stream = await p.stream(request(stream=True))
    assert [e async for e in stream.events()] == EVENTS
    await stream.aclose()
    assert upstream.requests[0].headers["accept"] == "text/event-stream"


async def test_a_stream_whose_data_fields_have_no_space_ends_at_its_done() -> None:
    """`data:[DONE]` (no space, as the SSE spec allows) ends the stream; it is not relayed
    and the stream is not cut short."""
    events = [event.replace(b"data: ", b"data:") for event in EVENTS]
    upstream = Upstream(sse(*events, b"data:[DONE]\n\n"))
    p, _ = provider(upstream)
    stream = await p.stream(request(stream=True))
    assert [e async for e in stream.events()] == events
    await stream.aclose()


async def test_a_stream_failing_before_its_first_event_is_retried() -> None:
    upstream = Upstream(
        status(503),
        sse(error=httpx.ReadError("reset")),
        sse(),  # ends without a byte
        sse(*EVENTS, b"data: [DONE]\n\n"),
    )
    p, slept = provider(upstream, max_retries=3)
    stream = await p.stream(request(stream=True))
    assert [e async for e in stream.events()] == EVENTS
    await stream.aclose()
    assert len(upstream.requests) == 4 and len(slept) == 3


async def test_a_stream_cut_after_its_first_event_is_an_error_not_a_retry() -> None:
    upstream = Upstream(sse(EVENTS[0], error=httpx.ReadError("reset")), sse(*EVENTS))
    p, _ = provider(upstream)
    got, _ = await read_to_its_error(p, UpstreamError, "interrupted")
    assert got == EVENTS[:1] and len(upstream.requests) == 1


async def test_a_stream_ending_without_done_is_an_error() -> None:
    upstream = Upstream(sse(*EVENTS))
    p, _ = provider(upstream)
    stream = await p.stream(request(stream=True))
    with pytest.raises(UpstreamError, match="ended early"):
        _ = [e async for e in stream.events()]
    await stream.aclose()


@pytest.mark.parametrize("done", [b"data: [DONE]\n", b"data: [DONE]", b"data: [DONE]\r\n"])
async def test_a_done_without_its_blank_line_still_ends_the_stream(done: bytes) -> None:
    upstream = Upstream(sse(*EVENTS, done))
    p, _ = provider(upstream)
    stream = await p.stream(request(stream=True))
    assert [e async for e in stream.events()] == EVENTS
    await stream.aclose()


async def test_an_event_cut_from_its_blank_line_at_the_end_is_a_stream_cut_short() -> None:
    upstream = Upstream(sse(*EVENTS[:2], b'data: {"id":"c","choices":[]}\n'))
    p, _ = provider(upstream)
    got, _ = await read_to_its_error(p, UpstreamError, "ended early")
    assert got == EVENTS[:2]


async def test_an_error_event_mid_stream_is_the_streams_error_and_its_end() -> None:
    """The upstream's error is what the stream raises (to be relayed as its last event): not
    an event followed by a second, "ended early" error."""
    error_event = (
        b'data: {"error":{"message":"Sorry, ' + KEY.encode() + b'","type":"server_error",'
        b'"param":null,"code":null}}\n\n'
    )
    upstream = Upstream(sse(*EVENTS[:2], error_event))
    p, _ = provider(upstream)
    got, error = await read_to_its_error(p, UpstreamHTTPError)
    assert got == EVENTS[:2] and len(upstream.requests) == 1
    assert error.status == 502
    assert orjson.loads(error.body) == {
        "error": {
            "message": "Sorry, [redacted]",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


async def test_a_stream_answered_with_json_is_an_error_with_the_upstreams_headers() -> None:
    headers = {"x-request-id": "req_7", "x-ratelimit-remaining-tokens": "5"}
    p, _ = provider(Upstream(status(200, ANSWER, headers)))
    with pytest.raises(UpstreamError, match="did not answer with a stream") as info:
        await p.stream(request(stream=True))
    assert info.value.headers == {
        "x-upstream-request-id": "req_7",
        "x-ratelimit-remaining-tokens": "5",
    }


async def test_a_stream_answered_with_a_json_error_object_is_that_error() -> None:
    """Some OpenAI-compatible servers fail a stream with a 200 and an error object: its message
    reaches the client, not "did not answer with a stream" (review 2026-11-29)."""
    body = (
        b'{"error":{"message":"model is loading","type":"server_error","param":null,"code":null}}'
    )
    headers = {"content-type": "application/json", "x-request-id": "req_9"}
    p, _ = provider(Upstream(status(200, body, headers)))
    with pytest.raises(UpstreamHTTPError) as info:
        await p.stream(request(stream=True))
    assert info.value.status == 502 and b"model is loading" in info.value.body
    assert info.value.headers == {"x-upstream-request-id": "req_9"}


async def test_a_stream_ending_before_any_output_is_an_error_with_the_upstreams_headers() -> None:
    empty = httpx.Response(200, content=b"", headers={**SSE, "x-request-id": "req_8"})
    p, _ = provider(Upstream(lambda _: empty), max_retries=0)
    with pytest.raises(UpstreamError, match="without output") as info:
        await p.stream(request(stream=True))
    assert info.value.headers == {"x-upstream-request-id": "req_8"}


async def test_a_stream_refused_with_a_4xx_is_relayed() -> None:
    body = b'{"error":{"message":"Rate limit","type":"requests","param":null,"code":null}}'
    upstream = Upstream(status(429, body, {"x-ratelimit-remaining-requests": "0"}))
    p, _ = provider(upstream)
    with pytest.raises(UpstreamHTTPError) as info:
        await p.stream(request(stream=True))
    assert info.value.status == 429
    assert info.value.headers["x-ratelimit-remaining-requests"] == "0"


async def test_list_models() -> None:
    models = orjson.dumps({"object": "list", "data": [{"id": "gpt-4o"}, {"id": "a"}, {"x": 1}]})
    upstream = Upstream(status(200, models))
    p, _ = provider(upstream)
    assert await p.list_models() == ["a", "gpt-4o"]
    assert str(upstream.requests[0].url) == f"{BASE}/models"
    assert upstream.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_list_models_failures_are_router_errors() -> None:
    p, _ = provider(Upstream(status(401), fail(httpx.ConnectError("x"))))
    with pytest.raises(UpstreamError):
        await p.list_models()
    with pytest.raises(UpstreamError):
        await p.list_models()
    with pytest.raises(UpstreamError):
        model_ids(b"[]")


async def test_a_5xx_marked_not_to_retry_is_not_sent_again() -> None:
    upstream = Upstream(status(500, headers={"x-should-retry": "false"}), status(200, ANSWER))
    p, _ = provider(upstream)
    with pytest.raises(UpstreamError) as info:
        await p.complete(request())
    assert info.value.status == 502 and len(upstream.requests) == 1


async def test_a_stream_event_past_the_limit_ends_the_stream_as_the_upstreams_failure() -> None:
    huge = b"data: " + b"x" * (MAX_EVENT_BYTES + 1)
    upstream = Upstream(sse(EVENTS[0], huge))
    p, _ = provider(upstream)
    got, error = await read_to_its_error(p, UpstreamError)
    assert got == EVENTS[:1]
    assert error.message == (
        f"The provider `openai` sent a stream event larger than {MAX_EVENT_BYTES} bytes "
        "(MAX_REPLY_BYTES)."
    )
    assert error.code == "answer_too_large" and error.headers == {"x-should-retry": "false"}


@pytest.mark.parametrize("stream", [False, True])
async def test_the_read_timeout_bounds_a_streams_silence_not_a_json_answers_generation(
    stream: bool,
) -> None:
    """A JSON answer's first byte comes once its whole generation is done: a generation
    longer than PROVIDER_READ_TIMEOUT was cut and run again (a 504 after two paid calls). It
    now waits for its deadline; a stream silent that long is still retried, then a 504."""
    calls = 0

    async def slow(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.5)
        if stream:
            return web.Response(body=b"data: [DONE]\n\n", content_type="text/event-stream")
        return web.Response(body=ANSWER, content_type="application/json")

    server = await UpstreamServer(slow).start()
    client = build_http_client(max_connections=4, connect_timeout=2.0)
    p = OpenAIProvider(
        client,
        api_key=KEY,
        base_url=server.url,
        policy=RetryPolicy(max_retries=1, backoff_base=0.01),
        read_timeout=0.2,
    )
    body = ProviderRequest("r1", "gpt-4o", BODY, stream=stream, deadline=time.time() + 30)
    try:
        async with asyncio.timeout(10):
            if stream:
                with pytest.raises(GatewayTimeoutError):
                    await p.stream(body)
            else:
                assert (await p.complete(body)).body == ANSWER
    finally:
        await client.aclose()
        await server.close()
    assert calls == (2 if stream else 1)


# What an upstream that does not speak HTTP properly sends, on a real socket: the aiohttp
# transport raises errors of its own for these, which httpx's types do not cover.
BROKEN_ANSWERS = {
    "bad header": b"HTTP/1.1 200 OK\r\nBad Header Line\r\ncontent-length: 2\r\n\r\n{}",
    "bad status line": b"HTTP/1.1 OK 200\r\ncontent-length: 2\r\n\r\n{}",
    "bad chunk": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "corrupt gzip": (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n"
        b"content-length: 8\r\n\r\nnot gzip"
    ),
}


@pytest.mark.parametrize("answer", list(BROKEN_ANSWERS))
@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_that_is_not_valid_http_is_a_retried_502(answer: str, stream: bool) -> None:
    calls = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(BROKEN_ANSWERS[answer])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = build_http_client(max_connections=4, connect_timeout=2.0)
    p = OpenAIProvider(
        client,
        api_key=KEY,
        base_url=f"http://127.0.0.1:{port}/v1",
        policy=RetryPolicy(max_retries=1, backoff_base=0.01),
        clock=lambda: 1000.0,  # `request()`'s deadline is 60 s after this
    )
    try:
        async with asyncio.timeout(10):
            with pytest.raises(UpstreamError) as info:
                if stream:
                    opened = await p.stream(request(stream=True))
                    await opened.aclose()
                else:
                    await p.complete(request())
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert info.value.status == 502 and calls == 2
