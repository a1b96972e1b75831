"""One job through the agent: replies, acks, requeues, deadlines and cancels.

The inference server is an in-process loopback server (tests/support/upstream.py); the broker
side is a recording publisher and a stand-in for the incoming message under a real `Delivery`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from services.agent.backend import VllmClient
from services.agent.handler import STOPPING, AgentHandler
from services.agent.models import parse_agent_models
from shared.amqp import Delivery
from shared.cancel import Cancellations
from shared.errors import AnswerTooLargeError, BrokerUnavailableError
from shared.messages import Job, Reply, ReplyKind, encode_job
from tests.support.upstream import Route, UpstreamServer, answer, drop, sse

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


OPEN: list[Rig] = []


@pytest.fixture(autouse=True)
async def close_rigs() -> AsyncIterator[None]:
    yield
    while OPEN:
        await OPEN.pop().close()


class Rig:
    def __init__(
        self, route: Route, *, now: float = 1000.0, concurrency: int | None = None
    ) -> None:
        self.log: list[str] = []
        self.replies: list[Reply] = []
        self.upstream_bodies: list[dict[str, Any]] = []
        self.now = now
        self.cancellations = Cancellations()

        async def handle(request: web.Request) -> web.StreamResponse:
            self.upstream_bodies.append(orjson.loads(await request.read()))
            return await route(request)

        self.server = UpstreamServer(handle)
        self.concurrency = concurrency
        self.max_body: int | None = None  # as ReplyPublisher's: a chunk past it is refused

    async def start(self) -> Rig:
        await self.server.start()
        OPEN.append(self)
        self.upstream = VllmClient(self.server.url)
        self.handler = AgentHandler(
            models=parse_agent_models("local_m=served-m"),
            upstream=self.upstream,
            publish=self.publish,
            cancellations=self.cancellations,
            concurrency=self.concurrency,
            coalesce_window=0.001,
            clock=lambda: self.now,
        )
        return self

    async def close(self) -> None:
        await self.upstream.aclose()
        await self.server.close()

    async def publish(self, job: Job, reply: Reply) -> None:
        if self.max_body is not None and len(reply.body) > self.max_body:
            self.log.append(f"refused {reply.kind.value}")
            raise AnswerTooLargeError.past(len(reply.body), self.max_body)
        self.log.append(f"publish {reply.kind.value}")
        self.replies.append(reply)

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


# --- JSON ------------------------------------------------------------------------------------


async def test_completion_is_answered_with_the_router_model() -> None:
    rig = await Rig(answer(200, COMPLETION)).start()
    delivery = await rig.run(rig.job())
    assert rig.upstream_bodies[0]["model"] == "served-m"
    [reply] = rig.replies
    assert reply.kind is ReplyKind.FINAL and reply.request_id == "req1"
    assert orjson.loads(reply.body)["model"] == "local_m"
    assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "Hello"
    assert not delivery.settled  # the consumer acks when the handler returns


async def test_vllm_error_keeps_its_status_in_openai_shape() -> None:
    body = b'{"object":"error","message":"too long","type":"BadRequestError","code":400}'
    rig = await Rig(answer(400, body)).start()
    await rig.run(rig.job())
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 400)
    assert orjson.loads(reply.body) == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


async def test_unreachable_server_requeues_once_then_answers_502() -> None:
    rig = await Rig(drop).start()
    first = await rig.run(rig.job())
    assert rig.log == ["reject(requeue=True)"] and first.settled
    assert rig.replies == []

    await rig.run(rig.job(), redelivered=True)
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 502)
    assert orjson.loads(reply.body)["error"]["code"] == "upstream_error"


async def test_expired_and_cancelled_jobs_are_dropped_without_a_call() -> None:
    rig = await Rig(answer(200, COMPLETION)).start()
    await rig.run(rig.job(remaining=-1))
    rig.cancellations.cancel("req1", rig.now)
    await rig.run(rig.job())
    assert rig.upstream_bodies == [] and rig.replies == []


async def test_upstream_call_is_bounded_by_the_deadline() -> None:
    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(10)
        return web.Response(body=COMPLETION)

    rig = await Rig(slow).start()
    await rig.run(rig.job(remaining=0.1))
    [reply] = rig.replies  # the 10 s call ran out of time: an answer would be a 200
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 504)
    assert reply.http_headers == {"x-should-retry": "false"}  # the SDK would run it 3 times


async def test_model_not_served_here_is_404() -> None:
    rig = await Rig(answer(200, COMPLETION)).start()
    await rig.run(rig.job(model="local_other"))
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 404)
    assert rig.upstream_bodies == []


# --- SSE -------------------------------------------------------------------------------------


async def test_stream_is_relayed_with_the_router_model_and_acked_once_it_ends() -> None:
    rig = await Rig(sse(SSE)).start()
    delivery = await rig.run(rig.job(stream=True))
    assert delivery.settled
    assert rig.log[0] == "publish reply.chunk"
    assert rig.log[-2:] == ["publish reply.end", "ack"] and rig.log.count("ack") == 1
    assert [r.seq for r in rig.replies] == list(range(len(rig.replies)))
    events = [e for e in rig.stream_body().split(b"\n\n") if e]
    payloads = [orjson.loads(e.removeprefix(b"data: ")) for e in events]
    assert {p["model"] for p in payloads} == {"local_m"}
    assert "".join(p["choices"][0]["delta"]["content"] for p in payloads) == "Hello world"
    assert rig.upstream_bodies[0]["model"] == "served-m"


async def test_events_that_arrive_together_leave_in_one_message() -> None:
    # A role chunk and the first token written at once: the token must not wait for the
    # role chunk's publish to be confirmed.
    rig = await Rig(sse(chunk("") + chunk("Hello"), b"data: [DONE]\n\n")).start()
    await rig.run(rig.job(stream=True))
    first = rig.replies[0]
    assert first.kind is ReplyKind.CHUNK and first.seq == 0
    assert first.body.count(b"data: ") == 2 and b"Hello" in first.body
    assert rig.log[:2] == ["publish reply.chunk", "publish reply.end"]


async def test_stream_split_across_reads_is_reassembled() -> None:
    pieces = [SSE[i : i + 7] for i in range(0, len(SSE), 7)]
    rig = await Rig(sse(*pieces)).start()
    await rig.run(rig.job(stream=True))
    assert rig.stream_body().count(b"data: ") == 3
    assert rig.replies[-1].kind is ReplyKind.END


async def test_stream_error_before_output_keeps_its_status() -> None:
    body = (
        b'{"error":{"message":"no such model","type":"NotFoundError","param":"model","code":404}}'
    )
    rig = await Rig(answer(404, body)).start()
    await rig.run(rig.job(stream=True))
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 404)
    assert orjson.loads(reply.body)["error"]["message"] == "no such model"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_gateways_429_keeps_its_retry_and_rate_limit_headers(stream: bool) -> None:
    """An llm-d gateway (or any server in front of vLLM) that sheds load says when to come
    back; the client gets that, and nothing else of the server's headers."""

    async def saturated(_: web.Request) -> web.StreamResponse:
        headers = {"Retry-After": "3", "x-ratelimit-remaining-requests": "0", "Server": "gw"}
        body = b'{"error":{"message":"saturated","type":"rate_limit_error","code":429}}'
        return web.Response(status=429, body=body, headers=headers, content_type="application/json")

    rig = await Rig(saturated).start()
    await rig.run(rig.job(stream=stream))
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 429)
    assert reply.http_headers == {"retry-after": "3", "x-ratelimit-remaining-requests": "0"}


async def test_stream_unreachable_server_requeues() -> None:
    rig = await Rig(drop).start()
    await rig.run(rig.job(stream=True))
    assert rig.log == ["reject(requeue=True)"]


async def test_stream_broken_after_output_ends_with_an_error_event() -> None:
    rig = await Rig(sse(chunk("Hello"), fail=True)).start()
    await rig.run(rig.job(stream=True))
    assert rig.replies[0].kind is ReplyKind.CHUNK
    last = rig.replies[-1]
    assert (last.kind, last.status) == (ReplyKind.ERROR, 502)
    assert "ack" in rig.log


async def test_stream_ending_without_done_is_an_error() -> None:
    rig = await Rig(sse(chunk("Hello"))).start()
    await rig.run(rig.job(stream=True))
    assert [r.kind for r in rig.replies] == [ReplyKind.CHUNK, ReplyKind.ERROR]


async def test_error_event_mid_stream_ends_it() -> None:
    error = b'data: {"error":{"message":"engine died","type":"x","code":500}}\n\n'
    rig = await Rig(sse(chunk("Hello"), error, chunk("never"))).start()
    await rig.run(rig.job(stream=True))
    last = rig.replies[-1]
    assert last.kind is ReplyKind.ERROR
    assert orjson.loads(last.body)["error"]["message"] == "engine died"
    assert b"never" not in rig.stream_body()


def huge_event(size: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * size + b'"}}]}\n\n'


async def test_event_over_the_limit_after_output_ends_with_an_error_event() -> None:
    async def hello_then_huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(chunk("Hello"))
        await until(lambda: "publish reply.chunk" in rig.log)  # the client has its first bytes
        await response.write(huge_event(2000) + b"data: [DONE]\n\n")
        return response

    rig = await Rig(hello_then_huge).start()
    rig.handler.max_reply_bytes = 1000
    await rig.run(rig.job(stream=True))
    assert rig.replies[0].kind is ReplyKind.CHUNK
    last = rig.replies[-1]
    assert (last.kind, last.status) == (ReplyKind.ERROR, 502)
    assert orjson.loads(last.body)["error"]["code"] == "answer_too_large"


async def test_a_json_answer_over_the_limit_answers_502_at_once() -> None:
    rig = await Rig(answer(200, b'{"choices":"' + b"x" * 2000 + b'"}')).start()
    rig.handler.max_reply_bytes = 1000
    await rig.run(rig.job())
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 502)
    assert orjson.loads(reply.body)["error"]["code"] == "answer_too_large"
    assert "reject(requeue=True)" not in rig.log


async def test_event_over_the_limit_before_output_answers_502_at_once() -> None:
    """Not requeued: every agent of the model has the same limit."""
    rig = await Rig(sse(huge_event(2000), b"data: [DONE]\n\n")).start()
    rig.handler.max_reply_bytes = 1000
    await rig.run(rig.job(stream=True))
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 502)
    assert orjson.loads(reply.body)["error"]["code"] == "answer_too_large"
    assert "reject(requeue=True)" not in rig.log


async def test_cancel_mid_stream_closes_the_upstream_call_without_a_reply() -> None:
    closed = asyncio.Event()
    rig = await Rig(sse(chunk("Hello"), hang=closed)).start()
    task = asyncio.create_task(rig.run(rig.job(stream=True)))
    await until(lambda: "publish reply.chunk" in rig.log)
    assert rig.cancellations.cancel("req1", rig.now)
    delivery = await asyncio.wait_for(task, 1)
    await asyncio.wait_for(closed.wait(), 1)  # the server saw the connection close
    assert delivery.settled
    assert [r.kind for r in rig.replies] == [ReplyKind.CHUNK]
    assert rig.handler.in_flight == 0


async def test_stream_deadline_ends_with_a_timeout_event() -> None:
    closed = asyncio.Event()
    rig = await Rig(sse(chunk("Hello"), hang=closed)).start()
    await rig.run(rig.job(stream=True, remaining=0.2))
    last = rig.replies[-1]
    assert (last.kind, last.status) == (ReplyKind.ERROR, 504)
    await asyncio.wait_for(closed.wait(), 1)


@pytest.mark.parametrize("stream", [False, True])
async def test_load_counts_jobs_in_flight(stream: bool) -> None:
    gate = asyncio.Event()

    async def gated(_: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.Response(body=SSE if stream else COMPLETION)

    rig = await Rig(gated).start()
    tasks = [asyncio.create_task(rig.run(rig.job(stream=stream))) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert rig.handler.in_flight == 3
    gate.set()
    await asyncio.gather(*tasks)
    assert rig.handler.in_flight == 0


def held_streams(calls: list[asyncio.Event]) -> Route:
    """Each call streams one chunk, then holds until its event (appended to `calls`) is set."""

    async def held(request: web.Request) -> web.StreamResponse:
        release = asyncio.Event()
        calls.append(release)
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(chunk("Hello"))
        await release.wait()
        await response.write(b"data: [DONE]\n\n")
        return response

    return held


async def test_a_running_stream_holds_its_delivery_and_its_slot_until_it_ends() -> None:
    """Unacked, a stream keeps its prefetch slot: the broker hands this agent no more jobs of
    the model than it has slots, and a free agent of the model gets them instead."""
    calls: list[asyncio.Event] = []
    held = held_streams(calls)
    rig = await Rig(held, concurrency=1).start()
    first = asyncio.create_task(rig.run(rig.job(stream=True)))
    second = asyncio.create_task(rig.run(rig.job(stream=True, request_id="req2")))
    await until(lambda: "publish reply.chunk" in rig.log)
    await asyncio.sleep(0.05)
    assert len(calls) == 1  # the second waits for the slot
    assert "ack" not in rig.log  # the first holds its delivery while it runs
    calls[0].set()
    await asyncio.wait_for(first, 1)
    await until(lambda: len(calls) >= 2)
    calls[1].set()
    await asyncio.wait_for(second, 1)
    assert rig.log.count("ack") == 2


async def test_a_stream_whose_first_chunk_never_left_is_left_for_the_consumer_to_requeue() -> None:
    """A first chunk the broker did not confirm reached nobody: the job is not acked, so the
    consumer requeues it (its first failure) rather than drop it unanswered."""
    rig = await Rig(sse(SSE)).start()

    async def failing(job: Job, reply: Reply) -> None:
        rig.log.append(f"publish {reply.kind.value} failed")
        raise BrokerUnavailableError()

    rig.handler.publish = failing
    delivery = Delivery(Message(rig.log))  # type: ignore[arg-type]
    with pytest.raises(BrokerUnavailableError):
        await rig.handler.on_job(encode_job(rig.job(stream=True), now=rig.now), delivery)
    assert rig.log == ["publish reply.chunk failed"] and not delivery.settled


@pytest.mark.parametrize(
    ("stopping", "why"),
    [(True, b"The agent stopped."), (False, b"The agent lost its broker connection.")],
    ids=["stopping", "connection-lost"],
)
async def test_a_stream_the_stopping_agent_cuts_off_is_acked_and_never_run_again(
    stopping: bool, why: bytes
) -> None:
    """The agent stopping (its consumer task cancelled at the drain's end), or its consuming
    connection lost, ends a started stream with a 503 event that says which, and acks it:
    requeued, it would run again for a client that already holds part of it. One that has
    sent nothing goes back to its queue."""
    calls: list[asyncio.Event] = []
    rig = await Rig(held_streams(calls)).start()
    delivery = Delivery(Message(rig.log))  # type: ignore[arg-type]
    task = asyncio.create_task(
        rig.handler.on_job(encode_job(rig.job(stream=True), now=rig.now), delivery)
    )
    await until(lambda: "publish reply.chunk" in rig.log)
    if stopping:
        rig.handler.stop_starting(STOPPING)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    last = rig.replies[-1]
    assert (last.kind, last.status) == (ReplyKind.ERROR, 503) and why in last.body
    assert rig.log[-1] == "ack" and delivery.settled


@pytest.mark.parametrize(
    ("stream", "stopping", "why"),
    [(True, True, "agent stopping"), (False, False, "consuming connection lost")],
    ids=["stream-drained", "json-connection-lost"],
)
async def test_a_job_cut_off_is_logged_with_its_request_id(
    caplog: pytest.LogCaptureFixture, stream: bool, stopping: bool, why: str
) -> None:
    """The drain's end, or the consuming connection lost, cancels the consumer's task: the
    job still gets its outcome line, so its request id is in the agent's log."""
    gate = asyncio.Event()

    async def held(_: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.Response(body=COMPLETION)

    calls: list[asyncio.Event] = []
    rig = await Rig(held_streams(calls) if stream else held).start()
    caplog.set_level(logging.INFO, "services.agent.handler")
    task = asyncio.create_task(rig.run(rig.job(stream=stream, request_id="req9")))
    await until(lambda: bool(rig.upstream_bodies))
    if stopping:
        rig.handler.stop_starting(STOPPING)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    [line] = [r for r in caplog.records if r.name == "services.agent.handler"]
    assert line.levelno == logging.WARNING
    expected = rf"job req9 model=local_m stream={stream} cut off: {why} [\d.]+ms"
    assert re.fullmatch(expected, line.getMessage()), line.getMessage()
    assert rig.handler.in_flight == 0


async def test_a_stopping_agent_hands_back_a_job_that_waited_for_a_slot() -> None:
    calls: list[asyncio.Event] = []
    held = held_streams(calls)
    rig = await Rig(held, concurrency=1).start()
    first = asyncio.create_task(rig.run(rig.job(stream=True)))
    await until(lambda: "publish reply.chunk" in rig.log)
    second = asyncio.create_task(rig.run(rig.job(stream=True, request_id="req2")))
    await asyncio.sleep(0.05)  # waiting for the slot the first stream holds
    rig.handler.stop_starting("agent stopping")
    calls[0].set()
    await asyncio.wait_for(first, 1)
    second_delivery = await asyncio.wait_for(second, 1)
    assert rig.replies[-1].kind is ReplyKind.END  # the running stream finished
    assert rig.log.count("ack") == 1 and rig.log[-1] == "reject(requeue=True)"
    assert second_delivery.settled
    assert len(calls) == 1  # the second job never reached the server
    assert {r.request_id for r in rig.replies} == {"req1"}


async def test_a_stopping_agent_hands_back_new_jobs_without_a_call() -> None:
    rig = await Rig(sse(SSE)).start()
    rig.handler.stop_starting("agent stopping")
    await rig.run(rig.job(stream=True))
    assert rig.log == ["reject(requeue=True)"] and rig.upstream_bodies == []


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Let the loop run until `predicate()` holds (TimeoutError after `timeout`)."""
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.005)


async def test_events_under_the_limit_that_arrive_together_leave_in_messages_under_it() -> None:
    """Two events of 600 bytes in one read, against a limit of 1000: two messages, not one
    refused message of 1200."""
    rig = await Rig(sse(huge_event(560) + huge_event(560), b"data: [DONE]\n\n")).start()
    rig.handler.max_reply_bytes = rig.max_body = 1000
    await rig.run(rig.job(stream=True))
    assert [r.kind for r in rig.replies] == [ReplyKind.CHUNK, ReplyKind.CHUNK, ReplyKind.END]
    assert "refused reply.chunk" not in rig.log


async def test_a_first_event_too_large_once_framed_answers_502_without_a_requeue() -> None:
    """The decoder measures an event's data; its chunk is framed (`data: ...\\n\\n`) and
    renamed, so it may pass the limit the data kept to: answered at once, as any agent of
    the model would refuse it too, not requeued to run on vLLM again."""
    rig = await Rig(sse(huge_event(949), b"data: [DONE]\n\n")).start()
    rig.handler.max_reply_bytes = rig.max_body = 1000
    await rig.run(rig.job(stream=True))
    assert "refused reply.chunk" in rig.log and "reject(requeue=True)" not in rig.log
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 502)
    assert orjson.loads(reply.body)["error"]["code"] == "answer_too_large"
