"""What the API makes of the replies a backend sends: which headers and statuses reach the
client. The bus publishes nothing here: a scripted backend answers each job at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest

from services.api.app import create_app
from services.api.fastpath import RouterApp
from services.api.rpc import PendingCall
from services.api.settings import ApiSettings
from shared.http_headers import relayable
from shared.messages import Job, Reply, ReplyKind

NO_BROKER = "amqp://u:p@127.0.0.1:1/"
COMPLETION = b'{"id":"c1","object":"chat.completion","choices":[]}'
CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[]}\n\n'
ERROR = b'{"error":{"message":"no","type":"server_error","param":null,"code":null}}'

MakeReply = Callable[[str], Reply]


def reply(
    kind: ReplyKind,
    body: bytes = b"",
    *,
    seq: int = 0,
    status: int = 200,
    headers: dict[str, object] | None = None,
) -> MakeReply:
    """A reply to whichever request the backend is answering (headers unchecked, as decoded)."""

    def make(request_id: str) -> Reply:
        return Reply(kind, request_id, "a1", body, seq, status, headers or {})  # type: ignore[arg-type]

    return make


class Backend:
    """Answers every job the app submits with `replies`, and records the cancels it hears."""

    def __init__(self, app: RouterApp) -> None:
        self.replies: list[MakeReply] = []
        self.cancelled: list[str] = []
        bus = app.state.bus

        async def submit(job: Job) -> None:
            for make in self.replies:
                bus.replies.dispatch(make(job.request_id))

        async def cancel(call: PendingCall) -> None:
            self.cancelled.append(call.request_id)

        bus.submit = submit
        bus.cancel = cancel
        bus.cancel_soon = lambda call: self.cancelled.append(call.request_id)


@asynccontextmanager
async def scripted(**settings: Any) -> AsyncIterator[tuple[Backend, httpx.AsyncClient]]:
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER, **settings))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield Backend(app), client


@pytest.fixture
async def backend() -> AsyncIterator[tuple[Backend, httpx.AsyncClient]]:
    async with scripted() as pair:
        yield pair


async def chat(client: httpx.AsyncClient, *, stream: bool) -> httpx.Response:
    body = {"model": "local_m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return await client.post("/v1/chat/completions", content=orjson.dumps(body))


ROGUE_HEADERS: dict[str, object] = {
    "content-length": "3",
    "content-type": "text/html",
    "set-cookie": "session=stolen",
    "x-request-id": "forged",
    "Retry-After": "2",
    "x-ratelimit-remaining-requests": "9",
    "x-should-retry": "false",
    "x-upstream-request-id": "req_up",
    "x-cache": "miss",
}
RELAYED = {
    "retry-after": "2",
    "x-ratelimit-remaining-requests": "9",
    "x-should-retry": "false",
    "x-upstream-request-id": "req_up",
    "x-cache": "miss",
}


def assert_only_relayed_headers(response: httpx.Response, content_type: str) -> None:
    assert response.headers["content-type"].startswith(content_type)
    assert "set-cookie" not in response.headers
    assert response.headers["x-request-id"] != "forged"
    assert len(response.headers.get_list("x-request-id")) == 1
    for name, value in RELAYED.items():
        assert response.headers[name] == value


async def test_a_json_answer_relays_only_the_relayed_headers(
    backend: tuple[Backend, httpx.AsyncClient],
) -> None:
    scripted, client = backend
    scripted.replies = [reply(ReplyKind.FINAL, COMPLETION, headers=ROGUE_HEADERS)]
    response = await chat(client, stream=False)
    assert response.status_code == 200
    assert response.content == COMPLETION  # a forged content-length would cut it
    assert_only_relayed_headers(response, "application/json")


async def test_a_stream_relays_only_the_relayed_headers(
    backend: tuple[Backend, httpx.AsyncClient],
) -> None:
    scripted, client = backend
    scripted.replies = [
        reply(ReplyKind.CHUNK, CHUNK, headers=ROGUE_HEADERS),
        reply(ReplyKind.END, seq=1),
    ]
    response = await chat(client, stream=True)
    assert response.status_code == 200
    assert response.content == CHUNK + b"data: [DONE]\n\n"
    assert_only_relayed_headers(response, "text/event-stream")


@pytest.mark.parametrize(
    "value", [1, 2.5, True, None, ["1"], {"a": "1"}, "1\r\nset-cookie: a=b", "d\u00e9j\u00e0"]
)
async def test_a_header_value_that_is_not_plain_text_is_dropped(
    backend: tuple[Backend, httpx.AsyncClient], value: object
) -> None:
    scripted, client = backend
    headers = {"x-ratelimit-remaining-requests": value, "x-cache": "hit"}
    scripted.replies = [reply(ReplyKind.FINAL, COMPLETION, headers=headers)]
    response = await chat(client, stream=False)
    assert response.status_code == 200
    assert "x-ratelimit-remaining-requests" not in response.headers
    assert "set-cookie" not in response.headers
    assert response.headers["x-cache"] == "hit"


@pytest.mark.parametrize(
    ("kind", "sent", "answered"),
    [
        (ReplyKind.FINAL, 500, 200),
        (ReplyKind.FINAL, 204, 200),
        (ReplyKind.ERROR, 429, 429),
        (ReplyKind.ERROR, 503, 503),
        (ReplyKind.ERROR, 200, 502),
        (ReplyKind.ERROR, 302, 502),
        (ReplyKind.ERROR, 101, 502),
        (ReplyKind.ERROR, 600, 502),
        (ReplyKind.ERROR, 0, 502),
    ],
)
async def test_a_reply_status_is_clamped_to_its_kind(
    backend: tuple[Backend, httpx.AsyncClient], kind: ReplyKind, sent: int, answered: int
) -> None:
    scripted, client = backend
    body = COMPLETION if kind is ReplyKind.FINAL else ERROR
    scripted.replies = [reply(kind, body, status=sent)]
    response = await chat(client, stream=False)
    assert (response.status_code, response.content) == (answered, body)


@pytest.mark.parametrize(("sent", "answered"), [(429, 429), (200, 502), (307, 502)])
async def test_an_error_before_a_stream_starts_keeps_only_an_error_status(
    backend: tuple[Backend, httpx.AsyncClient], sent: int, answered: int
) -> None:
    scripted, client = backend
    scripted.replies = [reply(ReplyKind.ERROR, ERROR, status=sent)]
    response = await chat(client, stream=True)
    assert (response.status_code, response.content) == (answered, ERROR)


def test_relayable_keeps_relayed_names_lower_cased_with_text_values() -> None:
    assert relayable(ROGUE_HEADERS) == RELAYED
    assert relayable({"X-RateLimit-Limit-Tokens": "10", "x-ratelimit-reset": 5}) == {
        "x-ratelimit-limit-tokens": "10"
    }


def test_relayable_drops_names_an_http_server_cannot_write() -> None:
    """The prefix alone is not enough: the server refuses these once the stream has begun."""
    names = [
        "x-ratelimit-a b",
        "x-ratelimit-a:b",
        "x-ratelimit-\u00e9",
        "x-ratelimit-a\r",
    ]
    assert relayable(dict.fromkeys(names, "1")) == {}
    assert relayable({"x-ratelimit-remaining_requests": "1"}) == {
        "x-ratelimit-remaining_requests": "1"
    }


@pytest.mark.parametrize(
    ("stream", "replies"),
    [
        (True, [reply(ReplyKind.FINAL, COMPLETION)]),
        (False, [reply(ReplyKind.CHUNK, CHUNK), reply(ReplyKind.END, seq=1)]),
        (False, [reply(ReplyKind.END)]),
    ],
)
async def test_an_answer_of_the_wrong_shape_is_502_and_cancels_the_job(
    backend: tuple[Backend, httpx.AsyncClient], stream: bool, replies: list[MakeReply]
) -> None:
    scripted, client = backend
    scripted.replies = replies
    response = await chat(client, stream=stream)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "upstream_error"
    assert scripted.cancelled == [response.headers["x-request-id"]]


async def test_a_stream_committed_early_ends_a_missing_first_chunk_with_an_error_event() -> None:
    """Past STREAM_KEEPALIVE_AFTER the status is 200 already: TTFT_TIMEOUT is no 504 then."""
    async with scripted(stream_keepalive_after=0.05, ttft_timeout=0.5) as (scripted_, client):
        response = await chat(client, stream=True)  # the backend never answers
    assert response.status_code == 200
    assert response.content.startswith(b": ping\n\n")
    last = response.content.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ") and b"[DONE]" not in response.content
    assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "timeout"
    assert scripted_.cancelled == [response.headers["x-request-id"]]


async def test_a_stream_not_yet_committed_answers_a_missing_first_chunk_with_504() -> None:
    async with scripted(stream_keepalive_after=30, ttft_timeout=0.1) as (scripted_, client):
        response = await chat(client, stream=True)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert response.headers["x-should-retry"] == "false"
    assert scripted_.cancelled == [response.headers["x-request-id"]]
