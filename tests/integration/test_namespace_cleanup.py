"""`bench.broker.delete_namespaces` on the real RabbitMQ: what the bench and the test suite use
to leave no queues and exchanges of theirs behind on the machine's shared broker."""

from __future__ import annotations

import shutil

import aio_pika

from bench.broker import delete_namespaces, list_names
from tests.conftest import require_services, skip_or_fail
from tests.support.procs import new_namespace

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def test_only_the_named_namespaces_queues_and_exchanges_go() -> None:
    require_services()
    if shutil.which("rabbitmqctl") is None:
        skip_or_fail("rabbitmqctl not installed: cannot list the broker's names")
    gone = [new_namespace(), new_namespace()]
    kept = new_namespace()
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for namespace in [*gone, kept]:
            await channel.declare_queue(f"{namespace}.jobs", durable=True)
            await channel.declare_exchange(f"{namespace}.replies", durable=True)
        # A name that merely starts like a namespace, without its dot, is someone else's.
        await channel.declare_queue(f"{gone[0]}x.jobs", durable=True)
        try:
            assert await delete_namespaces(URL, gone) == 4
            queues, exchanges = set(list_names("queues")), set(list_names("exchanges"))
            assert not {f"{n}.jobs" for n in gone} & queues
            assert not {f"{n}.replies" for n in gone} & exchanges
            assert {f"{kept}.jobs", f"{gone[0]}x.jobs"} <= queues
            assert f"{kept}.replies" in exchanges
        finally:
            for name in (f"{kept}.jobs", f"{gone[0]}x.jobs"):
                await channel.queue_delete(name)
            await channel.exchange_delete(f"{kept}.replies")


async def test_no_namespace_or_no_broker_is_nothing_to_do() -> None:
    assert await delete_namespaces(URL, []) == 0
    # Nothing of this name exists: no connection is opened, so a broker that is away is fine.
    assert await delete_namespaces("amqp://guest:guest@127.0.0.1:1/", [new_namespace()]) == 0
