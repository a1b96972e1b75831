"""A job for a local model a warming-up dispatcher has not heard of waits for the heartbeat
that may be on its way, instead of a 503 (a dispatcher just added fails no live model)."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import orjson

from services.dispatcher.handler import DispatcherHandler
from services.dispatcher.registry import AgentTable, Registry, SqliteStore
from shared.amqp import Broker, Delivery
from shared.cancel import Cancellations
from shared.messages import AgentHeartbeat, Job, decode_reply, encode_job
from shared.topology import Topology
from tests.support.amqp import RecordingBroker

NO_DELIVERY = cast(Delivery, None)
TTL = 0.6  # the warm-up: one heartbeat TTL


def warming_dispatcher(broker: RecordingBroker, *, waiters: int = 4) -> DispatcherHandler:
    async def no_queue(_: object) -> None:
        pass

    registry = Registry(AgentTable(ttl=TTL), SqliteStore(":memory:"))
    registry.table.start_listening(time.time())
    return DispatcherHandler(
        topology=Topology(namespace="test"),
        broker=cast(Broker, broker),
        registry=registry,
        cancellations=Cancellations(),
        ensure_queue=no_queue,
        max_registry_waiters=waiters,
    )


def job_for(model: str, request_id: str = "r1") -> Job:
    return Job(
        request_id=request_id, model=model, reply_to="q", deadline=time.time() + 60, body=b"{}"
    )


async def heard_after(dispatcher: DispatcherHandler, delay: float, model: str) -> None:
    await asyncio.sleep(delay)
    heartbeat = AgentHeartbeat(name="gpu1", instance="p1", models=[model])
    dispatcher.registry.record(heartbeat, time.time())


async def test_a_job_waits_for_its_models_heartbeat_then_goes_to_its_agents() -> None:
    broker = RecordingBroker()
    dispatcher = warming_dispatcher(broker)
    job = encode_job(job_for("local_a"), now=time.time())
    await asyncio.gather(
        dispatcher.on_job(job, NO_DELIVERY), heard_after(dispatcher, 0.2, "local_a")
    )
    [sent] = broker.sent
    assert sent.type == "job"  # handed to the agents, not answered


async def test_a_model_nobody_announces_by_the_warm_ups_end_is_a_404() -> None:
    broker = RecordingBroker()
    dispatcher = warming_dispatcher(broker)
    started = time.monotonic()
    await dispatcher.on_job(encode_job(job_for("local_typo"), now=time.time()), NO_DELIVERY)
    assert TTL - 0.1 < time.monotonic() - started < TTL + 0.5
    [reply] = [decode_reply(env) for env in broker.sent]
    assert reply.status == 404
    assert orjson.loads(reply.body)["error"]["code"] == "model_not_found"


async def test_past_the_waiters_bound_a_job_is_answered_503_at_once() -> None:
    """Waiters hold prefetch slots: a burst for unknown models must not stall the rest."""
    broker = RecordingBroker()
    dispatcher = warming_dispatcher(broker, waiters=0)
    started = time.monotonic()
    await dispatcher.on_job(encode_job(job_for("local_a"), now=time.time()), NO_DELIVERY)
    assert time.monotonic() - started < 0.1
    [reply] = [decode_reply(env) for env in broker.sent]
    assert reply.status == 503
    assert orjson.loads(reply.body)["error"]["code"] == "registry_warming_up"


async def test_a_waiting_job_its_client_cancelled_is_dropped() -> None:
    broker = RecordingBroker()
    dispatcher = warming_dispatcher(broker)

    async def cancel_soon() -> None:
        await asyncio.sleep(0.1)
        dispatcher.cancellations.cancel("r1", time.time())

    env = encode_job(job_for("local_a"), now=time.time())
    await asyncio.gather(dispatcher.on_job(env, NO_DELIVERY), cancel_soon())
    assert broker.sent == []
