"""Coalesced socket writes for aiormq, the AMQP client under aio-pika.

aiormq's connection writer takes one frame at a time from its write queue and gives each its own
`transport.write`. On loopback every write is a `send()` syscall that also runs the receiver's
TCP processing, and under load that was the largest single cost of the dispatcher and the agent
(py-spy: 17-20% of their busy time). Here the writer gets, in one piece and in order, every
frame queued while it was away: an ack, a publish and another ack from one turn of the event
loop leave in one write. A closing frame still goes alone, because the writer stops after it.

`install()` swaps aiormq's frame iterator for this one. It relies on aiormq's internals
(pinned in pyproject.toml); tests/unit/test_amqp_writes.py fails if an upgrade moves them.
"""

from __future__ import annotations

import asyncio
import dataclasses

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


def install() -> None:
    """Make every aiormq connection opened from now on write coalesced.

    Its write queue also holds up to MAX_BATCH entries instead of aiormq's 10: a publish that
    finds the queue full waits for the writer while holding its channel's lock, so past ten
    publishes in one turn of the loop the rest left one per turn, each in a write of its own
    (4-5% fewer requests/s at c=32, bench/RESULTS.md). The queue stays bounded."""
    aiormq_connection.FrameGenerator = CoalescingFrameGenerator  # type: ignore[misc]
    aiormq_connection.Connection.FRAME_BUFFER_SIZE = MAX_BATCH
