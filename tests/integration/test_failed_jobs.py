"""A job its dispatcher cannot handle, on the real RabbitMQ: its client hears of it at once.

One `DispatcherService` in this process, in the test's own broker namespace, and a reply queue
of the test's own bound to the namespace's `replies` exchange, as an API's is. Also what the
dispatcher answers for a job that came back from an agent queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from services.dispatcher import dummy
from services.dispatcher.returns import HELD_SLACK
from services.dispatcher.service import DispatcherService
from services.dispatcher.settings import DispatcherSettings
from shared.amqp import Broker
from shared.messages import (
    H_DELIVERIES,
    AgentRegistration,
    Envelope,
    Job,
    Reply,
    ReplyKind,
    decode_reply,
    encode_job,
)
from shared.topology import declare_queue
from tests.conftest import REDIS, require_services
from tests.support.procs import new_namespace

pytestmark = pytest.mark.integration

URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def dispatcher(tmp_path: Path) -> AsyncIterator[DispatcherService]:
    require_services()
    settings = DispatcherSettings(
        broker_namespace=new_namespace(),
        registry_path=str(tmp_path / "registry.sqlite3"),
        redis_url=f"redis://{REDIS[0]}:{REDIS[1]}/0",  # the cache key is where it failed
        openai_api_key=None,
        agent_queue_ttl=1.0,
    )
    service = DispatcherService(settings)
    try:
        await service.start()
        yield service
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def client_of(dispatcher: DispatcherService) -> AsyncIterator[Client]:
    """A publisher of jobs and a reply queue bound to the namespace's `replies` exchange, as
    an API has."""
    publisher = Broker(URL, name="test-client", publish_timeout=5)
    await publisher.connect()
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        await replies.bind(dispatcher.topology.replies_exchange, routing_key=replies.name)
        yield Client(publisher, channel, replies)
    finally:
        await connection.close()
        await publisher.close()


@dataclasses.dataclass
class Client:
    publisher: Broker
    channel: aio_pika.abc.AbstractChannel
    replies: aio_pika.abc.AbstractQueue

    def job(self, model: str, body: bytes = b"{}") -> Job:
        return Job(
            request_id="r-" + uuid.uuid4().hex[:8],
            model=model,
            reply_to=self.replies.name,
            deadline=time.time() + 60,
            body=body,
        )

    async def replies_within(self, seconds: float, *, expected: int = 0) -> list[Reply]:
        """The replies that arrive within `seconds` (sooner once `expected` have)."""
        got: list[Reply] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds), self.replies.iterator() as incoming:
                async for delivered in incoming:
                    await delivered.ack()
                    got.append(
                        decode_reply(
                            Envelope(
                                type=delivered.type or "",
                                body=delivered.body,
                                headers=dict(delivered.headers),
                                correlation_id=delivered.correlation_id,
                            )
                        )
                    )
                    if len(got) == expected:
                        break
        return got


async def test_a_job_that_crashes_the_dispatcher_twice_is_answered_500_at_once(
    dispatcher: DispatcherService,
) -> None:
    """A body nested past what orjson writes (the API refuses those now) failed the cache key
    on both deliveries, and the job went to the dead-letter queue without a word: its client
    waited out REQUEST_TIMEOUT for a 504."""
    deep = "[" * 300 + "]" * 300
    body = b'{"model":"dummy","messages":[{"role":"user","content":"hi"}],"x":%s}' % deep.encode()
    async with client_of(dispatcher) as client:
        job = client.job("dummy", body)
        await client.publisher.publish(
            encode_job(job, now=time.time()), dispatcher.topology.jobs_queue
        )
        [reply] = await client.replies_within(5, expected=1)  # the two tries, not a deadline
    assert (reply.kind, reply.status, reply.request_id) == (ReplyKind.ERROR, 500, job.request_id)


async def test_a_job_given_up_releases_its_cache_lock_for_the_same_request(
    dispatcher: DispatcherService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first of two identical deterministic requests took the single-flight lock and its
    handler failed: the second waited CACHE_SINGLE_FLIGHT_WAIT (30 s) behind a job that
    had already been answered 500 (review 2026-11-29)."""
    real = dummy.completion

    def failing_for_the_first(request_id: str, *args: Any, **kwargs: Any) -> bytes:
        if request_id.startswith("r-first"):
            raise ValueError("a bug")
        return real(request_id, *args, **kwargs)

    monkeypatch.setattr(dummy, "completion", failing_for_the_first)
    body = b'{"model":"dummy","messages":[{"role":"user","content":"%s"}],"temperature":0}' % (
        uuid.uuid4().hex.encode()  # a key of this test's own
    )
    async with client_of(dispatcher) as client:
        first = dataclasses.replace(client.job("dummy", body), request_id="r-first")
        await client.publisher.publish(
            encode_job(first, now=time.time()), dispatcher.topology.jobs_queue
        )
        [failed] = await client.replies_within(3, expected=1)
        second = client.job("dummy", body)
        await client.publisher.publish(
            encode_job(second, now=time.time()), dispatcher.topology.jobs_queue
        )
        [answered] = await client.replies_within(3, expected=1)
    assert (failed.request_id, failed.status) == ("r-first", 500)
    assert (answered.request_id, answered.status) == (second.request_id, 200)


async def test_a_job_nobody_took_from_its_agent_queue_is_answered_503(
    dispatcher: DispatcherService,
) -> None:
    """By the broker's own `x-death` entry (its queue and reason) in the returns queue."""
    spec = dispatcher.topology.agent_queue_spec("local_nobody")
    async with client_of(dispatcher) as client:
        await declare_queue(client.channel, spec)
        job = client.job("local_nobody")
        await client.publisher.publish(encode_job(job, now=time.time()), spec.name)
        [reply] = await client.replies_within(4, expected=1)  # AGENT_QUEUE_TTL is 1 s
        await client.channel.queue_delete(spec.name)
    assert (reply.status, reply.request_id) == (503, job.request_id)
    assert b"no_agent_available" in reply.body


async def test_a_job_its_agent_rejected_is_not_answered_by_the_dispatcher(
    dispatcher: DispatcherService,
) -> None:
    """An agent rejects a job only once it gave up on it, and then it answers the client
    itself: a 503 from the returns queue beside that answer raced it."""
    spec = dispatcher.topology.agent_queue_spec("local_rejecting")
    async with client_of(dispatcher) as client:
        queue = await declare_queue(client.channel, spec)
        job = client.job("local_rejecting")
        await client.publisher.publish(encode_job(job, now=time.time()), spec.name)
        async with asyncio.timeout(5), queue.iterator() as incoming:
            async for delivered in incoming:
                await delivered.reject(requeue=False)
                break
        assert await client.replies_within(2) == []
        await client.channel.queue_delete(spec.name)


async def test_a_job_its_agent_held_past_the_queues_ttl_goes_to_another_agent(
    dispatcher: DispatcherService,
) -> None:
    """RabbitMQ keeps a requeued message's first enqueue time: a job an agent held for longer
    than AGENT_QUEUE_TTL (1 s here), then died holding (its channel closed), expired the moment
    it was back, and was answered 503 "no agent took the request" while another agent could
    have run it (review 2026-11-29). It is queued again instead, counted."""
    dispatcher.registry.table.register(
        AgentRegistration(name="a1", models=["local_held"]), now=time.time()
    )
    spec = dispatcher.topology.agent_queue_spec("local_held")
    async with client_of(dispatcher) as client:
        job = client.job("local_held")
        await client.publisher.publish(
            encode_job(job, now=time.time()), dispatcher.topology.jobs_queue
        )
        dying = await aio_pika.connect(URL)  # the first agent's
        try:
            queue = await (await dying.channel()).get_queue(spec.name, ensure=False)
            async with asyncio.timeout(5), queue.iterator() as incoming:
                async for delivered in incoming:
                    assert delivered.correlation_id == job.request_id
                    break
            await asyncio.sleep(1.0 + HELD_SLACK + 1.5)  # held past the TTL and the slack
        finally:
            await dying.close()  # the agent dies: the broker requeues the job, which expires
        survivor = await client.channel.get_queue(spec.name, ensure=False)
        async with asyncio.timeout(5), survivor.iterator() as incoming:
            async for delivered in incoming:
                await delivered.ack()
                assert delivered.correlation_id == job.request_id
                assert delivered.headers[H_DELIVERIES] == 2
                break
        assert await client.replies_within(0.5) == []  # no 503 beside it
        await client.channel.queue_delete(spec.name)
