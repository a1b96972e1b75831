"""`Batcher`: calls queued together leave in one batch, and every caller gets its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.dispatcher.batching import Batcher


class Backend:
    """Doubles each item; records every batch; `gate` holds a batch until it is set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None
        self.fail_on: int | None = None

    async def run(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise ConnectionError(f"down at {self.fail_on}")
        return [2 * item for item in items]


async def test_calls_made_in_one_turn_leave_in_one_batch_and_get_their_own_results() -> None:
    backend = Backend()
    batcher = Batcher(backend.run)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    assert results == [0, 2, 4, 6, 8]
    assert backend.batches == [[0, 1, 2, 3, 4]]


async def test_a_lone_call_is_sent_at_once() -> None:
    backend = Backend()
    batcher = Batcher(backend.run)
    assert await asyncio.wait_for(batcher.submit(7), 1) == 14
    assert backend.batches == [[7]]


async def test_calls_made_while_a_batch_is_in_flight_leave_together_after_it() -> None:
    backend = Backend()
    backend.gate = asyncio.Event()
    batcher = Batcher(backend.run)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.01)
    assert backend.batches == [[1]]  # in flight, held by the gate
    later = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert backend.batches == [[1]]  # one batch at a time
    backend.gate.set()
    assert await asyncio.gather(first, *later) == [2, 4, 6, 8]
    assert backend.batches == [[1], [2, 3, 4]]


async def test_a_failed_batch_fails_its_callers_only() -> None:
    backend = Backend()
    backend.gate = asyncio.Event()
    backend.fail_on = 1
    batcher = Batcher(backend.run)
    doomed = [asyncio.ensure_future(batcher.submit(i)) for i in (0, 1)]
    await asyncio.sleep(0.01)
    fine = asyncio.ensure_future(batcher.submit(5))
    backend.gate.set()
    for call in doomed:
        with pytest.raises(ConnectionError, match="down at 1"):
            await call
    assert await fine == 10
    assert backend.batches == [[0, 1], [5]]


async def test_batches_are_bounded() -> None:
    backend = Backend()
    batcher = Batcher(backend.run, max_batch=2)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [0, 2, 4, 6, 8]
    assert backend.batches == [[0, 1], [2, 3], [4]]


async def test_a_cancelled_caller_leaves_the_others_their_answers() -> None:
    backend = Backend()
    backend.gate = asyncio.Event()
    batcher = Batcher(backend.run)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    calls[1].cancel()
    backend.gate.set()
    assert await calls[0] == 0
    assert await calls[2] == 4
    assert calls[1].cancelled()


async def test_a_wrong_number_of_results_fails_the_batch() -> None:
    async def short(items: Sequence[int]) -> list[int]:
        return list(items)[:-1]

    batcher = Batcher(short)
    with pytest.raises(RuntimeError, match="2 results for 3 calls"):
        await asyncio.gather(*(batcher.submit(i) for i in range(3)))


async def test_callers_never_wait_forever_when_the_sender_is_cancelled() -> None:
    backend = Backend()
    backend.gate = asyncio.Event()  # never set: the batch hangs until the sender is cancelled
    batcher = Batcher(backend.run)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.01)
    sender = batcher._sender
    assert sender is not None
    sender.cancel()
    done, pending = await asyncio.wait({first, queued}, timeout=1)
    assert not pending and all(call.cancelled() for call in done)
    # The batcher starts a new sender for the next call.
    backend.gate.set()
    assert await asyncio.wait_for(batcher.submit(3), 1) == 6


def test_max_batch_must_allow_a_call() -> None:
    with pytest.raises(ValueError):
        Batcher(Backend().run, max_batch=0)
