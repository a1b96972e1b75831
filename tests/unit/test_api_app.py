"""The API application's answers that no endpoint writes: clients that leave while uploading,
and HTTP errors raised by the framework itself."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import orjson
import pytest
from starlette.exceptions import HTTPException
from starlette.types import Message

from services.api import agents
from services.api.app import create_app
from services.api.settings import ApiSettings

NO_BROKER = "amqp://u:p@127.0.0.1:1/"


async def call_asgi(
    path: str,
    messages: list[Message],
    headers: list[tuple[bytes, bytes]],
    *,
    stalled: bool = False,
    **limits: float,
) -> list[Message]:
    """Run one POST through the app as a server would; what the app sent back. After
    `messages` the client has left, or with `stalled` it is there but sends nothing more."""
    settings = ApiSettings(rabbitmq_url=NO_BROKER, agent_token_secret="s" * 32, **limits)
    app = create_app(settings)
    pending = list(messages)
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if stalled:
            await asyncio.Event().wait()
        # A server answers every read after the client left with another disconnect.
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
        "server": ("api", 80),
        "client": ("client", 1234),
    }
    async with asyncio.timeout(10):
        await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/register", "/heartbeat"])
async def test_a_client_that_leaves_mid_upload_is_499_not_a_server_error(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    upload = [
        {"type": "http.request", "body": b'{"name": "ag', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = await call_asgi(path, upload, [(b"authorization", b"Bearer some-agent-token")])
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]
    assert any("client left" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("path", "limits"),
    [
        ("/v1/chat/completions", {"body_timeout": 0.2}),  # not the whole REQUEST_TIMEOUT
        ("/v1/chat/completions", {"body_timeout": 60, "request_timeout": 0.2}),
        ("/register", {}),
    ],
)
async def test_a_stalled_upload_is_408_at_its_deadline(
    path: str, limits: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stops sending mid-body would otherwise hold its connection for ever."""
    monkeypatch.setattr(agents, "CONTROL_BODY_TIMEOUT", 0.2)
    upload = [{"type": "http.request", "body": b'{"name": "ag', "more_body": True}]
    auth = [(b"authorization", b"Bearer some-agent-token")]
    sent = await call_asgi(path, upload, auth, stalled=True, **limits)
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 408
    error = orjson.loads(sent[1]["body"])["error"]
    assert error == {
        "message": "The request body did not arrive within 0.2 s.",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_timeout",
    }


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("POST", "/health", "GET, HEAD"),  # HEAD is served by a route of its own
    ],
)
async def test_a_405_names_every_method_its_path_serves(
    method: str, path: str, allowed: str
) -> None:
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/foo"), ("POST", "/v1/embeddings"), ("DELETE", "/"), ("POST", "/v1/chat")],
)
async def test_an_unknown_route_is_openais_invalid_url(method: str, path: str) -> None:
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.request(method, path, params={"x": "1"})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": f"Invalid URL ({method} {path})",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions/"), ("GET", "/v1/models/"), ("GET", "/health/")],
)
async def test_a_path_with_a_stray_slash_is_not_found_not_redirected(
    method: str, path: str
) -> None:
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://api") as client:
        response = await client.request(method, path, json={})
    assert response.status_code == 404
    assert "location" not in response.headers
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("status", "type_"),
    [(400, "invalid_request_error"), (418, "invalid_request_error"), (503, "server_error")],
)
async def test_other_http_errors_keep_their_status_type_and_headers(
    status: int, type_: str
) -> None:
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER))

    @app.get("/raises")
    async def raises() -> None:
        raise HTTPException(status, detail="Said the framework.", headers={"x-why": "because"})

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.get("/raises")
    assert response.status_code == status
    assert response.headers["x-why"] == "because"
    error = response.json()["error"]
    assert (error["type"], error["message"]) == (type_, "Said the framework.")


async def test_a_refusal_outside_the_chat_route_is_logged_under_its_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused agent on /heartbeat is an operator's business: the log names the id the
    answer carries, as for the chat route's refusals."""
    caplog.set_level(logging.INFO, logger="services.api.fastpath")
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER, agent_token_secret="s" * 32))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.post("/heartbeat", json={"name": "gpu1"})
    assert response.status_code == 401
    [request_id] = response.headers.get_list("x-request-id")
    assert [r.getMessage() for r in caplog.records if request_id in r.getMessage()] == [
        f"POST /heartbeat: request {request_id} answered 401 invalid_api_key: "
        "Missing agent token: send `Authorization: Bearer <token>`."
    ]


@pytest.mark.parametrize("path", ["/health", "/ready"])
async def test_the_probes_answer_head_as_load_balancers_send_it(path: str) -> None:
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        head, get = await client.head(path), await client.get(path)
    assert head.status_code == get.status_code != 405
