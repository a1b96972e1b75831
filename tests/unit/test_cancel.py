"""Cancellations: a cancel stops the work, never its caller; ids expire."""

from __future__ import annotations

import asyncio

from shared.cancel import Cancellations


async def test_cancel_stops_running_work_only() -> None:
    cancellations = Cancellations()
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.sleep(10)

    runner = asyncio.create_task(cancellations.run("r1", work()))
    await started.wait()
    assert cancellations.cancel("r1", now=0)
    assert await asyncio.wait_for(runner, 1) is False


async def test_work_for_a_cancelled_id_never_starts() -> None:
    cancellations = Cancellations()
    cancellations.cancel("r1", now=0)
    ran = False

    async def work() -> None:
        nonlocal ran
        ran = True

    assert await cancellations.run("r1", work()) is False
    assert not ran


async def test_finished_work_returns_true() -> None:
    async def work() -> None:
        return None

    assert await Cancellations().run("r1", work()) is True


def test_ids_expire_by_age_and_count() -> None:
    cancellations = Cancellations(ttl=10, max_size=2)
    cancellations.cancel("a", now=0)
    cancellations.cancel("b", now=5)
    cancellations.cancel("c", now=6)
    assert not cancellations.is_cancelled("a")
    cancellations.cancel("d", now=16)
    assert not cancellations.is_cancelled("b")
    assert cancellations.is_cancelled("c") and cancellations.is_cancelled("d")
