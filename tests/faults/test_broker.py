"""The broker fails under load: graceful restart, kill -9, SIGSTOP, forced connection close,
and a queue deleted under its consumer.

Every case runs a load of JSON and streaming requests (the `dummy` model and `local_tiny`
through an agent and a fake vLLM), breaks the suite's own RabbitMQ node, brings it back, and
then checks the ledger: no accepted request lost, no duplicate a client can see (a second role
or finish chunk, an answer's text not its model's), every request ended in a 200, a complete
stream or an OpenAI error within its deadline plus 2 s, and full service again within 15 s of
the broker's return.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aio_pika
import httpx
import pytest

from shared.amqp import Broker, Delivery
from shared.messages import Envelope
from shared.topology import Topology, declare_topology
from tests.faults.harness.load import (
    GRACE,
    Entry,
    Ledger,
    LoadGenerator,
    send,
    wait_full_service,
)
from tests.faults.harness.nodes import RabbitNode
from tests.faults.harness.router import LOCAL, FaultRouter
from tests.support.procs import new_namespace, wait_for

MODELS = ["dummy", LOCAL]
RECOVERY = 15.0  # full service again within this many seconds of the broker's return
SLOW_FAKE = ("--latency", "0.5", "--tokens", "8", "--token-rate", "16")
STREAM_IDLE_TIMEOUT = 3.0  # BASE_ENV's: a started stream silent this long ends in an error
PUBLISH_TIMEOUT = 2.0  # BASE_ENV's PUBLISH_TIMEOUT: a 503 for a job the broker did not take

RouterFactory = Callable[..., FaultRouter]


async def start_router(
    make_router: RouterFactory, *, durability: str = "durable", timeout: float = 20.0
) -> FaultRouter:
    router = make_router(
        durability=durability, REQUEST_TIMEOUT=str(timeout), TTFT_TIMEOUT=str(timeout)
    )
    await asyncio.to_thread(router.add_dispatcher)
    await asyncio.to_thread(router.add_api)
    # Slow enough that many jobs are held by the agent (confirmed, unanswered) at any moment.
    fake = await asyncio.to_thread(router.fake, *SLOW_FAKE)
    await asyncio.to_thread(router.agent, "a1", fake.url)
    await asyncio.to_thread(router.wait_listed)
    return router


async def run_outage(
    router: FaultRouter,
    *,
    timeout: float,
    break_broker: Callable[[], None],
    restore_broker: Callable[[], None],
    outage: float = 0.0,
    stream_every: int = 2,
    backlog: int = 0,
    probes: int = 0,
) -> tuple[Ledger, float, float, float]:
    """Load, break, (wait `outage` s), restore, prove full service within RECOVERY, load 3 s
    more; returns the ledger and the break, return and full-service times (monotonic).

    With `probes`, that many requests are also sent during the outage, one per second from 1 s
    after the break: the load's workers may all be waiting on jobs sent before it, so without
    them nothing might be sent while the broker is away.

    With `backlog`, the agent is kept busy (its fake vLLM holds the next two calls 3 s) and
    that many `local_tiny` JSON requests are sent, and the break waits until jobs certainly sit
    in the agent's queue: confirmed jobs nobody has answered yet.
    """
    ledger = Ledger()
    limits = httpx.Limits(max_connections=64)
    extra: list[asyncio.Task[Entry]] = []
    async with httpx.AsyncClient(base_url=router.api, timeout=None, limits=limits) as http:
        load = LoadGenerator(
            http, ledger, models=MODELS, timeout=timeout, concurrency=6, stream_every=stream_every
        ).start()
        await asyncio.sleep(2.0)
        if backlog:
            await asyncio.to_thread(router.fakes[0].script, {"delay": 3}, {"delay": 3})
            extra = [
                asyncio.create_task(send(http, ledger, model=LOCAL, stream=False, timeout=timeout))
                for _ in range(backlog)
            ]
            await asyncio.to_thread(
                wait_for,
                lambda: (router.queue(f"agent.{LOCAL}") or (0, 0))[0] >= 3,
                timeout=10,
                interval=0.2,
                message="no backlog in the agent queue",
            )
        broke = time.monotonic()
        await asyncio.to_thread(break_broker)
        extra += [
            asyncio.create_task(_later(1.0 + i, send(http, ledger, timeout=timeout, **shape)))
            for i, shape in zip(range(probes), itertools.cycle(PROBE_SHAPES), strict=False)
        ]
        await asyncio.sleep(outage)
        await asyncio.to_thread(restore_broker)
        back = time.monotonic()
        took = await wait_full_service(
            http, models=MODELS, since=back, within=RECOVERY, explain=router.explain
        )
        served = back + took
        await asyncio.sleep(3.0)
        await load.stop()
        await asyncio.gather(*extra)
    print(f"outage {back - broke:.1f}s, full service {took:.1f}s after; {ledger.summary()}")
    return ledger, broke, back, served


PROBE_SHAPES: list[dict[str, Any]] = [
    {"model": "dummy", "stream": False},
    {"model": LOCAL, "stream": True},
    {"model": LOCAL, "stream": False},
]


async def _later(delay: float, request: Coroutine[Any, Any, Entry]) -> Entry:
    await asyncio.sleep(delay)
    return await request


@pytest.mark.timeout(150)
async def test_graceful_broker_restart_under_load(
    make_router: RouterFactory, rabbit: RabbitNode
) -> None:
    router = await start_router(make_router, timeout=20)
    ledger, _, _, served = await run_outage(
        router, timeout=20, break_broker=rabbit.stop, restore_broker=rabbit.start
    )
    router.check(ledger, allowed_errors=(502, 503, 504), ok_after=served)


@pytest.mark.timeout(180)
async def test_broker_kill9_durable_keeps_confirmed_jobs(
    make_router: RouterFactory, rabbit: RabbitNode
) -> None:
    """Durable mode: a job the broker confirmed survives kill -9 and is answered after the
    broker returns, within its deadline. So a JSON request ends 200, or 503 when its job was
    never confirmed; never 504 (a confirmed job lost)."""
    router = await start_router(make_router, timeout=30)
    ledger, _, _, served = await run_outage(
        router,
        timeout=30,
        break_broker=rabbit.kill,
        restore_broker=rabbit.start,
        backlog=10,
        stream_every=0,  # stream chunks are never persistent: only JSON answers are promised
    )
    router.check(ledger, allowed_errors=(503,), ok_after=served)


@pytest.mark.timeout(150)
async def test_broker_kill9_transient_answers_503_promptly(
    make_router: RouterFactory, rabbit: RabbitNode
) -> None:
    """Transient mode: kill -9 loses every queued job and reply, so nobody can answer the
    requests in flight; they must end in a prompt 503 (never wait out their deadline), and the
    requests sent while the broker is away too."""
    timeout = 20.0
    router = await start_router(make_router, durability="transient", timeout=timeout)
    ledger, broke, _, served = await run_outage(
        router,
        timeout=timeout,
        break_broker=rabbit.kill,
        restore_broker=rabbit.start,
        backlog=10,
    )
    router.check(ledger, allowed_errors=(503,), ok_after=served)
    # A started stream can only end with an error event, after STREAM_IDLE_TIMEOUT (3 s).
    prompt = max(PUBLISH_TIMEOUT, STREAM_IDLE_TIMEOUT) + GRACE
    slow = [
        e
        for e in ledger.entries
        if e.outcome != "ok" and e.finished is not None and e.finished - max(e.sent, broke) > prompt
    ]
    assert not slow, (
        f"{len(slow)} failures came later than {prompt}s after the kill or their sending:\n"
        + "\n".join(e.describe() for e in slow[:20])
        + "\n--- logs ---\n"
        + router.explain([e.request_id for e in slow[:5] if e.request_id])
    )


@pytest.mark.timeout(150)
async def test_broker_paused_sigstop(make_router: RouterFactory, rabbit: RabbitNode) -> None:
    """A frozen broker (SIGSTOP, TCP connections open and silent) for 8 s: publishes are not
    confirmed, so new requests get a prompt 503; then SIGCONT and full service. The requests
    in flight when it froze wait, and are answered after the thaw within their deadline."""
    timeout, outage = 20.0, 8.0
    router = await start_router(make_router, timeout=timeout)
    ledger, broke, _, served = await run_outage(
        router,
        timeout=timeout,
        break_broker=rabbit.pause,
        restore_broker=rabbit.resume,
        outage=outage,
        probes=5,
    )
    router.check(ledger, allowed_errors=(503, 504), ok_after=served)
    # Sent early enough that each has its PUBLISH_TIMEOUT (and a margin) before the thaw: the
    # probes, 1-5 s into the freeze, and whatever the load sent then.
    during = ledger.between(broke + 0.5, broke + outage - PUBLISH_TIMEOUT - 0.5)
    assert len(during) >= 5, f"only {len(during)} requests were sent while the broker was frozen"
    wrong = [e.describe() for e in during if e.outcome != "error" or e.status != 503]
    assert not wrong, "requests sent to a frozen broker must get a 503:\n" + "\n".join(wrong[:20])
    slow = [e.describe() for e in during if (e.latency or 0) > PUBLISH_TIMEOUT + GRACE]
    assert not slow, "requests sent to a frozen broker must fail fast:\n" + "\n".join(slow[:20])


@pytest.mark.timeout(150)
async def test_forced_connection_close(make_router: RouterFactory, rabbit: RabbitNode) -> None:
    """`rabbitmqctl close_all_connections`: every service reconnects by itself."""
    router = await start_router(make_router, timeout=20)

    def close_all() -> None:
        rabbit.ctl("close_all_connections", "fault suite: forced close")

    ledger, _, _, served = await run_outage(
        router, timeout=20, break_broker=close_all, restore_broker=lambda: None
    )
    router.check(ledger, allowed_errors=(503, 504), ok_after=served)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("which", ["jobs", "reply", "agent"])
async def test_queue_deleted_under_its_consumer(
    make_router: RouterFactory, rabbit: RabbitNode, which: str
) -> None:
    """A queue deleted under load (an operator's mistake, a policy gone wrong): its consumer
    is cancelled by the broker, redeclares the queue and consumes again."""
    router = await start_router(make_router, timeout=10)
    queues = rabbit.queues()
    prefix = f"{router.prefix}."
    names = {
        "jobs": [f"{prefix}jobs"],
        "reply": [q for q in queues if q.startswith(f"{prefix}reply.")],
        "agent": [f"{prefix}agent.{LOCAL}"],
    }[which]
    assert len(names) == 1 and names[0] in queues, (names, sorted(queues))

    async def delete() -> None:
        connection = await aio_pika.connect(rabbit.url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(names[0])

    def delete_sync() -> None:
        asyncio.run(delete())

    def consumed_again() -> None:
        # The outage lasts until the consumer is back: answers published before that had no
        # queue and are lost.
        wait_for(
            lambda: (rabbit.queues().get(names[0]) or (0, 0))[1] >= 1,
            timeout=5,
            interval=0.05,
            message=f"{names[0]} was not declared and consumed again",
        )

    ledger, _, _, served = await run_outage(
        router, timeout=10, break_broker=delete_sync, restore_broker=consumed_again
    )
    # Answers lost with the deleted queue end in 504 at their deadline; a reply queue deleted
    # mid-stream loses chunks, which the API sees as a gap and answers 502; a request sent
    # while the API's reply consumer is gone is refused at once with 503.
    router.check(ledger, allowed_errors=(502, 503, 504), ok_after=served)


@pytest.mark.timeout(150)
async def test_memory_alarm_blocks_publishers_then_clears(
    make_router: RouterFactory, rabbit: RabbitNode
) -> None:
    """A broker memory alarm blocks every connection that publishes: new requests get a prompt
    503 (their publish is never confirmed), consumers keep acking on their own connections,
    and service is full again once the alarm clears."""
    timeout = 20.0
    router = await start_router(make_router, timeout=timeout)

    probes: list[tuple[int, float]] = []  # status and seconds of requests sent in the alarm

    def alarm() -> None:
        rabbit.ctl("set_vm_memory_high_watermark", "0.0000001")
        # The broker notices at its next memory check: probes start only once the alarm is on.
        deadline = time.monotonic() + 15
        while "memory" not in rabbit.ctl("eval", "rabbit_alarm:get_alarms().").stdout:
            assert time.monotonic() < deadline, "the memory alarm never went off"
            time.sleep(0.2)
        # New requests of their own: the load's workers may all be waiting on answers whose
        # publish the alarm holds back, and then none of them sends anything new.
        body = {"model": "dummy", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(3):
            started = time.monotonic()
            status = httpx.post(f"{router.api}/v1/chat/completions", json=body, timeout=30)
            probes.append((status.status_code, time.monotonic() - started))

    def clear() -> None:
        rabbit.ctl("set_vm_memory_high_watermark", "0.4")

    ledger, broke, back, served = await run_outage(
        router, timeout=timeout, break_broker=alarm, restore_broker=clear, outage=6
    )
    router.check(ledger, allowed_errors=(503, 504), ok_after=served)
    assert probes and all(status == 503 for status, _ in probes), probes
    assert all(took <= PUBLISH_TIMEOUT + GRACE for _, took in probes), probes
    during = [e for e in ledger.between(broke + 0.5, back) if e.outcome == "error"]
    slow = [e.describe() for e in during if (e.latency or 0) > PUBLISH_TIMEOUT + GRACE]
    assert not slow, "requests sent during an alarm must fail fast:\n" + "\n".join(slow[:20])


@pytest.mark.timeout(90)
async def test_a_recount_in_a_memory_alarm_leaves_the_consumers_acks_flowing(
    rabbit: RabbitNode,
) -> None:
    """A redelivered job's counted copy is published by the consumer. On its consuming
    connection, a memory alarm blocked that connection too, and every ack of the process
    stalled until the alarm cleared (review 2026-11-29): the copy goes on the publishing one."""
    topology = Topology(namespace=new_namespace())
    publisher = Broker(rabbit.url, name="pub", publish_timeout=2.0)
    consumer = Broker(rabbit.url, name="con", publish_timeout=2.0, requeue_via=topology)
    await publisher.connect()
    await consumer.connect()
    try:
        await declare_topology(await consumer.channel(prefetch=10), topology)
        failing, slow = topology.jobs_queue_spec(), topology.provider_queue_spec("x")
        for spec in (failing, slow):
            await consumer.declare(await consumer.channel(prefetch=10), spec)
            job = Envelope(type="job", body=b"{}", headers={}, message_id=spec.name)
            await publisher.publish(job, spec.name, persistent=True)
        finish = asyncio.Event()

        async def finishes_later(env: Envelope, delivery: Delivery) -> None:
            await finish.wait()  # then acked, during the alarm

        async def fails_once(env: Envelope, delivery: Delivery) -> None:
            if not delivery.redelivered:
                raise RuntimeError("a hand-off whose publish timed out")

        channel = await consumer.channel(prefetch=10)
        await consumer.consume(channel, slow, finishes_later, redelivery_limit=5)
        rabbit.ctl("set_vm_memory_high_watermark", "0.0000001")
        wait_for(
            lambda: "memory" in rabbit.ctl("eval", "rabbit_alarm:get_alarms().").stdout,
            timeout=15,
            message="the memory alarm never went off",
        )
        channel = await consumer.channel(prefetch=10)
        await consumer.consume(channel, failing, fails_once, redelivery_limit=5)
        await asyncio.sleep(1.0)  # failed, redelivered, recounted
        finish.set()
        await asyncio.to_thread(
            wait_for,
            lambda: rabbit.queues()[slow.name][0] == 0,  # ready + unacked
            timeout=10,
            message="the ack sent during the alarm was not processed",
        )
    finally:
        rabbit.ctl("set_vm_memory_high_watermark", "0.4")
        await consumer.close()
        await publisher.close()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("durability", ["durable", "quorum"])
async def test_jobs_caught_in_a_memory_alarm_run_once_and_none_is_parked(
    make_router: RouterFactory, rabbit: RabbitNode, durability: str
) -> None:
    """A hand-off the alarm holds back is routed once the alarm clears. A dispatcher that gave
    up on its confirm after PUBLISH_TIMEOUT requeued the job, so it ran twice, and in quorum
    mode a second timeout parked an answered job in `dead` (review 2026-11-29)."""
    timeout = 20.0
    router = await start_router(make_router, durability=durability, timeout=timeout)
    fake = router.fakes[0]

    def alarm() -> None:
        fake.reset()
        rabbit.ctl("set_vm_memory_high_watermark", "0.0000001")
        deadline = time.monotonic() + 15
        while "memory" not in rabbit.ctl("eval", "rabbit_alarm:get_alarms().").stdout:
            assert time.monotonic() < deadline, "the memory alarm never went off"
            time.sleep(0.2)

    def clear() -> None:
        rabbit.ctl("set_vm_memory_high_watermark", "0.4")

    ledger, _, _, served = await run_outage(
        router, timeout=timeout, break_broker=alarm, restore_broker=clear, outage=6
    )
    router.check(ledger, allowed_errors=(503, 504), ok_after=served)
    failures = [line for line in router.logs("").splitlines() if "handler failed" in line]
    texts = [body["messages"][0]["content"] for body in fake.stats()["bodies"]]
    twice = sorted({text for text in texts if texts.count(text) > 1})
    assert not twice, f"{len(twice)} requests ran twice: {twice[:5]}\n" + "\n".join(failures)
    assert router.queue("dead") == (0, 0), "\n".join(failures)
