"""`CompletedBatcher`: job.completed events held for a moment and published together."""

from __future__ import annotations

import asyncio

from shared.completed import CompletedBatcher
from shared.errors import BrokerUnavailableError
from shared.messages import Completed, Envelope, decode_completed


class Sent:
    """The batcher's `publish`: records each message's events; `fail` makes it raise."""

    def __init__(self) -> None:
        self.messages: list[list[Completed]] = []
        self.fail = False

    async def __call__(self, env: Envelope) -> None:
        if self.fail:
            raise BrokerUnavailableError()
        self.messages.append(decode_completed(env))


def event(n: int, size: int = 2) -> Completed:
    return Completed(f"k{n}", b"x" * size)


async def test_events_within_the_delay_leave_together_in_order() -> None:
    sent = Sent()
    batcher = CompletedBatcher(sent, delay=0.02)
    for n in range(3):
        batcher.add(event(n))
        await asyncio.sleep(0.001)
    assert sent.messages == [] and batcher.held == 3
    await asyncio.sleep(0.05)
    assert sent.messages == [[event(0), event(1), event(2)]]
    batcher.add(event(3))  # a new batch, on a new timer
    await asyncio.sleep(0.05)
    assert sent.messages[1:] == [[event(3)]]


async def test_a_batch_past_its_byte_or_event_limit_leaves_at_once() -> None:
    sent = Sent()
    by_bytes = CompletedBatcher(sent, delay=60.0, max_bytes=100)
    by_bytes.add(event(0, 60))
    by_bytes.add(event(1, 60))
    by_events = CompletedBatcher(sent, delay=60.0, max_events=2)
    by_events.add(event(2))
    by_events.add(event(3))
    await asyncio.sleep(0)
    assert sent.messages == [[event(0, 60), event(1, 60)], [event(2), event(3)]]
    assert by_bytes.held == by_events.held == 0


async def test_flush_sends_what_is_held_and_waits_for_it() -> None:
    sent = Sent()
    batcher = CompletedBatcher(sent, delay=60.0)
    await batcher.flush()  # nothing held: nothing sent
    batcher.add(event(0))
    await batcher.flush()
    assert sent.messages == [[event(0)]] and batcher.held == 0


async def test_a_failed_publish_loses_only_its_own_events() -> None:
    sent = Sent()
    batcher = CompletedBatcher(sent, delay=60.0)
    sent.fail = True
    batcher.add(event(0))
    await batcher.flush()  # logged, not raised
    sent.fail = False
    batcher.add(event(1))
    await batcher.flush()
    assert sent.messages == [[event(1)]]
