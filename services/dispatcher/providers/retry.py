"""When and how long to wait before trying an upstream call again.

Only failures a retry can fix are retried (5xx, 408, connection errors, timeouts), a bounded
number of times, with jittered exponential backoff, and never past the request's deadline.
An upstream that asks for a longer wait than the backoff allows is not retried: its client
gets the `retry-after` and waits itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

from shared.errors import RouterError
from shared.http_headers import SHOULD_RETRY

log = logging.getLogger(__name__)

T = TypeVar("T")

# A retry needs time for a new connection and a first byte; less than this is not worth it.
MIN_ATTEMPT_TIME = 0.5


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0

    def delay(self, retry: int, jitter: float, retry_after: float | None = None) -> float:
        """Seconds before retry number `retry` (0-based); `jitter` is uniform in [0, 1).

        "Equal jitter": half the exponential step is fixed, half random, so concurrent
        callers spread out yet none retries at once. An upstream `retry-after` is waited out
        up to `backoff_max` (`next_delay` does not retry when it asks for more).
        """
        step = min(self.backoff_max, self.backoff_base * 2.0**retry)
        wait = step / 2 + jitter * step / 2
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.backoff_max))
        return wait

    def leaves_to_client(self, retry_after: float | None) -> bool:
        """The upstream asks for a longer wait than the router makes: no retry of the
        router's would help; the client gets the `retry-after` and waits itself."""
        return retry_after is not None and retry_after > self.backoff_max


def next_delay(
    policy: RetryPolicy,
    retry: int,
    *,
    remaining: float,
    jitter: float,
    retry_after: float | None = None,
) -> float | None:
    """The wait before retry number `retry`, or None when no retry is allowed.

    None once `max_retries` are spent, when the upstream's `retry_after` is longer than
    `backoff_max` (the client gets it relayed and waits itself, rather than for a retry too
    early to help), or when the wait plus a minimal attempt would not fit in the `remaining`
    seconds before the deadline.
    """
    if retry >= policy.max_retries:
        return None
    if policy.leaves_to_client(retry_after):
        return None
    wait = policy.delay(retry, jitter, retry_after)
    if wait + MIN_ATTEMPT_TIME > remaining:
        return None
    return wait


def is_retryable_status(status: int) -> bool:
    return status == 408 or status >= 500


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """Whether a failed answer is worth another try: a retryable status the upstream does not
    mark `x-should-retry: false` (OpenAI's SDKs obey that mark: such a 500 would fail again).
    A `true` adds nothing: a 429 is left to the client, which knows its own budget.
    `headers` lower-cased."""
    said_no = headers.get(SHOULD_RETRY, "").strip().lower() == "false"
    return is_retryable_status(status) and not said_no


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the upstream asks us to wait: `retry-after-ms`, else `retry-after`.

    `retry-after` may be seconds or an HTTP date; anything unparsable or negative is None.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000
        except ValueError:
            value = -1.0
        if value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw).timestamp()
        except (TypeError, ValueError):
            return None
        seconds = when - (time.time() if now is None else now)
    return seconds if seconds >= 0 else None


class RetryableFailure(Exception):
    """One attempt failed in a way another attempt may fix.

    `error` is what the client gets if no retry is left.
    """

    def __init__(self, error: RouterError, *, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    deadline: float,
    label: str,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    jitter: Callable[[], float] = random.random,
) -> T:
    """Run `attempt` until it succeeds, raises a non-retryable error, or retries run out.

    Raises the last failure's `error` (a RouterError), chained to what caused it. If it was
    retried, the error says `x-should-retry: false`: the OpenAI SDKs would otherwise repeat the
    whole series (3 tries each for 2 SDK retries: 9 upstream calls). Without a retry (none
    allowed, no time left), or when the upstream asked for a longer wait than the router
    makes (`retry-after` past `backoff_max`), the client may still retry on its own.
    """
    retry = 0
    while True:
        try:
            return await attempt()
        except RetryableFailure as failure:
            wait = next_delay(
                policy,
                retry,
                remaining=deadline - clock(),
                jitter=jitter(),
                retry_after=failure.retry_after,
            )
            if wait is None:
                if retry > 0 and not policy.leaves_to_client(failure.retry_after):
                    failure.error.headers[SHOULD_RETRY] = "false"
                raise failure.error from failure.__cause__
            retry += 1
            log.info("%s: %s; retry %d in %.2fs", label, failure.error.message, retry, wait)
            await sleep(wait)
