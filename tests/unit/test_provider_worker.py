"""The provider queue's consumer: replies, ack timing, drops, cancels (no broker, no HTTP)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from services.dispatcher.providers.base import ProviderRequest, ProviderResponse
from services.dispatcher.providers.catalog import ModelCatalog
from services.dispatcher.providers.openai import OpenAIProvider
from services.dispatcher.providers.retry import RetryPolicy
from services.dispatcher.providers.worker import ProviderWorker
from services.dispatcher.routing import ProviderRule
from shared.amqp import Delivery
from shared.cancel import Cancellations
from shared.errors import BrokerUnavailableError, UpstreamError, UpstreamHTTPError
from shared.http_headers import relayable
from shared.messages import Envelope, Job, Reply, ReplyKind, decode_reply, encode_job
from shared.replies import ReplyPublisher

NOW = 1_000_000.0
RULES = (ProviderRule("openai/", "openai"), ProviderRule("", "openai"))
EVENTS = [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n']


class Broker:
    """Records published replies, with whether the job was acked at that moment."""

    publish_timeout = 5.0

    def __init__(self, message: Message) -> None:
        self.message = message
        self.replies: list[tuple[Reply, bool]] = []

    async def publish(self, env: Envelope, routing_key: str, **_: Any) -> None:
        self.replies.append((decode_reply(env), self.message.acked))

    async def publishing(self, timeout: float) -> bool:
        return False  # a publish that failed failed for good here


class Message:
    redelivered = False

    def __init__(self) -> None:
        self.acked = False

    async def ack(self) -> None:
        self.acked = True

    async def reject(self, requeue: bool = False) -> None:
        raise AssertionError("a provider job is never rejected by the worker")


class Stream:
    def __init__(self, events: list[bytes], error: Exception | None = None) -> None:
        self._events = events
        self._error = error
        self.headers = {"x-ratelimit-remaining-requests": "5"}
        self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        for event in self._events:
            yield event
        if self._error is not None:
            raise self._error

    async def aclose(self) -> None:
        self.closed = True


class Provider:
    name = "openai"

    def __init__(self, answer: object = None, *, hang: bool = False) -> None:
        self.answer = answer
        self.hang = hang
        self.requests: list[ProviderRequest] = []
        self.started = asyncio.Event()
        self.cancelled = False

    async def _call(self, request: ProviderRequest) -> Any:
        self.requests.append(request)
        self.started.set()
        if self.hang:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        return await self._call(request)  # type: ignore[no-any-return]

    async def stream(self, request: ProviderRequest) -> Stream:
        return await self._call(request)  # type: ignore[no-any-return]

    async def list_models(self) -> list[str]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)  # type: ignore[call-overload]


def job(model: str = "openai/gpt-4o", *, stream: bool = False, deadline: float = NOW + 60) -> Job:
    body = orjson.dumps({"model": model, "messages": [], "stream": stream, "n": 2})
    return Job(
        request_id="req1", model=model, reply_to="q", deadline=deadline, body=body, stream=stream
    )


class Rig:
    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.message = Message()
        self.broker = Broker(self.message)
        self.cancellations = Cancellations()
        self.worker = ProviderWorker(
            provider,  # type: ignore[arg-type]
            rules=RULES,
            reply=ReplyPublisher(self.broker, persistent=False),  # type: ignore[arg-type]
            cancellations=self.cancellations,
            coalesce_window=0.0,
            clock=lambda: NOW,
        )

    async def run(self, the_job: Job) -> None:
        delivery = Delivery(self.message)  # type: ignore[arg-type]
        await self.worker.on_job(encode_job(the_job, now=NOW), delivery)

    @property
    def replies(self) -> list[Reply]:
        return [reply for reply, _ in self.broker.replies]


async def test_json_answer_is_relayed_with_headers_and_the_model_rewritten() -> None:
    answer = ProviderResponse(body=b'{"model":"gpt-4o-2024"}', headers={"x-ratelimit-a": "1"})
    rig = Rig(Provider(answer))
    await rig.run(job())
    [reply] = rig.replies
    assert reply.kind is ReplyKind.FINAL and reply.status == 200
    assert reply.body == b'{"model":"gpt-4o-2024"}'
    assert reply.http_headers == {"x-ratelimit-a": "1"}
    [sent] = rig.provider.requests
    assert sent.model == "gpt-4o"
    assert orjson.loads(sent.body) == {"model": "gpt-4o", "messages": [], "stream": False, "n": 2}


async def test_an_answer_sent_as_a_502_is_logged_as_one(caplog: pytest.LogCaptureFixture) -> None:
    """Past the reply limit the client gets a 502 `answer_too_large`: the log said 200."""
    rig = Rig(Provider(ProviderResponse(body=b'{"x":"' + b"y" * 100 + b'"}')))
    rig.worker.reply.max_body = 100
    with caplog.at_level(logging.INFO):
        await rig.run(job())
    [reply] = rig.replies
    assert reply.status == 502
    assert "status=502" in caplog.text and "status=200" not in caplog.text


async def test_a_bare_model_is_sent_as_the_router_read_it() -> None:
    """Written again, not the client's bytes: a key given twice reaches the upstream as the
    copy the edge checked (see `rewrite_model`)."""
    rig = Rig(Provider(ProviderResponse(body=b"{}")))
    the_job = job("gpt-4o")
    await rig.run(the_job)
    assert orjson.loads(rig.provider.requests[0].body) == orjson.loads(the_job.body)


async def test_upstream_errors_become_error_replies() -> None:
    relayed = UpstreamHTTPError(
        429, b'{"error":{"message":"slow down"}}', headers={"retry-after": "2"}
    )
    rig = Rig(Provider(relayed))
    await rig.run(job())
    [reply] = rig.replies
    assert reply.kind is ReplyKind.ERROR and reply.status == 429
    assert reply.body == relayed.body and reply.http_headers == {"retry-after": "2"}


async def test_a_failure_after_the_routers_retries_tells_the_client_not_to_retry() -> None:
    """The OpenAI provider's retries, then the reply the API relays: `x-should-retry: false`."""
    calls: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500, content=b"{}")

    async def no_wait(_: float) -> None:
        pass

    provider = OpenAIProvider(
        httpx.AsyncClient(transport=httpx.MockTransport(upstream)),
        api_key="sk-unit",
        policy=RetryPolicy(max_retries=2),
        clock=lambda: NOW,
        sleep=no_wait,
    )
    rig = Rig(provider)  # type: ignore[arg-type]
    await rig.run(job())
    [reply] = rig.replies
    assert reply.status == 502 and len(calls) == 3
    assert relayable(reply.http_headers) == {"x-should-retry": "false"}


async def test_the_deadline_is_a_504_that_tells_the_client_not_to_retry() -> None:
    provider = Provider(ProviderResponse(body=b"{}"), hang=True)
    rig = Rig(provider)
    await rig.run(job(deadline=NOW + 0.05))  # the call hangs past it
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 504) and provider.cancelled
    assert relayable(reply.http_headers) == {"x-should-retry": "false"}


async def test_an_unexpected_failure_is_a_500_naming_only_the_request() -> None:
    rig = Rig(Provider(RuntimeError("secret detail")))
    await rig.run(job())
    [reply] = rig.replies
    assert reply.status == 500 and b"secret detail" not in reply.body and b"req1" in reply.body


async def test_a_stream_is_relayed_and_acked_once_it_ends() -> None:
    stream = Stream(EVENTS)
    rig = Rig(Provider(stream))
    await rig.run(job(stream=True))
    kinds = [(reply.kind, acked) for reply, acked in rig.broker.replies]
    # unacked while it runs: its prefetch slot stays taken, so the queue's prefetch bounds
    # the calls this dispatcher runs at once
    assert kinds == [(ReplyKind.CHUNK, False), (ReplyKind.CHUNK, False), (ReplyKind.END, False)]
    assert b"".join(r.body for r in rig.replies if r.kind is ReplyKind.CHUNK) == b"".join(EVENTS)
    assert rig.replies[0].http_headers == {"x-ratelimit-remaining-requests": "5"}
    assert stream.closed and rig.message.acked


@pytest.mark.parametrize("back", [False, True], ids=["broker-away", "broker-back"])
async def test_a_stream_whose_first_chunk_never_left_is_not_acked(back: bool) -> None:
    """A first chunk the broker did not confirm reached nobody: left unacked, the consumer
    requeues the job rather than drop it unanswered, whether or not publishing is back by
    then (back, a 503 went out in its place and the job was acked: review 2026-11-29)."""
    rig = Rig(Provider(Stream(EVENTS)))
    published: list[Reply] = []

    async def failing_first(env: Envelope, routing_key: str, **_: Any) -> None:
        if not published:
            published.append(decode_reply(env))
            raise BrokerUnavailableError()
        published.append(decode_reply(env))

    async def publishing(timeout: float) -> bool:
        return back

    rig.broker.publish = failing_first  # type: ignore[method-assign]
    rig.broker.publishing = publishing  # type: ignore[method-assign]
    with pytest.raises(BrokerUnavailableError):
        await rig.run(job(stream=True))
    assert not rig.message.acked
    assert [r.kind for r in published] == [ReplyKind.CHUNK]  # no error in its place


@pytest.mark.parametrize("by_client", [False, True])
async def test_a_started_stream_cut_off_is_acked_and_ended_unless_its_client_left(
    by_client: bool,
) -> None:
    """Cut off after output, by the dispatcher stopping or by its client: acked either way,
    since requeued it would run again for a client that already holds part of it. The
    stopping dispatcher ends the stream with a 503 event (its client would otherwise wait out
    its idle timeout); a client that left gets nothing more."""

    first_sent = asyncio.Event()

    class Held(Stream):
        async def events(self) -> AsyncIterator[bytes]:
            yield EVENTS[0]
            first_sent.set()  # resumed only once the writer has taken the first event
            await asyncio.sleep(60)
            yield EVENTS[1]

    rig = Rig(Provider(Held(EVENTS)))
    running = asyncio.create_task(rig.run(job(stream=True)))
    await asyncio.wait_for(first_sent.wait(), 1)
    assert rig.replies and not rig.message.acked  # output sent, still held while it runs
    if by_client:
        assert rig.cancellations.cancel("req1", NOW)
        await running  # the consumer's handler itself goes on, to settle the message
        assert [r.kind for r in rig.replies] == [ReplyKind.CHUNK]
    else:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        last = rig.replies[-1]
        assert (last.kind, last.status) == (ReplyKind.ERROR, 503)
        assert b"The dispatcher stopped" in last.body
    assert rig.message.acked


async def test_a_stream_broken_mid_way_ends_with_an_error_message() -> None:
    stream = Stream(EVENTS[:1], error=UpstreamError("interrupted"))
    rig = Rig(Provider(stream))
    await rig.run(job(stream=True))
    assert [r.kind for r in rig.replies] == [ReplyKind.CHUNK, ReplyKind.ERROR]
    assert rig.replies[-1].status == 502 and stream.closed


async def test_an_upstream_error_event_is_the_streams_one_last_message() -> None:
    """Chunks, then the upstream's error as the one error message: no end, no second error."""
    error = b'{"error":{"message":"boom","type":"server_error","param":null,"code":null}}'

    async def events() -> AsyncIterator[bytes]:
        yield b"".join(EVENTS)
        yield b"data: " + error + b"\n\n"

    def upstream(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})

    provider = OpenAIProvider(
        httpx.AsyncClient(transport=httpx.MockTransport(upstream)),
        api_key="sk-unit",
        clock=lambda: NOW,
    )
    rig = Rig(provider)  # type: ignore[arg-type]
    await rig.run(job(stream=True))
    kinds = [r.kind for r in rig.replies]
    assert set(kinds[:-1]) == {ReplyKind.CHUNK} and kinds[-1] is ReplyKind.ERROR
    assert b"".join(r.body for r in rig.replies if r.kind is ReplyKind.CHUNK) == b"".join(EVENTS)
    assert rig.replies[-1].body == error and rig.message.acked


async def test_a_stream_failing_at_its_first_event_is_an_error_with_its_headers() -> None:
    """An error event first (an overloaded upstream): the error is the whole answer, and it
    keeps the stream's headers (the upstream's request id, its rate limits)."""
    stream = Stream([], error=UpstreamHTTPError(502, b'{"error":{"message":"overloaded"}}'))
    rig = Rig(Provider(stream))
    await rig.run(job(stream=True))
    [reply] = rig.replies
    assert (reply.kind, reply.status) == (ReplyKind.ERROR, 502)
    assert reply.http_headers == {"x-ratelimit-remaining-requests": "5"}
    assert stream.closed


async def test_a_stream_refused_before_output_is_one_error_reply() -> None:
    rig = Rig(Provider(UpstreamHTTPError(400, b'{"error":{"message":"bad"}}')))
    await rig.run(job(stream=True))
    [reply] = rig.replies
    assert reply.kind is ReplyKind.ERROR and reply.status == 400 and reply.seq == 0


@pytest.mark.parametrize("cancelled", [True, False])
async def test_cancelled_or_expired_jobs_are_dropped_without_a_call(cancelled: bool) -> None:
    rig = Rig(Provider(ProviderResponse(body=b"{}")))
    if cancelled:
        rig.cancellations.cancel("req1", NOW)
        await rig.run(job())
    else:
        await rig.run(job(deadline=NOW - 1))
    assert rig.provider.requests == [] and rig.replies == []


async def test_a_cancel_during_the_call_aborts_it_and_answers_nothing() -> None:
    provider = Provider(ProviderResponse(body=b"{}"), hang=True)
    rig = Rig(provider)  # type: ignore[arg-type]
    running = asyncio.create_task(rig.run(job()))
    await provider.started.wait()
    assert rig.cancellations.cancel("req1", NOW)
    await asyncio.wait_for(running, 1)
    assert provider.cancelled and rig.replies == []


async def test_a_model_this_dispatcher_does_not_route_there_is_404() -> None:
    rig = Rig(Provider(ProviderResponse(body=b"{}")))
    rig.worker.rules = (ProviderRule("openai/", "openai"),)
    await rig.run(job("gpt-4o"))
    [reply] = rig.replies
    assert reply.status == 404 and b"model_not_found" in reply.body


async def test_catalog_lists_what_the_last_fetch_found() -> None:
    provider = Provider(["gpt-4o", "gpt-4o-mini"])
    catalog = ModelCatalog([provider], RULES, ttl=300)  # type: ignore[list-item]
    assert catalog.names() == []
    assert await catalog.refresh()
    assert catalog.names() == ["gpt-4o", "gpt-4o-mini"]
    provider.answer = UpstreamError("down")
    assert not await catalog.refresh()
    assert catalog.names() == ["gpt-4o", "gpt-4o-mini"]  # a failed fetch keeps the last list


async def test_catalog_refreshes_in_the_background() -> None:
    provider = Provider(["gpt-4o"])
    catalog = ModelCatalog([provider], RULES, ttl=300)  # type: ignore[list-item]
    catalog.start()
    try:
        for _ in range(100):
            if catalog.names():
                break
            await asyncio.sleep(0.01)
        assert catalog.names() == ["gpt-4o"]
    finally:
        await catalog.aclose()


async def test_a_stream_whose_end_and_error_cannot_be_sent_still_logs_its_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker gone for good after the chunks: the job is acked (its client holds part of
    it) and its outcome line is still written, for the operator (review 2026-11-29)."""
    rig = Rig(Provider(Stream(EVENTS)))
    real = rig.broker.publish

    async def no_end(env: Envelope, routing_key: str, **kwargs: Any) -> None:
        if decode_reply(env).kind in (ReplyKind.END, ReplyKind.ERROR):
            raise BrokerUnavailableError()
        await real(env, routing_key, **kwargs)

    rig.broker.publish = no_end  # type: ignore[method-assign]
    caplog.set_level("INFO", "services.dispatcher.providers.worker")
    await rig.run(job(stream=True))
    assert rig.message.acked
    assert any("status=503" in r.getMessage() for r in caplog.records), caplog.text
