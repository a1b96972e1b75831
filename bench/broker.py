"""Removing what a run declared on the broker: its namespaces' queues and exchanges.

The bench removes its namespace when it ends; the test suite removes the namespaces its
processes used (`tests/conftest.py`), so the machine's shared broker does not collect idle
durable queues run after run.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterable

import aio_pika


def list_names(kind: str) -> list[str]:
    """The names of every `kind` (queues, exchanges) of the default vhost, by rabbitmqctl."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", f"list_{kind}", "name"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


async def delete_namespaces(url: str, namespaces: Iterable[str]) -> int:
    """Delete every queue and exchange named `<namespace>.*` of the default vhost, for each
    namespace; returns how many went.

    Needs `rabbitmqctl` to list names (skipped without it: the queues then stay, as those of a
    stopped `make dev` would). Lists once, whatever the number of namespaces: each listing
    starts an Erlang VM (about a second).
    """
    prefixes = tuple(f"{namespace}." for namespace in namespaces)
    if not prefixes or shutil.which("rabbitmqctl") is None:
        return 0
    queues = [n for n in list_names("queues") if n.startswith(prefixes)]
    exchanges = [n for n in list_names("exchanges") if n.startswith(prefixes)]
    if not queues and not exchanges:
        return 0  # nothing to do, or no broker to list them: no connection either
    deleted = 0
    connection = await aio_pika.connect(url)
    async with connection:
        for name in queues:
            channel = await connection.channel()  # a failed delete closes its channel
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
                deleted += 1
        for name in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(name)
                deleted += 1
    return deleted


async def delete_namespace(url: str, namespace: str) -> int:
    """`delete_namespaces` for one namespace."""
    return await delete_namespaces(url, [namespace])
