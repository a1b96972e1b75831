"""A job dead-lettered back from an agent queue (its AGENT_QUEUE_TTL passed) is answered 503,
but only when it expired in its own model's queue."""

from __future__ import annotations

import dataclasses
import time
from typing import cast

from services.dispatcher.handler import DispatcherHandler
from services.dispatcher.registry import AgentTable, Registry, SqliteStore
from shared.amqp import Broker, Delivery
from shared.cancel import Cancellations
from shared.messages import Envelope, Job, decode_reply, encode_job
from shared.topology import Topology
from tests.support.amqp import RecordingBroker

NO_DELIVERY = cast(Delivery, None)


def handler(broker: RecordingBroker) -> DispatcherHandler:
    async def no_queue(_: object) -> None:
        pass

    return DispatcherHandler(
        topology=Topology(namespace="test"),
        broker=cast(Broker, broker),
        registry=Registry(AgentTable(ttl=10), SqliteStore(":memory:")),
        cancellations=Cancellations(),
        ensure_queue=no_queue,
    )


def returned(model: str, died_in: str) -> Envelope:
    job = Job(request_id="r1", model=model, reply_to="q", deadline=time.time() + 60, body=b"{}")
    env = encode_job(job, now=time.time())
    headers = {**env.headers, "x-first-death-reason": "expired", "x-first-death-queue": died_in}
    return dataclasses.replace(env, headers=headers)


async def test_a_job_that_waited_out_its_models_queue_is_answered_503() -> None:
    broker = RecordingBroker()
    dispatcher = handler(broker)
    own_queue = dispatcher.topology.agent_queue("local_a")
    await dispatcher.on_returned(returned("local_a", own_queue), NO_DELIVERY)
    [reply] = [decode_reply(env) for env in broker.sent]
    assert reply.status == 503 and b"no_agent_available" in reply.body


async def test_a_job_that_expired_in_another_models_queue_is_not_answered() -> None:
    """An agent may copy a job it saw into its own queues (the requeue exchange lets it): one
    for another model, expiring there, was answered 503 in the router's name, and the API,
    trusting the dispatcher, dropped the real answer (review 2026-11-29)."""
    broker = RecordingBroker()
    dispatcher = handler(broker)
    other_queue = dispatcher.topology.agent_queue("local_b")
    await dispatcher.on_returned(returned("local_a", other_queue), NO_DELIVERY)
    assert broker.sent == []
