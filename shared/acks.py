"""Consumer acks sent a moment late, several in one socket write.

An ack settles a message whose work is done: the job was answered or handed on, and the broker
confirmed that. Nothing waits for the ack itself. Sent at once, each ack is a socket write of
its own on the consuming connection (publishes go on the other one), and on loopback a write
also runs the broker's side of TCP. `AckBatcher` holds a channel's acks for up to `delay`
seconds and then sends them together, in one write.

Holding an ack longer widens a window that exists anyway: a process that dies after its work
but before the ack leaves a message the broker delivers again; replies' attempt ids keep the
client from seeing a second answer. `flush()` sends every held ack at once, before a
connection is closed on purpose. A channel that closed in the meantime took its deliveries
with it (the broker requeues them), so its held acks are dropped, not sent to a channel that
no longer knows their tags.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Protocol

log = logging.getLogger(__name__)

ACK_DELAY = 0.002  # seconds: at ~1,000 jobs/s, a few acks per write; invisible at c=1


class AckChannel(Protocol):
    """The little of aiormq's Channel used here."""

    @property
    def is_closed(self) -> bool: ...

    def basic_ack(
        self, delivery_tag: int, multiple: bool = False, wait: bool = True
    ) -> Awaitable[None]: ...


class AckBatcher:
    """One process's held acks, per channel; one timer for all of them."""

    def __init__(self, *, delay: float = ACK_DELAY) -> None:
        self._delay = delay
        self._held: dict[AckChannel, list[int]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def ack(self, channel: AckChannel, tag: int) -> None:
        """Ack `tag` on `channel` within `delay` seconds."""
        self._held.setdefault(channel, []).append(tag)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._send_held)

    @property
    def held(self) -> int:
        return sum(len(tags) for tags in self._held.values())

    def _send_held(self) -> None:
        self._timer = None
        held, self._held = self._held, {}
        for channel, tags in held.items():
            if channel.is_closed:
                continue
            task = asyncio.create_task(_send(channel, tags))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def flush(self) -> None:
        """Send every held ack now and wait until they are written."""
        if self._timer is not None:
            self._timer.cancel()
        self._send_held()
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=1.0)


async def _send(channel: AckChannel, tags: list[int]) -> None:
    try:
        # Queued in one turn of the loop, the frames leave together (shared.amqp_writes, whose
        # write queue holds 256 of them); only the last one waits for its write.
        for tag in tags[:-1]:
            await channel.basic_ack(tag, wait=False)
        await channel.basic_ack(tags[-1])
    except Exception:  # closed meanwhile: the broker requeued these deliveries itself
        log.debug("held acks of a closed channel dropped", exc_info=True)
