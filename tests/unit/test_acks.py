"""Held consumer acks: sent late, together, in order; flushed on demand (shared.acks)."""

from __future__ import annotations

import asyncio

from shared.acks import AckBatcher


class FakeChannel:
    def __init__(self, *, fail: bool = False) -> None:
        self.is_closed = False
        self.fail = fail
        self.sent: list[tuple[int, bool, bool]] = []  # tag, multiple, wait
        self.sent_at: list[float] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        if self.fail:
            raise RuntimeError("channel is gone")
        self.sent.append((delivery_tag, multiple, wait))
        self.sent_at.append(asyncio.get_running_loop().time())


async def test_acks_are_held_for_the_delay_then_sent_together_in_order() -> None:
    channel = FakeChannel()
    acks = AckBatcher(delay=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for tag in (3, 1, 2):
        acks.ack(channel, tag)
    await asyncio.sleep(0.02)
    assert channel.sent == [] and acks.held == 3
    await asyncio.sleep(0.06)
    # One by one, as acked; only the last waits for the write, so they share it.
    assert channel.sent == [(3, False, False), (1, False, False), (2, False, True)]
    assert min(channel.sent_at) - started >= 0.045
    assert acks.held == 0


async def test_an_ack_after_a_batch_left_starts_a_new_one() -> None:
    channel = FakeChannel()
    acks = AckBatcher(delay=0.01)
    acks.ack(channel, 1)
    await asyncio.sleep(0.03)
    acks.ack(channel, 2)
    assert [tag for tag, _, _ in channel.sent] == [1]
    await asyncio.sleep(0.03)
    assert [tag for tag, _, _ in channel.sent] == [1, 2]


async def test_each_channel_gets_its_own_acks() -> None:
    a, b = FakeChannel(), FakeChannel()
    acks = AckBatcher(delay=0.01)
    acks.ack(a, 1)
    acks.ack(b, 1)
    acks.ack(a, 2)
    await acks.flush()
    assert [tag for tag, _, _ in a.sent] == [1, 2]
    assert [tag for tag, _, _ in b.sent] == [1]


async def test_flush_sends_at_once_and_waits_for_the_writes() -> None:
    channel = FakeChannel()
    acks = AckBatcher(delay=60.0)
    acks.ack(channel, 7)
    await asyncio.wait_for(acks.flush(), 1.0)
    assert channel.sent == [(7, False, True)]
    await acks.flush()  # nothing held: nothing sent again
    assert channel.sent == [(7, False, True)]


async def test_a_closed_channels_acks_are_dropped_and_a_failing_one_does_not_raise() -> None:
    closed, failing, fine = FakeChannel(), FakeChannel(fail=True), FakeChannel()
    acks = AckBatcher(delay=0.01)
    for channel in (closed, failing, fine):
        acks.ack(channel, 1)
    closed.is_closed = True
    await acks.flush()
    assert closed.sent == [] and failing.sent == []
    assert fine.sent == [(1, False, True)]
    assert acks.held == 0
