"""The dispatcher's on-demand queue declares: once per queue, and never longer than a publish."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.dispatcher.service import QueueDeclarer
from shared.errors import BrokerUnavailableError
from shared.topology import QueueSpec

SPEC = QueueSpec(name="ns.v1.durable.agent.local_a", durable=True)


class Channel:
    """Records declares; with `stalled`, the broker never answers one."""

    def __init__(self, *, stalled: bool = False) -> None:
        self.stalled = stalled
        self.declared: list[str] = []

    async def declare_queue(self, name: str, **_: Any) -> None:
        self.declared.append(name)
        if self.stalled:
            await asyncio.Event().wait()


async def test_a_queue_is_declared_once() -> None:
    channel = Channel()
    declarer = QueueDeclarer(channel, timeout=1)  # type: ignore[arg-type]
    await declarer(SPEC)
    await declarer(SPEC)
    assert channel.declared == [SPEC.name]


async def test_a_declare_the_broker_never_answers_fails_within_the_timeout() -> None:
    channel = Channel(stalled=True)
    declarer = QueueDeclarer(channel, timeout=0.05)  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        with pytest.raises(BrokerUnavailableError):
            await declarer(SPEC)
    channel.stalled = False
    await declarer(SPEC)  # not remembered as declared: the next job tries again
    assert channel.declared == [SPEC.name, SPEC.name]


async def test_under_least_privilege_nothing_is_declared() -> None:
    channel = Channel()
    await QueueDeclarer(channel, enabled=False)(SPEC)  # type: ignore[arg-type]
    assert channel.declared == []
