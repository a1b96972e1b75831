"""Reply correlation: first attempt wins, duplicates dropped, gaps surface."""

from __future__ import annotations

import asyncio

import pytest

from services.api.rpc import MAX_ENDED, PendingCall, ReplyRouter, StreamOrderError
from shared.messages import Reply, ReplyKind
from shared.reply_trust import ReplyTrust


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
    router.fail_all(lambda: StreamOrderError("gone"))
    raised = []
    for call in (first, second):
        with pytest.raises(StreamOrderError) as info:
            await call.next(1)
        raised.append(info.value)
    assert raised[0] is not raised[1]  # each its own traceback


# --- chunks for calls that have ended: the backend streams for nobody ------------------------


class Orphans:
    def __init__(self) -> None:
        self.now = 100.0
        self.told: list[tuple[str, str]] = []

    def router(self, trust: ReplyTrust | None = None) -> ReplyRouter:
        return ReplyRouter(
            trust,
            on_orphan=lambda request_id, model: self.told.append((request_id, model)),
            forget_after=120,
            clock=lambda: self.now,
        )


def test_a_chunk_for_an_ended_call_is_reported_once_with_its_model() -> None:
    orphans = Orphans()
    router = orphans.router()
    router.open("r1", "local_m")
    router.close("r1")
    assert not router.dispatch(chunk(0, "b"))
    assert not router.dispatch(chunk(1, "b"))
    assert orphans.told == [("r1", "local_m")]


def test_only_chunks_of_calls_ended_lately_are_reported() -> None:
    orphans = Orphans()
    router = orphans.router()
    assert not router.dispatch(chunk(0))  # never this process's call
    router.open("r1", "local_m")
    router.close("r1")
    end = Reply(ReplyKind.END, "r1", "b", seq=3)
    assert not router.dispatch(end)  # a stream's end, or a duplicate answer: nothing runs
    orphans.now += 121
    assert not router.dispatch(chunk(0, "b"))  # past the deadline: forgotten
    assert orphans.told == []


def test_ended_calls_are_remembered_within_a_bound() -> None:
    orphans = Orphans()
    router = orphans.router()
    for n in range(MAX_ENDED + 1):
        router.open(f"r{n}", "m")
        router.close(f"r{n}")
    router.dispatch(Reply(ReplyKind.CHUNK, "r0", "b", body=b"", seq=0))
    router.dispatch(Reply(ReplyKind.CHUNK, f"r{MAX_ENDED}", "b", body=b"", seq=0))
    assert orphans.told == [(f"r{MAX_ENDED}", "m")]


def test_a_chunk_from_a_sender_that_may_not_answer_the_model_cancels_nothing() -> None:
    orphans = Orphans()
    router = orphans.router(ReplyTrust.parse("disp=*,gpu-a=local_a"))
    router.open("r1", "local_b")
    router.close("r1")
    router.dispatch(chunk(0, "b"), "gpu-a")
    assert orphans.told == []
    router.dispatch(chunk(0, "b"), "disp")  # the real re-run's chunk still cancels it
    assert orphans.told == [("r1", "local_b")]
