"""Bounded queues and bad messages: a full jobs or agent queue refuses at once, and poison
or crash-looping messages end in the dead queue instead of looping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import httpx
import pytest

from shared.messages import Job, encode_job
from tests.faults.harness.load import GRACE, Ledger, send
from tests.faults.harness.nodes import RabbitNode
from tests.faults.harness.router import LOCAL, FaultRouter
from tests.support.amqp import to_message
from tests.support.procs import wait_for

RouterFactory = Callable[..., FaultRouter]
PUBLISH_TIMEOUT = 2.0


def limit_queue(rabbit: RabbitNode, name: str, max_length: int) -> None:
    """Bound one queue with a policy (RabbitMQ applies the lower of policy and argument).

    The router exposes no setting for its queue bounds (`Topology.jobs_max_length` and
    `agent_queue_max_length` are fixed at 10000 and 1000), so the test lowers them this way.
    """
    pattern = "^" + name.replace(".", r"\.") + "$"
    rabbit.ctl(
        "set_policy",
        "--apply-to",
        "queues",
        f"limit-{name}",
        pattern,
        f'{{"max-length": {max_length}}}',
    )


async def publish_raw(rabbit: RabbitNode, queue: str, messages: list[aio_pika.Message]) -> None:
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        channel = await connection.channel()
        for message in messages:
            await channel.default_exchange.publish(message, routing_key=queue)


async def dead_letters(rabbit: RabbitNode, queue: str) -> list[dict[str, Any]]:
    """The x-death records of every message in `queue` (taken off it)."""
    records = []
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            deaths = (message.headers or {}).get("x-death") or [{}]
            records.append(dict(deaths[0]))  # type: ignore[arg-type]
    return records


def job_message(body: bytes, reply_to: str, *, persistent: bool = True) -> aio_pika.Message:
    job = Job(
        request_id=f"poison{int(time.time() * 1000)}",
        model="dummy",
        reply_to=reply_to,
        deadline=time.time() + 60,
        body=body,
    )
    return to_message(encode_job(job, now=time.time()), persistent=persistent)


# --- bounded queues ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_full_jobs_queue_answers_503_at_once(
    make_router: RouterFactory, rabbit: RabbitNode
) -> None:
    """No dispatcher, a jobs queue bounded to 3: the first 3 jobs wait (and are answered once a
    dispatcher comes), every other request is refused at once with 503 and Retry-After."""
    router = make_router(REQUEST_TIMEOUT="25")
    await asyncio.to_thread(router.add_api)
    limit_queue(rabbit, f"{router.prefix}.jobs", 3)
    await asyncio.sleep(1.0)  # policies apply asynchronously

    ledger = Ledger()
    async with httpx.AsyncClient(base_url=router.api, timeout=None) as http:
        tasks = [
            asyncio.create_task(send(http, ledger, model="dummy", stream=i % 2 == 1, timeout=25))
            for i in range(8)
        ]
        await asyncio.to_thread(
            wait_for,
            lambda: sum(e.finished is not None for e in ledger.entries) >= 5,
            timeout=15,
            message="no refusal",
        )
        await asyncio.to_thread(router.add_dispatcher)
        await asyncio.gather(*tasks)
    router.check(ledger, allowed_errors=(503,))
    refused = [e for e in ledger.entries if e.outcome == "error"]
    assert len(refused) == 5, ledger.summary()
    assert all(e.error_code == "queue_full" and e.retry_after == "1" for e in refused)
    assert all((e.latency or 0) <= PUBLISH_TIMEOUT + GRACE for e in refused), ledger.summary()
    assert sum(e.outcome == "ok" for e in ledger.entries) == 3


@pytest.mark.timeout(120)
async def test_full_agent_queue_answers_429_at_once(
    make_router: RouterFactory, rabbit: RabbitNode
) -> None:
    """One busy agent (one job at a time, 4 s each) and its queue bounded to 1: requests past
    what it holds and queues are refused at once with 429 `queue_full`."""
    router = make_router(REQUEST_TIMEOUT="25", TTFT_TIMEOUT="25")
    await asyncio.to_thread(router.add_dispatcher)
    await asyncio.to_thread(router.add_api)
    fake = await asyncio.to_thread(router.fake, "--latency", "4")
    await asyncio.to_thread(router.agent, "a1", fake.url, AGENT_CONCURRENCY="1")
    await asyncio.to_thread(router.wait_listed)
    limit_queue(rabbit, f"{router.prefix}.agent.{LOCAL}", 1)
    await asyncio.sleep(1.0)

    ledger = Ledger()
    async with httpx.AsyncClient(base_url=router.api, timeout=None) as http:
        await asyncio.gather(
            *(send(http, ledger, model=LOCAL, stream=False, timeout=25) for _ in range(6))
        )
    router.check(ledger, allowed_errors=(429,))
    refused = [e for e in ledger.entries if e.outcome == "error"]
    assert refused and all(e.error_code == "queue_full" for e in refused), ledger.summary()
    assert all((e.latency or 0) <= PUBLISH_TIMEOUT + GRACE for e in refused), ledger.summary()
    assert 1 <= sum(e.outcome == "ok" for e in ledger.entries) <= 3, ledger.summary()


# --- poison and crash loops ----------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_poison_messages_go_to_the_dead_queue_once(
    make_router: RouterFactory, rabbit: RabbitNode
) -> None:
    """Garbage on the jobs queue (no type, a wrong wire version, a job without reply_to, bytes
    that are not even a job) is rejected once into the dead queue; the dispatcher keeps going."""
    router = make_router(REQUEST_TIMEOUT="10")
    await asyncio.to_thread(router.add_dispatcher)
    await asyncio.to_thread(router.add_api)
    jobs, dead = f"{router.prefix}.jobs", f"{router.prefix}.dead"
    wrong_version = job_message(b"{}", "nowhere")
    wrong_version.headers["x-router-v"] = 99
    no_reply_to = job_message(b"{}", "nowhere")
    no_reply_to.reply_to = None
    garbage = [
        aio_pika.Message(b"\x00\xffnot a job at all"),
        aio_pika.Message(b"{}", type="job"),
        wrong_version,
        no_reply_to,
    ]
    await publish_raw(rabbit, jobs, garbage)
    await asyncio.to_thread(
        wait_for,
        lambda: router.queue("dead") == (len(garbage), 0) and router.queue("jobs") == (0, 1),
        timeout=20,
        message="poison not dead-lettered",
    )
    deaths = await dead_letters(rabbit, dead)
    assert [d.get("reason") for d in deaths] == ["rejected"] * len(garbage), deaths
    assert all(d.get("count") == 1 for d in deaths), deaths
    assert router.chat().status_code == 200


@pytest.mark.timeout(120)
async def test_failing_handler_is_retried_once_then_dead_lettered(
    make_router: RouterFactory, rabbit: RabbitNode
) -> None:
    """A job whose handling raises (the process lives) is requeued once, then rejected into the
    dead queue: two deliveries, never a loop."""
    router = make_router(REQUEST_TIMEOUT="10")
    dispatcher = await asyncio.to_thread(
        router.add_crashing_dispatcher, FAULTS_RAISE_ON_BODY="RAISE-ME"
    )
    await asyncio.to_thread(router.add_api)
    await publish_raw(rabbit, f"{router.prefix}.jobs", [job_message(b'"RAISE-ME"', "nowhere")])
    await asyncio.to_thread(
        wait_for,
        lambda: router.queue("dead") == (1, 0),
        timeout=20,
        message="failing job not dead-lettered",
    )
    await asyncio.sleep(1.0)
    assert dispatcher.log().count("handler failed on job") == 2, dispatcher.log()[-3000:]
    assert router.queue("jobs") == (0, 1)
    assert router.chat().status_code == 200


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "durability",
    ["durable", "quorum"],
)
async def test_crash_loop_message_ends_in_the_dead_queue(
    make_router: RouterFactory, rabbit: RabbitNode, durability: str
) -> None:
    """A job that kills the dispatcher every time it is handled (a supervisor restarts it):
    after a bounded number of deliveries it must be parked in the dead queue, and the
    dispatcher must stay up."""
    router = make_router(durability=durability, REQUEST_TIMEOUT="10")
    await asyncio.to_thread(router.add_api)
    await publish_raw(rabbit, f"{router.prefix}.jobs", [job_message(b'"KILL-ME"', "nowhere")])
    starts = 0
    while starts < 8:
        starts += 1
        dispatcher = await asyncio.to_thread(
            router.add_crashing_dispatcher, FAULTS_EXIT_ON_BODY="KILL-ME"
        )
        try:
            await asyncio.to_thread(dispatcher.process.wait, 10)  # type: ignore[union-attr]
        except Exception:  # still alive after 10 s: it no longer meets the job
            break
    assert router.queue("dead") == (1, 0), f"not dead-lettered after {starts} dispatcher starts"
    assert dispatcher.is_running(), f"the dispatcher still dies after {starts} starts"
    assert router.chat().status_code == 200
