"""`Broker.publish` on a connection its heartbeats found dead: aiormq fails the waiting
confirm with CancelledError, which is a lost connection (BrokerUnavailableError, so a stream
sends its message again and a job goes back to its queue), unless the publishing task itself
is being cancelled (a client's cancel must still stop it)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared import amqp
from shared.amqp import Broker
from shared.errors import BrokerUnavailableError
from shared.messages import Envelope

ENV = Envelope(type="x", body=b"", headers={})


def broker_whose_confirm(outcome: Any, monkeypatch: pytest.MonkeyPatch) -> Broker:
    broker = Broker("amqp://guest:guest@127.0.0.1:1/", name="publish-test", publish_timeout=1)
    broker._publish_channel = object()  # type: ignore[assignment]  # never used: see below

    async def publish(*_: Any, **__: Any) -> None:
        await outcome()

    monkeypatch.setattr(amqp, "_publish", publish)
    return broker


async def test_a_confirm_failed_by_a_dead_connection_is_a_lost_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def cancelled_by_aiormq() -> None:
        raise asyncio.CancelledError  # what a pending confirm gets when heartbeats give up

    broker = broker_whose_confirm(cancelled_by_aiormq, monkeypatch)
    with pytest.raises(BrokerUnavailableError):
        await broker.publish(ENV, "q")


async def test_a_publish_whose_task_is_cancelled_is_still_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = asyncio.Event()

    async def waiting_for_the_confirm() -> None:
        started.set()
        await asyncio.sleep(60)

    broker = broker_whose_confirm(waiting_for_the_confirm, monkeypatch)
    task = asyncio.create_task(broker.publish(ENV, "q"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
