"""Reply correlation: first attempt wins, duplicates dropped, gaps surface."""

from __future__ import annotations

import asyncio

import pytest

from services.api.rpc import PendingCall, ReplyRouter, StreamOrderError
from shared.messages import Reply, ReplyKind


def chunk(seq: int, attempt: str = "a") -> Reply:
    return Reply(ReplyKind.CHUNK, "r1", attempt, body=f"data: {seq}\n\n".encode(), seq=seq)


async def test_stray_replies_are_dropped() -> None:
    router = ReplyRouter()
    assert not router.dispatch(chunk(0))


async def test_duplicates_are_dropped_and_order_kept() -> None:
    call = PendingCall("r1")
    for seq in (0, 0, 1, 1, 2):
        call.deliver(chunk(seq))
    assert [(await call.next(1)).seq for _ in range(3)] == [0, 1, 2]
    with pytest.raises(TimeoutError):
        await call.next(0.01)


async def test_a_gap_is_an_error() -> None:
    call = PendingCall("r1")
    call.deliver(chunk(0))
    call.deliver(chunk(2))
    await call.next(1)
    with pytest.raises(StreamOrderError):
        await call.next(1)


async def test_second_attempt_dropped_before_output_and_fatal_after() -> None:
    call = PendingCall("r1")
    call.deliver(chunk(0, "a"))
    call.deliver(chunk(0, "b"))
    assert (await call.next(1)).attempt == "a"
    with pytest.raises(TimeoutError):
        await call.next(0.01)
    call.output_started = True
    call.deliver(chunk(0, "b"))
    with pytest.raises(StreamOrderError):
        await call.next(1)


async def test_rpc_results_resolve_once() -> None:
    router = ReplyRouter()
    future = router.expect_result("q1")
    assert router.resolve_result("q1", b"x")
    assert await asyncio.wait_for(future, 1) == b"x"
    assert not router.resolve_result("q1", b"y")
    assert len(router) == 0


async def test_fail_all_fails_every_waiting_call() -> None:
    router = ReplyRouter()
    first, second = router.open("r1"), router.open("r2")
    router.fail_all(StreamOrderError("gone"))
    for call in (first, second):
        with pytest.raises(StreamOrderError):
            await call.next(1)
