"""Coalesced socket writes for aiormq, the AMQP client under aio-pika.

aiormq's connection writer takes one frame at a time from its write queue and gives each its own
`transport.write`. On loopback every write is a `send()` syscall that also runs the receiver's
TCP processing, and under load that was the largest single cost of the dispatcher and the agent
(py-spy: 17-20% of their busy time). Here the writer gets, in one piece and in order, every
frame queued while it was away: an ack, a publish and another ack from one turn of the event
loop leave in one write. A closing frame still goes alone, because the writer stops after it.

aiormq's queues are also small for a busy process: ten entries to the writer, and ten frames
(three deliveries) between the connection's reader and a channel's. A task that finds one
full waits a turn of the loop for the other side, and past ten publishes (or three deliveries)
a turn, the rest went one per turn. `install()` makes both MAX_BATCH deep: still bounded.

`install()` swaps aiormq's frame iterator for this one and sets those sizes. It relies on
aiormq's internals (pinned in pyproject.toml); tests/unit/test_amqp_writes.py fails if an
upgrade moves them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any

from aiormq import connection as aiormq_connection
from aiormq.abc import ChannelFrame

# aiormq's own iterator: one frame, so one socket write, at a time.
OneByOneFrameGenerator = aiormq_connection.FrameGenerator
MAX_BATCH = 256  # frames in one write: bounds the join, not the latency (writes never block)


@dataclasses.dataclass(frozen=True)
class FrameBatch(ChannelFrame):
    """Several frames as one payload; draining it releases every publisher waiting on one."""

    parts: tuple[ChannelFrame, ...] = ()

    def drain(self) -> None:
        for part in self.parts:
            part.drain()

    @property
    def should_drain(self) -> bool:
        return any(part.should_drain for part in self.parts)


def coalesce(
    first: ChannelFrame, queue: asyncio.Queue[ChannelFrame]
) -> tuple[ChannelFrame, ChannelFrame | None]:
    """`first` and whatever is queued behind it, as one frame; plus a closing frame met on the
    way (to be written on its own, next)."""
    if first.should_close or queue.empty():
        return first, None
    parts = [first]
    held = None
    while len(parts) < MAX_BATCH and not queue.empty():
        frame = queue.get_nowait()
        queue.task_done()
        if frame.should_close:
            held = frame
            break
        parts.append(frame)
    if len(parts) == 1:
        return first, held
    batch = FrameBatch(
        payload=b"".join(part.payload for part in parts), should_close=False, parts=tuple(parts)
    )
    return batch, held


class CoalescingFrameGenerator(OneByOneFrameGenerator):
    def __init__(self, queue: asyncio.Queue[ChannelFrame]) -> None:
        super().__init__(queue)
        self._held: ChannelFrame | None = None

    async def __anext__(self) -> ChannelFrame:
        if self.close_event.is_set():
            raise StopAsyncIteration
        if self._held is not None:
            frame, self._held = self._held, None
            return frame
        first: ChannelFrame = await self.queue.get()
        self.queue.task_done()
        frame, self._held = coalesce(first, self.queue)
        return frame


def _with_deeper_buffer(open_channel: Any) -> Any:
    """aiormq's `Connection.channel`, opening channels whose incoming frames queue holds
    MAX_BATCH frames (aio-pika passes no size, so aiormq's default of 10 applied)."""
    if getattr(open_channel, "_deeper_buffer", False):
        return open_channel

    @functools.wraps(open_channel)
    async def channel(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) < 3:  # frame_buffer_size is the third parameter
            kwargs.setdefault("frame_buffer_size", MAX_BATCH)
        return await open_channel(self, *args, **kwargs)

    channel._deeper_buffer = True  # type: ignore[attr-defined]
    return channel


def install() -> None:
    """Make every aiormq connection opened from now on write coalesced, with queues MAX_BATCH
    deep (the writer's, and each channel's incoming frames). Together with publishes that do
    not wait for the writer (shared.amqp), a turn's publishes left in one write: 38% more
    requests/s at c=32, then 4-5% for the writer's queue and 7-13% for the channels'
    (bench/RESULTS.md)."""
    aiormq_connection.FrameGenerator = CoalescingFrameGenerator  # type: ignore[misc]
    aiormq_connection.Connection.FRAME_BUFFER_SIZE = MAX_BATCH
    connection = aiormq_connection.Connection
    connection.channel = _with_deeper_buffer(connection.channel)  # type: ignore[method-assign]
