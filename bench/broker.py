"""Removing what a bench run declared on the broker (its namespace's queues and exchanges)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess

import aio_pika


def _names(kind: str) -> list[str]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", f"list_{kind}", "name"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


async def delete_namespace(url: str, namespace: str) -> int:
    """Delete every queue and exchange named `<namespace>.*`; returns how many went.

    Needs `rabbitmqctl` to list names (skipped without it: the queues then stay, as those of a
    stopped `make dev` would).
    """
    if shutil.which("rabbitmqctl") is None:
        return 0
    prefix = f"{namespace}."
    queues = [n for n in _names("queues") if n.startswith(prefix)]
    exchanges = [n for n in _names("exchanges") if n.startswith(prefix)]
    deleted = 0
    connection = await aio_pika.connect(url)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
                deleted += 1
        for name in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(name)
                deleted += 1
    return deleted
