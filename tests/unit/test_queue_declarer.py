"""The dispatcher's on-demand queue declares: once per queue, and never longer than a publish."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aio_pika.exceptions import ChannelPreconditionFailed

from services.dispatcher.service import QueueDeclarer
from shared.errors import BrokerUnavailableError
from shared.topology import QueueArgumentsError, QueueSpec

SPEC = QueueSpec(name="ns.v1.durable.agent.local_a", durable=True)


class Channel:
    """Records declares; with `stalled`, the broker never answers one; with `mismatched`, it
    refuses it as RabbitMQ refuses a queue declared with other arguments."""

    def __init__(self, *, stalled: bool = False, mismatched: bool = False) -> None:
        self.stalled = stalled
        self.mismatched = mismatched
        self.declared: list[str] = []

    async def declare_queue(self, name: str, **_: Any) -> None:
        self.declared.append(name)
        await asyncio.sleep(0.01)  # the broker's round trip
        if self.stalled:
            await asyncio.Event().wait()
        if self.mismatched:
            raise ChannelPreconditionFailed(
                f"PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{name}' "
                "in vhost '/': received '10000' but current is '30000'"
            )


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


async def test_a_queue_with_other_arguments_is_logged_once_and_refused_from_then_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each refusal closes the declaring channel: the broker is asked once, not per job."""
    channel = Channel(mismatched=True)
    declarer = QueueDeclarer(channel, timeout=1)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(QueueArgumentsError, match="AGENT_QUEUE_TTL"):
            await declarer(SPEC)
    assert channel.declared == [SPEC.name]
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "received '10000' but current is '30000'" in record.getMessage()


async def test_callers_asking_together_share_one_declare_and_its_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A heartbeat and a job for the same new queue at once: one declare, one error logged."""
    channel = Channel(mismatched=True)
    declarer = QueueDeclarer(channel, timeout=1)  # type: ignore[arg-type]
    results = await asyncio.gather(declarer(SPEC), declarer(SPEC), return_exceptions=True)
    assert all(isinstance(r, QueueArgumentsError) for r in results)
    assert channel.declared == [SPEC.name]
    assert caplog.text.count("exists with other arguments") == 1
