"""A job its dispatcher cannot handle, on the real RabbitMQ: its client hears of it at once.

One `DispatcherService` in this process, in the test's own broker namespace, and a reply queue
of the test's own bound to the namespace's `replies` exchange, as an API's is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from services.dispatcher.service import DispatcherService
from services.dispatcher.settings import DispatcherSettings
from shared.amqp import Broker
from shared.messages import Envelope, Job, ReplyKind, decode_reply, encode_job
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
    )
    service = DispatcherService(settings)
    try:
        await service.start()
        yield service
    finally:
        await service.stop()


async def test_a_job_that_crashes_the_dispatcher_twice_is_answered_500_at_once(
    dispatcher: DispatcherService,
) -> None:
    """A body nested past what orjson writes (the API refuses those now) failed the cache key
    on both deliveries, and the job went to the dead-letter queue without a word: its client
    waited out REQUEST_TIMEOUT for a 504."""
    topology = dispatcher.topology
    deep = "[" * 300 + "]" * 300
    body = b'{"model":"dummy","messages":[{"role":"user","content":"hi"}],"x":%s}' % deep.encode()
    publisher = Broker(URL, name="test-client", publish_timeout=5)
    await publisher.connect()
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        await replies.bind(topology.replies_exchange, routing_key=replies.name)
        job = Job(
            request_id="r-deep",
            model="dummy",
            reply_to=replies.name,
            deadline=time.time() + 60,
            body=body,
        )
        started = time.monotonic()
        await publisher.publish(encode_job(job, now=time.time()), topology.jobs_queue)
        async with asyncio.timeout(10), replies.iterator() as incoming:
            async for delivered in incoming:
                await delivered.ack()
                break
        elapsed = time.monotonic() - started
    finally:
        await connection.close()
        await publisher.close()
    reply = decode_reply(
        Envelope(
            type=delivered.type or "",
            body=delivered.body,
            headers=dict(delivered.headers),
            correlation_id=delivered.correlation_id,
        )
    )
    assert (reply.kind, reply.status, reply.request_id) == (ReplyKind.ERROR, 500, "r-deep")
    assert elapsed < 5  # the two tries, not a deadline
