"""StreamWriter: first chunk at once, later ones coalesced, numbered, closed once."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import cast

import orjson
import pytest

from shared.amqp import Broker
from shared.completed import CompletedBatcher
from shared.errors import (
    AnswerTooLargeError,
    BrokerUnavailableError,
    ReplyQueueGoneError,
    UnroutableError,
    UpstreamError,
)
from shared.messages import (
    MAX_CACHED_BODY,
    Envelope,
    Job,
    Reply,
    ReplyKind,
    decode_completed,
    decode_reply,
    encode_job,
)
from shared.replies import ReplyPublisher, StreamWriter
from tests.support.amqp import RecordingBroker

JOB = Job(request_id="r1", model="m", reply_to="q", deadline=1e12, body=b"{}", stream=True)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[Reply] = []

    async def __call__(self, job: Job, reply: Reply) -> None:
        self.sent.append(reply)


async def test_first_chunk_is_published_before_send_returns() -> None:
    out = Recorder()
    writer = StreamWriter(JOB, out, attempt="a1", window=10)
    await writer.send(b"data: 1\n\n")
    assert [r.body for r in out.sent] == [b"data: 1\n\n"]
    assert out.sent[0].seq == 0 and out.sent[0].kind is ReplyKind.CHUNK


async def test_later_chunks_are_coalesced_in_order() -> None:
    out = Recorder()
    writer = StreamWriter(JOB, out, attempt="a1", window=0.01)
    for i in range(5):
        await writer.send(f"data: {i}\n\n".encode())
    assert len(out.sent) == 2  # the first two at once (role chunk, first token), then a window
    await asyncio.sleep(0.05)
    await writer.send(b"data: 5\n\n")
    await writer.end()
    assert [r.seq for r in out.sent] == list(range(len(out.sent)))
    assert out.sent[-1].kind is ReplyKind.END
    body = b"".join(r.body for r in out.sent if r.kind is ReplyKind.CHUNK)
    assert body == b"".join(f"data: {i}\n\n".encode() for i in range(6))
    assert len(out.sent) == 5  # two at once, one coalesced batch, the last chunk, end
    assert {r.attempt for r in out.sent} == {"a1"}


async def test_output_is_confirmed_once_a_chunk_publish_returns() -> None:
    """What decides whether a job may run again: a chunk the broker took, nothing less."""
    out = Recorder()
    writer = StreamWriter(JOB, out, attempt="a1", window=10)
    await writer.end()  # an empty stream's end is no output
    assert out.sent and not writer.output_confirmed

    async def refused(job: Job, reply: Reply) -> None:
        raise UnroutableError("not confirmed")

    writer = StreamWriter(JOB, refused, attempt="a1", window=10)
    with pytest.raises(UnroutableError):
        await writer.send(b"data: 0\n\n")
    assert writer.started and not writer.output_confirmed  # numbered, but reached nobody

    writer = StreamWriter(JOB, Recorder(), attempt="a1", window=10)
    await writer.send(b"data: 0\n\n")
    assert writer.output_confirmed


@pytest.mark.parametrize(("pause", "at_once"), [(0.05, False), (0.17, True)])
async def test_an_event_in_the_windows_last_quarter_goes_out_at_once(
    pause: float, at_once: bool
) -> None:
    """A timer for what is left of the window only when more than a quarter is left: a
    shorter one would gather next to nothing and cost a wakeup of its own."""
    out = Recorder()
    writer = StreamWriter(JOB, out, attempt="a1", window=0.2)
    await writer.send(b"data: role\n\n")
    await writer.send(b"data: first token\n\n")  # opens the window
    await asyncio.sleep(pause)
    await writer.send(b"data: next\n\n")
    assert (len(out.sent) == 3) is at_once
    await writer.end()
    assert b"".join(r.body for r in out.sent).count(b"next") == 1


async def test_fail_flushes_then_sends_an_error_once() -> None:
    out = Recorder()
    writer = StreamWriter(JOB, out, attempt="a1", window=10)
    await writer.send(b"data: 0\n\n")
    await writer.send(b"data: 1\n\n")
    await writer.fail(UpstreamError("boom"))
    await writer.end()  # already closed: no second closing message
    kinds = [r.kind for r in out.sent]
    assert kinds == [ReplyKind.CHUNK, ReplyKind.CHUNK, ReplyKind.ERROR]
    assert out.sent[-1].status == 502 and b"boom" in out.sent[-1].body


async def test_an_event_after_a_quiet_spell_goes_out_at_once() -> None:
    out = Recorder()
    writer = StreamWriter(JOB, out, attempt="a1", window=0.02)
    await writer.send(b"data: role\n\n")
    await asyncio.sleep(0.03)  # the model thinks longer than the window
    await writer.send(b"data: first token\n\n")
    assert [r.body for r in out.sent] == [b"data: role\n\n", b"data: first token\n\n"]
    await writer.send(b"data: burst\n\n")  # within the window of the last message: waits
    assert len(out.sent) == 2
    await writer.end()
    assert [r.kind for r in out.sent][-1] is ReplyKind.END


async def test_an_event_sent_while_a_batch_awaits_its_confirm_goes_out_a_window_later() -> None:
    """It is not left for the next send(): the model may pause for minutes after it."""
    out = Recorder()
    confirmed, published_during = asyncio.Event(), asyncio.Event()

    async def slow_to_confirm(job: Job, reply: Reply) -> None:
        if reply.body == b"data: batch\n\n":
            await confirmed.wait()
        await out(job, reply)
        if reply.body == b"data: during\n\n":
            published_during.set()

    writer = StreamWriter(JOB, slow_to_confirm, attempt="a1", window=0.02)
    await writer.send(b"data: role\n\n")
    await writer.send(b"data: first token\n\n")
    await writer.send(b"data: batch\n\n")  # gathered for a window, then published
    await asyncio.sleep(0.04)  # ... and its confirm is slow to come
    await writer.send(b"data: during\n\n")
    confirmed.set()
    async with asyncio.timeout(1):  # then the model pauses: no send(), no end()
        await published_during.wait()
    await writer.end()
    assert [r.seq for r in out.sent] == list(range(5))


class UnroutableFor:
    """A broker whose publishes find no queue for the first `misses` tries."""

    publish_timeout = 5.0

    def __init__(self, misses: int) -> None:
        self.misses = misses
        self.tries = 0

    async def publish(self, env: Envelope, routing_key: str, **_: object) -> None:
        self.tries += 1
        if self.tries <= self.misses:
            raise UnroutableError(routing_key)


def a_job() -> Job:
    return Job(request_id="r1", model="m", reply_to="reply.q", deadline=1e12, body=b"{}")


async def test_a_reply_queue_being_redeclared_is_waited_for_briefly() -> None:
    broker = UnroutableFor(misses=2)
    publish = ReplyPublisher(cast(Broker, broker), persistent=False, unroutable_retries=(0, 0, 0))
    await publish.final(a_job(), b"{}", attempt="a")
    assert broker.tries == 3


async def test_a_reply_queue_still_missing_after_the_retries_is_gone() -> None:
    broker = UnroutableFor(misses=10)
    publish = ReplyPublisher(cast(Broker, broker), persistent=False, unroutable_retries=(0, 0))
    with pytest.raises(ReplyQueueGoneError):
        await publish.final(a_job(), b"{}", attempt="a")
    assert broker.tries == 3


class BlockedFor:
    """A broker whose connection is blocked (a memory alarm) for `seconds`: a publish is
    confirmed once that has passed, unless its wait for the confirm ends first."""

    publish_timeout = 0.05

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.confirmed = 0

    async def publish(
        self, env: Envelope, routing_key: str, *, timeout: float, **_: object
    ) -> None:
        if timeout < self.seconds:
            await asyncio.sleep(timeout)
            raise BrokerUnavailableError()
        await asyncio.sleep(self.seconds)
        self.confirmed += 1


async def test_an_answer_waits_out_a_blocked_connection_within_the_jobs_deadline() -> None:
    # Giving up after `publish_timeout` requeued a job whose answer was already on its way.
    broker = BlockedFor(seconds=0.2)
    publish = ReplyPublisher(cast(Broker, broker), persistent=False)
    job = Job(request_id="r1", model="m", reply_to="q", deadline=time.time() + 5, body=b"{}")
    await publish.final(job, b"{}", attempt="a")
    assert broker.confirmed == 1


async def test_an_answer_past_its_deadline_waits_only_the_publish_timeout() -> None:
    broker = BlockedFor(seconds=0.2)
    publish = ReplyPublisher(cast(Broker, broker), persistent=False)
    job = Job(request_id="r1", model="m", reply_to="q", deadline=time.time() - 1, body=b"{}")
    with pytest.raises(BrokerUnavailableError):
        await publish.final(job, b"{}", attempt="a")
    assert broker.confirmed == 0


class LostPublishingConnection:
    """A broker whose publishing connection drops once (`fails` publishes fail) and is back
    when asked (`publishing()`), as after `rabbitmqctl close_connection`."""

    publish_timeout = 5.0

    def __init__(self, fails: int = 1) -> None:
        self.fails = fails
        self.sent: list[Reply] = []
        self.waits = 0

    async def publish(self, env: Envelope, routing_key: str, **_: object) -> None:
        if self.fails:
            self.fails -= 1
            raise BrokerUnavailableError()
        self.sent.append(decode_reply(env))

    async def publishing(self, timeout: float) -> bool:
        self.waits += 1
        return True


@pytest.mark.parametrize("kind", [ReplyKind.CHUNK, ReplyKind.END, ReplyKind.ERROR])
async def test_a_later_stream_message_is_sent_again_once_the_broker_is_back(
    kind: ReplyKind,
) -> None:
    """Mid-stream the job will not run again: a message lost with the publishing connection
    went nowhere, not even the stream's error, and the client waited out its idle timeout
    (review 2026-11-29). It goes again, under the same number, once publishing is back."""
    broker = LostPublishingConnection()
    publish = ReplyPublisher(cast(Broker, broker), persistent=False)
    await publish(a_job(), Reply(kind, "r1", "a", body=b"data: 2\n\n", seq=2))
    assert [(r.kind, r.seq) for r in broker.sent] == [(kind, 2)] and broker.waits == 1


@pytest.mark.parametrize(
    "reply",
    [
        Reply(ReplyKind.CHUNK, "r1", "a", body=b"data: 1\n\n", seq=0),  # nothing sent yet
        Reply(ReplyKind.FINAL, "r1", "a", body=b"{}"),  # the job goes back to its queue
    ],
    ids=["first-chunk", "json-answer"],
)
async def test_a_reply_before_any_output_is_not_sent_again(reply: Reply) -> None:
    broker = LostPublishingConnection()
    publish = ReplyPublisher(cast(Broker, broker), persistent=False)
    with pytest.raises(BrokerUnavailableError):
        await publish(a_job(), reply)
    assert broker.sent == [] and broker.waits == 0


async def test_a_stream_message_whose_confirm_timed_out_is_not_sent_again() -> None:
    """A memory alarm blocks the connection: the broker has the message (or will), and each
    try would wait out the publish timeout again (review 2026-11-29)."""

    class Blocked(LostPublishingConnection):
        async def publish(self, env: Envelope, routing_key: str, **_: object) -> None:
            self.fails -= 1
            raise BrokerUnavailableError() from TimeoutError()

    broker = Blocked()
    publish = ReplyPublisher(cast(Broker, broker), persistent=False)
    with pytest.raises(BrokerUnavailableError):
        await publish(a_job(), Reply(ReplyKind.CHUNK, "r1", "a", body=b"x", seq=3))
    assert broker.fails == 0 and broker.waits == 0  # one try


async def test_a_stream_message_is_given_up_when_the_broker_stays_away() -> None:
    broker = LostPublishingConnection(fails=10)
    publish = ReplyPublisher(cast(Broker, broker), persistent=False)
    with pytest.raises(BrokerUnavailableError):
        await publish(a_job(), Reply(ReplyKind.CHUNK, "r1", "a", body=b"x", seq=3))
    assert broker.sent == [] and broker.fails == 7  # three tries


async def test_an_answer_past_the_reply_limit_is_sent_as_a_502_not_published() -> None:
    """The broker would refuse it by closing the channel, failing every reply in flight on it."""
    broker = RecordingBroker()
    publish = ReplyPublisher(cast(Broker, broker), persistent=False, max_body=100)
    await publish.final(a_job(), b"x" * 101, attempt="a")
    [reply] = [decode_reply(env) for env in broker.sent]
    assert (reply.kind, reply.status, reply.attempt) == (ReplyKind.ERROR, 502, "a")
    assert orjson.loads(reply.body)["error"]["code"] == "answer_too_large"
    await publish.final(a_job(), b"x" * 100, attempt="b")
    assert decode_reply(broker.sent[-1]).body == b"x" * 100


async def test_an_answer_past_the_reply_limit_keeps_its_headers_and_says_not_to_retry() -> None:
    """The SDKs retried the 502, paying for two more whole generations upstream; and the
    upstream's request id and rate limits, which the answer carried, were dropped."""
    broker = RecordingBroker()
    publish = ReplyPublisher(cast(Broker, broker), persistent=False, max_body=100)
    headers = {"x-upstream-request-id": "req_1", "x-ratelimit-remaining-tokens": "9"}
    status = await publish.final(a_job(), b"x" * 101, attempt="a", http_headers=headers)
    [reply] = [decode_reply(env) for env in broker.sent]
    assert status == reply.status == 502
    assert reply.http_headers == {**headers, "x-should-retry": "false"}


async def test_a_chunk_past_the_reply_limit_raises_and_is_not_published() -> None:
    broker = RecordingBroker()
    publish = ReplyPublisher(cast(Broker, broker), persistent=False, max_body=100)
    with pytest.raises(AnswerTooLargeError):
        await publish(JOB, Reply(ReplyKind.CHUNK, "r1", "a", body=b"x" * 101))
    assert broker.sent == []


async def test_a_burst_is_split_into_messages_within_the_limit_in_order() -> None:
    out = Recorder()
    writer = StreamWriter(JOB, out, attempt="a1", window=0.01, max_bytes=25)
    await writer.send(b"data: first\n\n")
    events = [f"data: {i:02}\n\n".encode() for i in range(7)]  # 10 bytes each
    for event in events:
        await writer.send(event)
    await writer.end()
    chunks = [r for r in out.sent if r.kind is ReplyKind.CHUNK]
    assert all(len(r.body) <= 25 for r in chunks)
    assert b"".join(r.body for r in chunks) == b"data: first\n\n" + b"".join(events)
    assert [r.seq for r in out.sent] == list(range(len(out.sent)))


async def test_a_failing_stream_after_a_lost_chunk_sends_its_error_alone() -> None:
    """The channel that refused a chunk is back: the client gets the error now, not at its
    idle timeout (the lost chunk's number tells the API it is gone)."""
    out = Recorder()
    refuse = [False, True]

    async def publish(job: Job, reply: Reply) -> None:
        if reply.kind is ReplyKind.CHUNK and refuse and refuse.pop(0):
            raise BrokerUnavailableError()
        await out(job, reply)

    writer = StreamWriter(JOB, publish, attempt="a1", window=10)
    await writer.send(b"data: 0\n\n")
    with pytest.raises(BrokerUnavailableError):
        await writer.send(b"data: 1\n\n")
    await writer.fail(BrokerUnavailableError())
    assert [(r.kind, r.seq) for r in out.sent] == [(ReplyKind.CHUNK, 0), (ReplyKind.ERROR, 2)]


async def test_an_answer_too_large_to_cache_tells_the_cache_writer_only_that_it_ended() -> None:
    """Its body in a `job.completed` would be a second large message, for nothing: the cache
    keeps no answer past MAX_CACHED_BODY."""
    events: list[Envelope] = []

    async def publish_completed(env: Envelope) -> None:
        events.append(env)

    completed = CompletedBatcher(publish_completed, delay=0)
    publish = ReplyPublisher(cast(Broker, RecordingBroker()), persistent=False, completed=completed)
    job = dataclasses.replace(a_job(), cache_key="k")
    await publish.final(job, b"x" * (MAX_CACHED_BODY + 1), attempt="a")
    await publish.final(job, b"small", attempt="b")
    await completed.flush()
    got = [event for env in events for event in decode_completed(env)]
    assert [(e.body, e.status) for e in got] == [(b"", 500), (b"small", 200)]


async def test_a_stream_whose_end_could_not_be_published_can_still_fail() -> None:
    """`end()` flushes the last chunk, which the broker refused: the stream has not ended,
    and the caller's `fail()` next still tells the client (it used to return at once)."""
    out = Recorder()
    refuse = [False, False, True]

    async def publish(job: Job, reply: Reply) -> None:
        if reply.kind is ReplyKind.CHUNK and refuse and refuse.pop(0):
            raise BrokerUnavailableError()
        await out(job, reply)

    writer = StreamWriter(JOB, publish, attempt="a1", window=10)
    for i in range(3):  # the first two go at once, the third waits out the window
        await writer.send(f"data: {i}\n\n".encode())
    with pytest.raises(BrokerUnavailableError):
        await writer.end()
    await writer.fail(BrokerUnavailableError())
    sent = [(r.kind, r.seq) for r in out.sent]
    assert sent == [(ReplyKind.CHUNK, 0), (ReplyKind.CHUNK, 1), (ReplyKind.ERROR, 3)]
    await writer.fail(BrokerUnavailableError())  # closed now: nothing more
    assert len(out.sent) == 3


async def test_a_job_given_up_is_answered_with_a_500_naming_its_request_id() -> None:
    broker = RecordingBroker()
    publish = ReplyPublisher(cast(Broker, broker), persistent=False)
    job = Job(request_id="r9", model="m", reply_to="reply.q", deadline=time.time() + 60, body=b"{}")
    await publish.give_up(encode_job(job, now=time.time()), ValueError("a bug"))
    [reply] = [decode_reply(env) for env in broker.sent]
    assert (reply.kind, reply.status, reply.request_id) == (ReplyKind.ERROR, 500, "r9")
    error = orjson.loads(reply.body)["error"]
    assert error["type"] == "server_error" and "r9" in error["message"]
    assert "a bug" not in error["message"]  # a bug's details stay in the log
