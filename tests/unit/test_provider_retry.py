"""Retry policy of provider calls: jittered exponential backoff, bounded, inside the deadline."""

from __future__ import annotations

import pytest

from services.dispatcher.providers.retry import (
    RetryableFailure,
    RetryPolicy,
    call_with_retries,
    is_retryable_status,
    next_delay,
    parse_retry_after,
)
from shared.errors import GatewayTimeoutError, InvalidRequestError, UpstreamError

POLICY = RetryPolicy(max_retries=3, backoff_base=0.5, backoff_max=4.0)


@pytest.mark.parametrize(
    ("retry", "low", "high"),
    [(0, 0.25, 0.5), (1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (9, 2.0, 4.0)],
)
def test_backoff_doubles_with_jitter_and_a_cap(retry: int, low: float, high: float) -> None:
    assert POLICY.delay(retry, 0.0) == low
    assert POLICY.delay(retry, 0.999999) == pytest.approx(high, rel=1e-5)
    assert low <= POLICY.delay(retry, 0.5) <= high


def test_upstream_retry_after_is_honoured_up_to_the_cap() -> None:
    assert POLICY.delay(0, 0.0, retry_after=1.5) == 1.5
    assert POLICY.delay(0, 0.0, retry_after=60) == 4.0
    assert POLICY.delay(2, 0.0, retry_after=0.1) == 1.0  # never shorter than the backoff


def test_no_retry_when_the_upstream_asks_for_a_longer_wait_than_the_cap() -> None:
    """The client gets the upstream's `retry-after` at once instead of a retry that comes too
    early to help."""
    assert next_delay(POLICY, 0, remaining=100, jitter=0, retry_after=4.0) == 4.0
    assert next_delay(POLICY, 0, remaining=100, jitter=0, retry_after=4.5) is None


def test_retries_are_bounded_in_number() -> None:
    assert [next_delay(POLICY, r, remaining=100, jitter=0) for r in range(5)] == [
        0.25,
        0.5,
        1.0,
        None,
        None,
    ]
    assert next_delay(RetryPolicy(max_retries=0), 0, remaining=100, jitter=0) is None


def test_no_retry_that_cannot_finish_before_the_deadline() -> None:
    assert next_delay(POLICY, 2, remaining=1.4, jitter=0) is None  # 1.0 s wait + 0.5 s try
    assert next_delay(POLICY, 2, remaining=1.6, jitter=0) == 1.0


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (502, True), (503, True), (504, True), (408, True), (400, False), (429, False)],
)
def test_retryable_statuses(status: int, retryable: bool) -> None:
    assert is_retryable_status(status) is retryable


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "3"}, 0.25),
        ({"retry-after-ms": "junk", "retry-after": "3"}, 3.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-1"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    now = 1445412480.0  # 2015-10-21 07:28:00 UTC
    assert parse_retry_after(headers, now=now) == expected


class Script:
    """An attempt function failing as told, and a clock that advances on sleep."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.now = 1000.0
        self.slept: list[float] = []

    async def attempt(self) -> str:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return str(outcome)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


async def run(script: Script, deadline: float = 2000.0) -> str:
    return await call_with_retries(
        script.attempt,
        policy=POLICY,
        deadline=deadline,
        label="test",
        clock=script.clock,
        sleep=script.sleep,
        jitter=lambda: 0.0,
    )


async def test_two_failures_then_success() -> None:
    failure = RetryableFailure(UpstreamError("HTTP 500"))
    script = Script(failure, failure, "ok")
    assert await run(script) == "ok"
    assert script.calls == 3 and script.slept == [0.25, 0.5]


async def test_exhausted_retries_raise_the_last_error_chained() -> None:
    cause = OSError("reset")
    failures = []
    for _ in range(4):
        failure = RetryableFailure(GatewayTimeoutError("slow"))
        failure.__cause__ = cause
        failures.append(failure)
    script = Script(*failures)
    with pytest.raises(GatewayTimeoutError) as info:
        await run(script)
    assert script.calls == 4  # one try and max_retries=3 retries
    assert info.value.__cause__ is cause
    assert info.value.headers == {"x-should-retry": "false"}  # the client's SDK: no more tries


async def test_an_error_not_retried_leaves_the_client_free_to_retry() -> None:
    failure = RetryableFailure(UpstreamError("HTTP 503", headers={"retry-after": "1"}))
    script = Script(failure, "ok")
    with pytest.raises(UpstreamError) as info:
        await run(script, deadline=script.now + 0.5)  # no time left for a retry
    assert script.calls == 1 and info.value.headers == {"retry-after": "1"}


async def test_a_non_retryable_error_is_raised_at_once() -> None:
    script = Script(InvalidRequestError("bad"), "never")
    with pytest.raises(InvalidRequestError):
        await run(script)
    assert script.calls == 1 and script.slept == []


async def test_the_deadline_stops_retries() -> None:
    failure = RetryableFailure(UpstreamError("HTTP 503"))
    script = Script(failure, failure, "ok")
    with pytest.raises(UpstreamError) as info:
        # Room for one 0.25 s wait and a try; not for the 0.5 s one after.
        await run(script, deadline=script.now + 0.8)
    assert script.calls == 2 and info.value.headers == {"x-should-retry": "false"}


async def test_a_retry_after_past_the_cap_is_answered_at_once() -> None:
    failure = RetryableFailure(UpstreamError("HTTP 503"), retry_after=30.0)
    script = Script(failure, "ok")
    with pytest.raises(UpstreamError) as info:
        await run(script)
    assert script.calls == 1 and script.slept == []
    assert "x-should-retry" not in info.value.headers


async def test_a_long_retry_after_after_a_retry_still_leaves_the_client_free_to_retry() -> None:
    # The router retried once; then the upstream asks for a wait longer than the router makes:
    # the client gets the `retry-after` and may wait it out itself.
    script = Script(
        RetryableFailure(UpstreamError("HTTP 503")),
        RetryableFailure(UpstreamError("HTTP 503"), retry_after=30.0),
        "ok",
    )
    with pytest.raises(UpstreamError) as info:
        await run(script)
    assert script.calls == 2
    assert "x-should-retry" not in info.value.headers
