"""`python -m tests.faults.harness.durability_bench`: what each durability mode costs.

Starts a private RabbitMQ node (as the fault suite does), then for `transient`, `durable` and
`quorum` queues publishes 512-byte messages with publisher confirms: one at a time (the p50 of
a confirmed publish) and with 64 in flight (throughput). Two rounds, medians printed. Not part of
the test run; docs/reliability.md quotes its output.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aio_pika

from tests.faults.harness.nodes import RabbitNode

SEQUENTIAL = 1500
PARALLEL = 6000
WINDOW = 64
BODY = b"x" * 512


async def measure(url: str, mode: str) -> tuple[float, float]:
    """(p50 ms of one confirmed publish, messages/s with WINDOW in flight)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        arguments = {"x-queue-type": "quorum"} if mode == "quorum" else {}
        queue = await channel.declare_queue(
            f"bench.{mode}", durable=mode != "transient", arguments=arguments
        )
        delivery = (
            aio_pika.DeliveryMode.NOT_PERSISTENT
            if mode == "transient"
            else aio_pika.DeliveryMode.PERSISTENT
        )

        async def publish() -> None:
            message = aio_pika.Message(BODY, delivery_mode=delivery)
            await channel.default_exchange.publish(message, queue.name)

        latencies = []
        for _ in range(SEQUENTIAL):
            started = time.perf_counter()
            await publish()
            latencies.append(time.perf_counter() - started)
        window = asyncio.Semaphore(WINDOW)

        async def bounded() -> None:
            async with window:
                await publish()

        started = time.perf_counter()
        await asyncio.gather(*(bounded() for _ in range(PARALLEL)))
        rate = PARALLEL / (time.perf_counter() - started)
        await queue.delete(if_unused=False, if_empty=False)
        return statistics.median(latencies) * 1000, rate


async def compare(url: str) -> None:
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(2):
        for mode in ("transient", "durable", "quorum"):
            results.setdefault(mode, []).append(await measure(url, mode))
    for mode, runs in results.items():
        p50 = statistics.median(r[0] for r in runs)
        rate = statistics.median(r[1] for r in runs)
        print(f"{mode:10s} p50 {p50:.2f} ms  {rate:.0f} msg/s")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        node = RabbitNode(Path(tmp))
        node.start()
        try:
            asyncio.run(compare(node.url))
        finally:
            node.kill()


if __name__ == "__main__":
    main()
