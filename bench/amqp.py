"""`python -m bench.amqp`: the AMQP client's own cost per message, in one process.

A `shared.amqp.Broker` publishes job-sized envelopes (persistent, confirmed, 32 in flight) to a
queue of its own and consumes them back, acking each: the client work every hop of the router
does. The process's CPU (utime+stime) per message is the client's cost alone: RabbitMQ's is
not counted. Each round measures with aiormq's frames written one by one and coalesced
(`shared/amqp_writes.py`), in turns; the median of the rounds is printed. `AMQP_MESSAGES`
(default 3000) and `AMQP_ROUNDS` (default 5) set the size; `RABBITMQ_URL` the broker.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid

import uvloop
from aiormq import connection as aiormq_connection

from shared import amqp_writes
from shared.amqp import Broker, Delivery
from shared.messages import Envelope
from shared.settings import BrokerSettings
from shared.topology import QueueSpec

ENVELOPE = Envelope(
    type="job",
    body=b"x" * 600,
    headers={"x-router-v": 2, "x-model": "m", "x-stream": False, "x-deadline": 1_764_190_000_123},
    correlation_id=uuid.uuid4().hex,
    reply_to="bench.reply",
)


async def handle(_: Envelope, __: Delivery) -> None:
    return None


async def cpu_us_per_message(url: str, messages: int, *, coalesce: bool) -> float:
    aiormq_connection.FrameGenerator = (  # type: ignore[misc]
        amqp_writes.CoalescingFrameGenerator if coalesce else amqp_writes.OneByOneFrameGenerator
    )
    broker = Broker(url, name="bench-amqp", publish_timeout=10)
    await broker.connect()
    queue = f"bench-amqp.{uuid.uuid4().hex[:8]}"
    in_flight = asyncio.Semaphore(32)

    async def publish() -> None:
        async with in_flight:
            await broker.publish(ENVELOPE, queue, persistent=True)

    try:
        channel = await broker.channel(prefetch=256)
        await broker.consume(
            channel, QueueSpec(name=queue, durable=False, auto_delete=True), handle
        )
        await asyncio.gather(*(publish() for _ in range(messages // 10)))  # warm up
        started = time.process_time()
        await asyncio.gather(*(publish() for _ in range(messages)))
        return (time.process_time() - started) / messages * 1e6
    finally:
        await broker.stop_consuming()
        await broker.close()


async def main() -> None:
    url = BrokerSettings().rabbitmq_url  # the services' own setting and default
    messages = int(os.environ.get("AMQP_MESSAGES", "3000"))
    rounds = int(os.environ.get("AMQP_ROUNDS", "5"))
    results: dict[str, list[float]] = {"one write per frame": [], "coalesced writes": []}
    for _ in range(rounds):
        for label, coalesce in (("one write per frame", False), ("coalesced writes", True)):
            results[label].append(await cpu_us_per_message(url, messages, coalesce=coalesce))
    print(
        f"publish + consume + ack, {messages} messages x {rounds} rounds, client CPU per message:"
    )
    for label, values in results.items():
        print(f"  {label:20} {statistics.median(values):7.1f} us  (rounds: "
              + ", ".join(f"{v:.0f}" for v in values) + ")")  # fmt: skip


if __name__ == "__main__":
    uvloop.run(main())
