"""One job through the agent: replies, acks, requeues, deadlines and cancels.

The inference server is an `httpx.MockTransport` (no sockets); the broker side is a recording
publisher and a stand-in for the incoming message under a real `Delivery`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from services.agent.backend import VllmClient
from services.agent.handler import AgentHandler
from services.agent.models import parse_agent_models
from shared.amqp import Delivery
from shared.cancel import Cancellations
from shared.messages import Job, Reply, ReplyKind, encode_job

BODY = b'{"model":"local_m","messages":[{"role":"user","content":"hi"}]}'
COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "served-m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "stop",
            }
        ],
    }
)


def chunk(content: str, finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "served-m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE = chunk("Hello") + chunk(" world") + chunk("", "stop") + b"data: [DONE]\n\n"


class Message:
    """What `Delivery` needs of an aio-pika message; records settlement in `log`."""

    def __init__(self, log: list[str], *, redelivered: bool = False) -> None:
        self.log = log
        self.redelivered = redelivered
        self.headers: dict[str, object] = {}

    async def ack(self) -> None:
        self.log.append("ack")

    async def reject(self, requeue: bool = False) -> None:
        self.log.append(f"reject(requeue={requeue})")


Route = Callable[[httpx.Request], Awaitable[httpx.Response]]


class Rig:
    def __init__(
        self, route: Route, *, now: float = 1000.0, concurrency: int | None = None
    ) -> None:
        self.log: list[str] = []
        self.replies: list[Reply] = []
        self.completed: list[tuple[str, bytes]] = []
        self.upstream_bodies: list[dict[str, Any]] = []
        self.now = now
        self.cancellations = Cancellations()

        async def handle(request: httpx.Request) -> httpx.Response:
            self.upstream_bodies.append(orjson.loads(request.content))
            return await route(request)

        self.handler = AgentHandler(
            models=parse_agent_models("local_m=served-m"),
            upstream=VllmClient("http://vllm:8000/v1", transport=httpx.MockTransport(handle)),
            publish=self.publish,
            cancellations=self.cancellations,
            publish_completed=self.publish_completed,
            concurrency=concurrency,
            coalesce_window=0.001,
            clock=lambda: self.now,
        )

    async def publish(self, job: Job, reply: Reply) -> None:
        self.log.append(f"publish {reply.kind.value}")
        self.replies.append(reply)

    async def publish_completed(self, key: str, body: bytes) -> None:
        self.completed.append((key, body))

    async def run(self, job: Job, *, redelivered: bool = False) -> Delivery:
        delivery = Delivery(Message(self.log, redelivered=redelivered))  # type: ignore[arg-type]
        await self.handler.on_job(encode_job(job, now=self.now), delivery)
        return delivery

    def job(self, *, stream: bool = False, remaining: float = 30.0, **changes: Any) -> Job:
        fields: dict[str, Any] = {
            "request_id": "req1",
            "model": "local_m",
            "reply_to": "reply.q",
            "deadline": self.now + remaining,
            "body": BODY,
            "stream": stream,
        }
        return Job(**{**fields, **changes})

    def stream_body(self) -> bytes:
        return b"".join(r.body for r in self.replies if r.kind is ReplyKind.CHUNK)


def answer(status: int, body: bytes) -> Route:
    async def route(_: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body)

    return route


def sse(*parts: bytes, fail: Exception | None = None, hang: asyncio.Event | None = None) -> Route:
    async def route(_: httpx.Request) -> httpx.Response:
        async def events() -> AsyncIterator[bytes]:
            for part in parts:
                yield part
            if hang is not None:
                try:
                    await asyncio.Event().wait()
                finally:
                    hang.set()  # the upstream call was closed
            if fail is not None:
                raise fail

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    return route


async def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


# --- JSON ------------------------------------------------------------------------------------


async def test_completion_is_answered_with_the_router_model() -> None:
    rig = Rig(answer(200, COMPLETION))
    delivery = await rig.run(rig.job())
    assert rig.upstream_bodies[0]["model"] == "served-m"
    [reply] = rig.replies
    assert reply.kind is ReplyKind.FINAL and reply.request_id == "req1"
    assert orjson.loads(reply.body)["model"] == "local_m"
    assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "Hello"
    assert not delivery.settled  # the consumer acks when the handler returns
    assert rig.completed == []


async def test_cacheable_completion_publishes_the_completed_event() -> None:
    rig = Rig(answer(200, COMPLETION))
    await rig.run(rig.job(cache_key="k1"))
    assert rig.completed == [("k1", rig.replies[0].body)]


async def test_vllm_error_keeps_its_status_in_openai_shape() -> None:
    body = b'{"object":"error","message":"too long","type":"BadRequestError","code":400}'
    rig = Rig(answer(400, body))
    await rig.run(rig.job())
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 400)
    assert orjson.loads(reply.body) == {
        "error": {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}
    }


async def test_unreachable_server_requeues_once_then_answers_502() -> None:
    rig = Rig(refused)
    first = await rig.run(rig.job())
    assert rig.log == ["reject(requeue=True)"] and first.settled
    assert rig.replies == []

    await rig.run(rig.job(), redelivered=True)
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 502)
    assert orjson.loads(reply.body)["error"]["code"] == "upstream_error"


async def test_expired_and_cancelled_jobs_are_dropped_without_a_call() -> None:
    rig = Rig(answer(200, COMPLETION))
    await rig.run(rig.job(remaining=-1))
    rig.cancellations.cancel("req1", rig.now)
    await rig.run(rig.job())
    assert rig.upstream_bodies == [] and rig.replies == []


async def test_upstream_call_is_bounded_by_the_deadline() -> None:
    async def slow(_: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200, content=COMPLETION)

    rig = Rig(slow)
    started = time.monotonic()
    await rig.run(rig.job(remaining=0.1))
    assert time.monotonic() - started < 1
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 504)


async def test_model_not_served_here_is_404() -> None:
    rig = Rig(answer(200, COMPLETION))
    await rig.run(rig.job(model="local_other"))
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 404)
    assert rig.upstream_bodies == []


# --- SSE -------------------------------------------------------------------------------------


async def test_stream_is_relayed_with_the_router_model_and_acked_after_the_first_chunk() -> None:
    rig = Rig(sse(SSE))
    delivery = await rig.run(rig.job(stream=True))
    assert delivery.settled
    assert rig.log[:2] == ["publish reply.chunk", "ack"]
    assert rig.log[-1] == "publish reply.end"
    assert [r.seq for r in rig.replies] == list(range(len(rig.replies)))
    events = [e for e in rig.stream_body().split(b"\n\n") if e]
    payloads = [orjson.loads(e.removeprefix(b"data: ")) for e in events]
    assert {p["model"] for p in payloads} == {"local_m"}
    assert "".join(p["choices"][0]["delta"]["content"] for p in payloads) == "Hello world"
    assert rig.upstream_bodies[0]["model"] == "served-m"


async def test_stream_split_across_reads_is_reassembled() -> None:
    pieces = [SSE[i : i + 7] for i in range(0, len(SSE), 7)]
    rig = Rig(sse(*pieces))
    await rig.run(rig.job(stream=True))
    assert rig.stream_body().count(b"data: ") == 3
    assert rig.replies[-1].kind is ReplyKind.END


async def test_stream_error_before_output_keeps_its_status() -> None:
    body = (
        b'{"error":{"message":"no such model","type":"NotFoundError","param":"model","code":404}}'
    )
    rig = Rig(answer(404, body))
    await rig.run(rig.job(stream=True))
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 404)
    assert orjson.loads(reply.body)["error"]["message"] == "no such model"


async def test_stream_unreachable_server_requeues() -> None:
    rig = Rig(refused)
    await rig.run(rig.job(stream=True))
    assert rig.log == ["reject(requeue=True)"]


async def test_stream_broken_after_output_ends_with_an_error_event() -> None:
    rig = Rig(sse(chunk("Hello"), fail=httpx.ReadError("reset")))
    await rig.run(rig.job(stream=True))
    assert rig.replies[0].kind is ReplyKind.CHUNK
    last = rig.replies[-1]
    assert (last.kind, last.status) == (ReplyKind.ERROR, 502)
    assert "ack" in rig.log


async def test_stream_ending_without_done_is_an_error() -> None:
    rig = Rig(sse(chunk("Hello")))
    await rig.run(rig.job(stream=True))
    assert [r.kind for r in rig.replies] == [ReplyKind.CHUNK, ReplyKind.ERROR]


async def test_error_event_mid_stream_ends_it() -> None:
    error = b'data: {"error":{"message":"engine died","type":"x","code":500}}\n\n'
    rig = Rig(sse(chunk("Hello"), error, chunk("never")))
    await rig.run(rig.job(stream=True))
    last = rig.replies[-1]
    assert last.kind is ReplyKind.ERROR
    assert orjson.loads(last.body)["error"]["message"] == "engine died"
    assert b"never" not in rig.stream_body()


async def test_cancel_mid_stream_closes_the_upstream_call_without_a_reply() -> None:
    closed = asyncio.Event()
    rig = Rig(sse(chunk("Hello"), hang=closed))
    task = asyncio.create_task(rig.run(rig.job(stream=True)))
    await until(lambda: "ack" in rig.log)
    assert rig.cancellations.cancel("req1", rig.now)
    delivery = await asyncio.wait_for(task, 1)
    assert closed.is_set()
    assert delivery.settled
    assert [r.kind for r in rig.replies] == [ReplyKind.CHUNK]
    assert rig.handler.in_flight == 0


async def test_stream_deadline_ends_with_a_timeout_event() -> None:
    closed = asyncio.Event()
    rig = Rig(sse(chunk("Hello"), hang=closed))
    await rig.run(rig.job(stream=True, remaining=0.2))
    last = rig.replies[-1]
    assert (last.kind, last.status) == (ReplyKind.ERROR, 504)
    assert closed.is_set()


@pytest.mark.parametrize("stream", [False, True])
async def test_load_counts_jobs_in_flight(stream: bool) -> None:
    gate = asyncio.Event()

    async def gated(_: httpx.Request) -> httpx.Response:
        await gate.wait()
        return httpx.Response(200, content=SSE if stream else COMPLETION)

    rig = Rig(gated)
    tasks = [asyncio.create_task(rig.run(rig.job(stream=stream))) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert rig.handler.in_flight == 3
    gate.set()
    await asyncio.gather(*tasks)
    assert rig.handler.in_flight == 0


async def test_streams_acked_early_still_respect_the_concurrency() -> None:
    calls: list[asyncio.Event] = []

    async def held(_: httpx.Request) -> httpx.Response:
        release = asyncio.Event()
        calls.append(release)

        async def events() -> AsyncIterator[bytes]:
            yield chunk("Hello")
            await release.wait()
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=events())

    rig = Rig(held, concurrency=1)
    first = asyncio.create_task(rig.run(rig.job(stream=True)))
    second = asyncio.create_task(rig.run(rig.job(stream=True, request_id="req2")))
    await until(lambda: "ack" in rig.log)
    await asyncio.sleep(0.05)
    assert len(calls) == 1  # the first stream is acked, but its slot is still taken
    assert rig.log.count("ack") == 1
    calls[0].set()
    await asyncio.wait_for(first, 1)
    await until(lambda: len(calls) >= 2)
    calls[1].set()
    await asyncio.wait_for(second, 1)
    assert rig.log.count("ack") == 2


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Let the loop run until `predicate()` holds (TimeoutError after `timeout`)."""
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.005)
