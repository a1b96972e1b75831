"""Coalesced AMQP writes: order, draining and closing frames (shared.amqp_writes)."""

from __future__ import annotations

import asyncio
import inspect

from aiormq import connection as aiormq_connection
from aiormq.abc import ChannelFrame

from shared import amqp, amqp_writes  # noqa: F401  (importing shared.amqp installs it)
from shared.amqp_writes import CoalescingFrameGenerator


def frame(payload: bytes, *, drain: bool = False, close: bool = False) -> ChannelFrame:
    future = asyncio.get_running_loop().create_future() if drain else None
    return ChannelFrame(payload=payload, should_close=close, drain_future=future)


async def frames_of(generator: CoalescingFrameGenerator, n: int) -> list[ChannelFrame]:
    return [await generator.__anext__() for _ in range(n)]


def test_installed_in_aiormq() -> None:
    assert aiormq_connection.FrameGenerator is CoalescingFrameGenerator
    amqp_writes.install()  # idempotent
    assert aiormq_connection.FrameGenerator is CoalescingFrameGenerator
    assert hasattr(amqp_writes.OneByOneFrameGenerator, "__anext__")  # what it replaces is there
    assert aiormq_connection.Connection.FRAME_BUFFER_SIZE == amqp_writes.MAX_BATCH
    opened = aiormq_connection.Connection.channel
    amqp_writes.install()
    assert aiormq_connection.Connection.channel is opened  # wrapped once, not again
    # The wrapper relies on where aiormq puts the size (after self: the third parameter).
    names = list(inspect.signature(opened.__wrapped__).parameters)  # type: ignore[attr-defined]
    assert names[1:4] == ["channel_number", "publisher_confirms", "frame_buffer_size"]


async def test_queued_frames_leave_as_one_write_in_order() -> None:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    for payload in (b"ack1", b"publish", b"ack2"):
        queue.put_nowait(frame(payload))
    [batch] = await frames_of(CoalescingFrameGenerator(queue), 1)
    assert batch.payload == b"ack1publishack2"
    assert not batch.should_close
    assert queue.empty()


async def test_a_lone_frame_is_passed_through() -> None:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    single = frame(b"one")
    queue.put_nowait(single)
    assert await CoalescingFrameGenerator(queue).__anext__() is single


async def test_draining_a_batch_releases_every_waiting_publisher() -> None:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    parts = [frame(b"a", drain=True), frame(b"b"), frame(b"c", drain=True)]
    for part in parts:
        queue.put_nowait(part)
    [batch] = await frames_of(CoalescingFrameGenerator(queue), 1)
    assert batch.should_drain
    batch.drain()
    assert not batch.should_drain
    assert all(p.drain_future.done() for p in parts if p.drain_future is not None)


async def test_a_closing_frame_is_written_alone_after_the_batch() -> None:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    for part in (frame(b"a"), frame(b"b"), frame(b"close", close=True), frame(b"late")):
        queue.put_nowait(part)
    generator = CoalescingFrameGenerator(queue)
    batch, closing = await frames_of(generator, 2)
    assert batch.payload == b"ab" and not batch.should_close
    assert closing.payload == b"close" and closing.should_close


async def test_a_batch_is_bounded() -> None:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    for i in range(amqp_writes.MAX_BATCH + 5):
        queue.put_nowait(frame(b"%d," % i))
    first, rest = await frames_of(CoalescingFrameGenerator(queue), 2)
    assert first.payload.count(b",") == amqp_writes.MAX_BATCH
    assert rest.payload.count(b",") == 5
    assert (first.payload + rest.payload).split(b",")[:-1] == [
        b"%d" % i for i in range(amqp_writes.MAX_BATCH + 5)
    ]
