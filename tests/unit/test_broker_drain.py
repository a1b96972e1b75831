"""A stopping service's drain: jobs that finish in time do, the rest are cut off, and the log
says how many of each (an operator reading it after a stop must not have to guess)."""

from __future__ import annotations

import asyncio

import pytest

from shared.amqp import Broker


async def test_a_drain_waits_for_quick_jobs_and_cuts_off_and_counts_slow_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = Broker("amqp://guest:guest@127.0.0.1:1/", name="drain-test", publish_timeout=1)
    quick = asyncio.create_task(asyncio.sleep(0.01))
    slow = asyncio.create_task(asyncio.sleep(60))
    broker._inflight |= {quick, slow}  # as the consumer adds its handlers' tasks
    caplog.set_level("INFO")
    async with asyncio.timeout(5):
        await broker.drain(0.2)
    assert quick.done() and not quick.cancelled()
    assert slow.cancelled()
    assert "draining 2 job(s) in flight (up to 0.2s)" in caplog.text
    assert "1 of 2 job(s) still running after DRAIN_TIMEOUT (0.2s): cut off" in caplog.text
