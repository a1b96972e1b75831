"""The first request through RabbitMQ end to end: the `dummy` model, errors, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from services.api.settings import ApiSettings
from tests.integration.conftest import sdk_client
from tests.support.procs import Stack, free_port, running_stack, wait_for, wait_http

MESSAGES = [{"role": "user", "content": "Say hello"}]


def test_sdk_gets_the_placeholder(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="dummy", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "Hello world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "dummy"
    assert completion.id.startswith("chatcmpl-")
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_sdk_streams_the_placeholder(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="dummy", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert chunks, "no chunks"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1


def test_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="dummy",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing_is_byte_exact(api_url: str) -> None:
    body = {"model": "dummy", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{api_url}/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        assert "content-length" not in r.headers
        raw = b"".join(r.iter_raw())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for event in events[:-2]:
        assert event.startswith(b"data: {") and b"\n" not in event
        payload = event[len(b"data: ") :]
        assert orjson.dumps(orjson.loads(payload)) == payload  # compact JSON, as OpenAI sends
    assert b"event:" not in raw


async def test_200_concurrent_requests_all_answered(api_url: str) -> None:
    body = {"model": "dummy", "messages": MESSAGES}
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=api_url, timeout=30, limits=limits) as http:
        responses = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=body) for _ in range(200))
        )
    assert [r.status_code for r in responses] == [200] * 200
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 200


def _post(api_url: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{api_url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **headers},
        timeout=10,
    )


def _assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": "", "messages": MESSAGES}, "model"),
        ({"model": 5, "messages": MESSAGES}, "model"),
        ({"model": "dummy"}, "messages"),
        ({"model": "dummy", "messages": []}, "messages"),
        ({"model": "dummy", "messages": ["hi"]}, "messages[0]"),
        ({"model": "dummy", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "dummy", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "dummy", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": "dummy", "messages": MESSAGES, "stream_options": {}}, "stream_options"),
    ],
)
def test_schema_violations_name_the_param(api_url: str, body: dict, param: str) -> None:
    error = _assert_openai_error(_post(api_url, orjson.dumps(body)), 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'"text"', b"\xff\xfe{}"])
def test_malformed_bodies_are_400(api_url: str, content: bytes) -> None:
    _assert_openai_error(_post(api_url, content), 400)


def test_a_refusal_is_logged_under_the_request_id_it_answered(api_url: str, stack: Stack) -> None:
    """A client quotes `x-request-id`; the api's log must know it, though it logs no success."""
    response = _post(api_url, orjson.dumps({"model": "dummy", "messages": []}))
    request_id = response.headers["x-request-id"]
    [api] = [s for s in stack.services if s.name == "api"]
    wait_for(lambda: request_id in api.log(), timeout=5, message="refusal not logged")
    [line] = [line for line in api.log().splitlines() if request_id in line]
    assert line.endswith(
        f"request {request_id} answered 400 empty_array: " + "Invalid value "
        "for 'messages': List should have at least 1 item after validation, "
        "not 0."
    )


def test_unknown_fields_pass_through(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="dummy",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_body={"brand_new_parameter": {"nested": [1, 2]}},
    )
    assert completion.choices[0].message.content == "Hello world"


MAX_BODY_BYTES = ApiSettings.model_fields["max_body_bytes"].default  # the shared stack's


def test_body_over_the_limit_is_413(api_url: str) -> None:
    content = "x" * MAX_BODY_BYTES  # with the rest of the body, past the limit
    big = orjson.dumps({"model": "dummy", "messages": [{"role": "user", "content": content}]})
    _assert_openai_error(_post(api_url, big), 413)


def test_chunked_body_over_the_limit_is_413(api_url: str) -> None:
    def chunks():  # no Content-Length: the limit must hold while reading
        yield b'{"model": "dummy", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 1):
            yield b"x" * 65536
        yield b'"}]}'

    response = httpx.post(f"{api_url}/v1/chat/completions", content=chunks(), timeout=10)
    _assert_openai_error(response, 413)


def test_wrong_method_is_405(api_url: str) -> None:
    _assert_openai_error(httpx.get(f"{api_url}/v1/chat/completions"), 405)


def test_unknown_route_is_404(api_url: str) -> None:
    error = _assert_openai_error(httpx.get(f"{api_url}/v1/nothing-here"), 404)
    assert error == {  # as OpenAI words it
        "message": "Invalid URL (GET /v1/nothing-here)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_unknown_model_is_a_404_not_a_wait_for_the_deadline(client: openai.OpenAI) -> None:
    # The dispatcher refuses it at once: a job left waiting would end 504 at its deadline.
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"


def test_unknown_model_stream_is_404_not_a_200_stream(api_url: str) -> None:
    body = orjson.dumps({"model": "no-such-model", "messages": MESSAGES, "stream": True})
    error = _assert_openai_error(_post(api_url, body), 404)
    assert (error["code"], error["param"]) == ("model_not_found", None)  # as OpenAI's chat


def test_models_lists_dummy(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "dummy" in ids


def test_health_and_ready(api_url: str) -> None:
    assert httpx.get(f"{api_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{api_url}/ready").status_code == 200


def test_broker_unreachable_is_503(isolated: Stack) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    isolated.start(
        "api-no-broker",
        ["api"],
        API_PORT=str(port),
        RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
    )
    wait_http(f"{url}/health")
    assert httpx.get(f"{url}/ready").status_code == 503
    response = _post(url, orjson.dumps({"model": "dummy", "messages": MESSAGES}))
    error = _assert_openai_error(response, 503)
    assert error["type"] == "server_error"
    assert response.headers.get("retry-after")


def test_no_dispatcher_gives_504_at_deadline_and_job_never_runs(
    isolated: Stack, tmp_path: Path
) -> None:
    url = isolated.start_api(REQUEST_TIMEOUT="1.5")
    body = orjson.dumps({"model": "dummy", "messages": MESSAGES})
    started = time.monotonic()
    response = _post(url, body)
    elapsed = time.monotonic() - started
    error = _assert_openai_error(response, 504)
    assert error["type"] == "timeout_error"
    assert response.headers["x-should-retry"] == "false"  # the SDK would wait it out 3 times
    assert 1.4 <= elapsed < 3.5
    expired_id = response.headers["x-request-id"]

    # A dispatcher that starts later serves new requests through the same API, and never runs
    # the expired job (the broker dropped it, or the dispatcher did at its deadline).
    dispatcher = isolated.start_dispatcher(tmp_path)
    deadline = time.monotonic() + 15
    while True:
        response = _post(url, body)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello world"
    time.sleep(0.5)
    log = dispatcher.log()
    assert f"job {expired_id} model=" not in log


def test_two_clients_get_their_own_answers(api_url: str) -> None:
    with sdk_client(api_url) as first, sdk_client(api_url) as second:
        a = first.chat.completions.create(model="dummy", messages=MESSAGES)  # type: ignore[arg-type]
        b = second.chat.completions.create(model="dummy", messages=MESSAGES)  # type: ignore[arg-type]
    assert a.id != b.id


def test_dispatcher_reports_ready_once_consuming(isolated: Stack, tmp_path: Path) -> None:
    port = free_port()
    dispatcher = isolated.start_dispatcher(tmp_path, HEALTH_PORT=str(port))
    wait_http(f"http://127.0.0.1:{port}/ready", service=dispatcher)
    status = httpx.get(f"http://127.0.0.1:{port}/health").json()
    assert status["service"] == "dispatcher" and status["consuming"] is True


def test_dispatcher_waits_for_a_broker_that_is_down(isolated: Stack, tmp_path: Path) -> None:
    port = free_port()
    dispatcher = isolated.start_dispatcher(
        tmp_path,
        HEALTH_PORT=str(port),
        RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
    )
    wait_http(f"http://127.0.0.1:{port}/health", service=dispatcher)
    assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 503
    assert dispatcher.is_running()


def http_get(sock: socket.socket, path: str) -> bytes:
    """One GET on an open connection; the status line of its answer (the body read too)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: api\r\n\r\n".encode())
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(4096)
        assert chunk, "the API closed the connection"
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(4096)
    return head.split(b"\r\n")[0]


def test_an_idle_connection_outlives_a_client_pools_expiry(api_url: str) -> None:
    """httpx's pool (the OpenAI SDK's, the agents' heartbeats) reuses a connection idle up to
    5 s: uvicorn's own 5 s would close it just as a request is written on it."""
    port = int(api_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert http_get(sock, "/health") == b"HTTP/1.1 200 OK"
        time.sleep(5.5)
        assert http_get(sock, "/health") == b"HTTP/1.1 200 OK"


def test_an_idle_connection_is_closed_after_the_keepalive_timeout(isolated: Stack) -> None:
    url = isolated.start_api(API_KEEPALIVE_TIMEOUT="1")
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert http_get(sock, "/health") == b"HTTP/1.1 200 OK"
        time.sleep(2)
        assert sock.recv(1) == b""  # the API closed it


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_api_exits_0_without_a_traceback(sig: signal.Signals) -> None:
    """uvicorn raised the signal it caught again after its graceful shutdown: SIGTERM ended
    the API by signal (-15; 143 in Docker), Ctrl-C with a KeyboardInterrupt traceback."""
    with running_stack({"LOG_LEVEL": "INFO"}) as stack:
        stack.start_api(DRAIN_TIMEOUT="1")
        [api] = stack.services
        api.signal(sig)
        assert api.process is not None and api.process.wait(20) == 0, api.log()[-2000:]
        assert "Traceback" not in api.log()


def test_an_api_forced_to_stop_by_a_second_signal_does_not_exit_0() -> None:
    """A second signal cuts the drain short: requests still waiting are dropped, so the exit
    must not say the stop was clean."""
    with running_stack({"LOG_LEVEL": "INFO"}) as stack:
        url = stack.start_api(DRAIN_TIMEOUT="30")  # no dispatcher: a request waits
        [api] = stack.services
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(
                httpx.post,
                f"{url}/v1/chat/completions",
                json={"model": "dummy", "messages": MESSAGES},
                timeout=20,
            )
            time.sleep(0.5)
            api.signal(signal.SIGTERM)
            time.sleep(0.5)
            api.signal(signal.SIGINT)
            assert api.process is not None and api.process.wait(20) == 1, api.log()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                waiting.result()
