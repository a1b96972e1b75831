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


def returned(
    model: str, died_in: str, reason: str = "expired", *, forged: dict[str, str] | None = None
) -> Envelope:
    """A job as the returns queue gets it: the broker's `x-death` entry of its last death
    first (and `x-first-death-*` headers, which a publisher may have set itself)."""
    job = Job(request_id="r1", model=model, reply_to="q", deadline=time.time() + 60, body=b"{}")
    env = encode_job(job, now=time.time())
    death = {"queue": died_in, "reason": reason, "count": 1}
    first = forged or {"x-first-death-reason": reason, "x-first-death-queue": died_in}
    return dataclasses.replace(env, headers={**env.headers, "x-death": [death], **first})


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


async def test_a_forged_first_death_header_does_not_count() -> None:
    """RabbitMQ keeps a publisher's own `x-first-death-*` when the message carries `x-death`:
    an agent could make a job it rejected in its queue look expired in another model's
    (review 2026-11-29). The broker's latest `x-death` entry is what counts."""
    broker = RecordingBroker()
    dispatcher = handler(broker)
    other_queue = dispatcher.topology.agent_queue("local_b")
    forged = {
        "x-first-death-reason": "expired",
        "x-first-death-queue": dispatcher.topology.agent_queue("local_a"),
    }
    await dispatcher.on_returned(returned("local_a", other_queue, forged=forged), NO_DELIVERY)
    assert broker.sent == []


async def test_a_job_its_agent_rejected_is_not_answered_again() -> None:
    """Its agent gave up on it and answered 500 itself; a 503 beside it raced that answer."""
    broker = RecordingBroker()
    dispatcher = handler(broker)
    own_queue = dispatcher.topology.agent_queue("local_a")
    await dispatcher.on_returned(returned("local_a", own_queue, "rejected"), NO_DELIVERY)
    assert broker.sent == []


async def test_a_job_past_a_quorum_queues_delivery_limit_is_still_a_503() -> None:
    """The queue counts a crash and a hand-back (an agent paused or stopping) alike: retrying
    may well succeed, so not a 500."""
    broker = RecordingBroker()
    dispatcher = handler(broker)
    own_queue = dispatcher.topology.agent_queue("local_a")
    await dispatcher.on_returned(returned("local_a", own_queue, "delivery_limit"), NO_DELIVERY)
    [reply] = [decode_reply(env) for env in broker.sent]
    assert reply.status == 503 and b"could finish the request" in reply.body
