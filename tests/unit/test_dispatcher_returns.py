"""A job dead-lettered back from an agent queue (its AGENT_QUEUE_TTL passed) is answered 503,
but only when it expired in its own model's queue; one an agent held and handed back (it died or
stopped) is queued again instead (services/dispatcher/returns.py)."""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any, cast

import pytest

from services.dispatcher.handler import DispatcherHandler
from services.dispatcher.registry import AgentTable, Registry, SqliteStore
from services.dispatcher.returns import HELD_SLACK, Death, delivery_count, latest_death, was_held
from shared.amqp import Broker, Delivery
from shared.cancel import Cancellations
from shared.messages import (
    H_DELIVERIES,
    H_QUEUED_AT,
    AgentRegistration,
    Envelope,
    Job,
    decode_job,
    decode_reply,
    encode_job,
)
from shared.topology import Topology
from tests.support.amqp import RecordingBroker

NO_DELIVERY = cast(Delivery, None)


TTL = Topology(namespace="test").agent_queue_ttl_ms / 1000


def handler(broker: RecordingBroker, *, live: tuple[str, ...] = ()) -> DispatcherHandler:
    async def no_queue(_: object) -> None:
        pass

    registry = Registry(AgentTable(ttl=10), SqliteStore(":memory:"))
    if live:
        registry.table.register(AgentRegistration(name="a1", models=list(live)), now=time.time())
    return DispatcherHandler(
        topology=Topology(namespace="test"),
        broker=cast(Broker, broker),
        registry=registry,
        cancellations=Cancellations(),
        ensure_queue=no_queue,
    )


def returned(
    model: str,
    died_in: str,
    reason: str = "expired",
    *,
    forged: dict[str, str] | None = None,
    queued_ago: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Envelope:
    """A job as the returns queue gets it: the broker's `x-death` entry of its last death
    first (and `x-first-death-*` headers, which a publisher may have set itself). `queued_ago`:
    the job entered its queue that many seconds before it died (stamped `x-queued-at`)."""
    now = time.time()
    job = Job(request_id="r1", model=model, reply_to="q", deadline=now + 60, body=b"{}")
    env = encode_job(job, now=now)
    died = datetime.datetime.fromtimestamp(int(now), tz=datetime.UTC)  # whole seconds
    death = {"queue": died_in, "reason": reason, "count": 1, "time": died}
    first = forged or {"x-first-death-reason": reason, "x-first-death-queue": died_in}
    headers = {**env.headers, "x-death": [death], **first, **(extra or {})}
    if queued_ago is not None:
        headers[H_QUEUED_AT] = round((int(now) - queued_ago) * 1000)
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


async def test_a_job_an_agent_held_past_the_ttl_is_queued_again_not_answered() -> None:
    """RabbitMQ keeps a requeued message's first enqueue time: a job its agent held for longer
    than AGENT_QUEUE_TTL, then died holding, expired the moment it was back, and its client got
    503 "no agent took the request" while another agent sat idle (review 2026-11-29)."""
    broker = RecordingBroker()
    dispatcher = handler(broker, live=("local_a",))
    own_queue = dispatcher.topology.agent_queue("local_a")
    before = time.time()
    await dispatcher.on_returned(returned("local_a", own_queue, queued_ago=TTL + 20), NO_DELIVERY)
    [again] = broker.sent
    assert decode_job(again).request_id == "r1" and "x-death" not in again.headers
    assert again.headers[H_DELIVERIES] == 2
    assert again.headers[H_QUEUED_AT] >= before * 1000 - 1  # a fresh TTL from now


async def test_a_job_held_and_handed_back_too_often_is_a_503() -> None:
    broker = RecordingBroker()
    dispatcher = handler(broker, live=("local_a",))
    own_queue = dispatcher.topology.agent_queue("local_a")
    limit = {H_DELIVERIES: dispatcher.topology.delivery_limit}
    await dispatcher.on_returned(
        returned("local_a", own_queue, queued_ago=TTL + 20, extra=limit), NO_DELIVERY
    )
    [reply] = [decode_reply(env) for env in broker.sent]
    assert reply.status == 503 and b"could finish the request" in reply.body


async def test_a_job_held_whose_model_has_no_live_agent_left_is_told_so() -> None:
    broker = RecordingBroker()
    dispatcher = handler(broker)
    gone = AgentRegistration(name="a1", models=["local_a"])
    dispatcher.registry.table.register(gone, now=time.time() - 100)  # known, not live
    own_queue = dispatcher.topology.agent_queue("local_a")
    await dispatcher.on_returned(returned("local_a", own_queue, queued_ago=TTL + 20), NO_DELIVERY)
    [reply] = [decode_reply(env) for env in broker.sent]
    assert reply.status == 503 and b"no_live_agent" in reply.body


async def test_a_job_that_only_waited_its_ttl_out_is_answered_503_even_if_stamped() -> None:
    broker = RecordingBroker()
    dispatcher = handler(broker, live=("local_a",))
    own_queue = dispatcher.topology.agent_queue("local_a")
    await dispatcher.on_returned(returned("local_a", own_queue, queued_ago=TTL + 1), NO_DELIVERY)
    [reply] = [decode_reply(env) for env in broker.sent]
    assert reply.status == 503 and b"took the request" in reply.body


@pytest.mark.parametrize(
    ("queued_ago", "reason", "held"),
    [
        (TTL, "expired", False),
        (TTL + HELD_SLACK, "expired", False),  # x-death's whole seconds, the clocks' skew
        (TTL + HELD_SLACK + 1, "expired", True),
        (TTL + 100, "rejected", False),
        (None, "expired", False),  # queued by a dispatcher that stamps nothing
    ],
)
def test_a_job_counts_as_held_only_when_it_died_well_past_its_ttl(
    queued_ago: float | None, reason: str, held: bool
) -> None:
    env = returned("local_a", "q", reason, queued_ago=queued_ago)
    assert was_held(env, latest_death(env), TTL) is held


def test_a_death_without_a_time_or_entry_is_read_as_unknown() -> None:
    env = returned("local_a", "q", queued_ago=TTL + 100)
    naive = dict(env.headers["x-death"][0])
    naive["time"] = naive["time"].replace(tzinfo=None)  # read as UTC
    with_naive = dataclasses.replace(env, headers={**env.headers, "x-death": [naive]})
    assert latest_death(with_naive) == latest_death(env)
    assert latest_death(dataclasses.replace(env, headers={})) == Death()
    assert not was_held(env, Death("q", "expired"), TTL)


@pytest.mark.parametrize(("counted", "count"), [(None, 1), (3, 3), (-50, 1), (True, 1), ("4", 1)])
def test_the_delivery_count_is_a_plain_positive_integer(counted: object, count: int) -> None:
    env = returned("local_a", "q", extra={} if counted is None else {H_DELIVERIES: counted})
    assert delivery_count(env) == count


async def test_a_job_queued_again_that_nobody_took_says_an_agent_could_not_finish_it() -> None:
    """Its only agent died holding it: queued again while the registry still counted that agent
    live, nobody took it. Not "no agent took the request": one did."""
    broker = RecordingBroker()
    dispatcher = handler(broker, live=("local_a",))
    own_queue = dispatcher.topology.agent_queue("local_a")
    again = returned("local_a", own_queue, queued_ago=TTL, extra={H_DELIVERIES: 2})
    await dispatcher.on_returned(again, NO_DELIVERY)
    [reply] = [decode_reply(env) for env in broker.sent]
    assert reply.status == 503 and b"could finish the request" in reply.body
