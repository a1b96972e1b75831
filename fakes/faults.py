"""Scripted faults: a FIFO of steps, one consumed per chat request.

Contract: `POST /_fake/script` takes a JSON list (or one object) of steps:
  {"ok": true}                              serve normally
  {"status": 500, "body": ..., "headers": {...}}
                                            reply with that status; without "body"
                                            the flavour's real error body is sent
  {"delay": 5.0}                            wait that long before the first byte
  {"cut_after_chunks": 3}                   stream: 3 SSE events then drop the
                                            TCP connection (no [DONE]); JSON:
                                            drop it without any response
  {"error_after_chunks": 3, "body": "msg"}  stream: 3 SSE events (at most all but
                                            [DONE]), then the flavour's error event
                                            (its message "msg" or a default) and the
                                            stream's end, as a server failing
                                            mid-generation ends it; streams only, and
                                            not with cut_after_chunks
Keys combine: {"delay": 1, "status": 503} waits, then fails.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_KEYS = frozenset(
    {"ok", "status", "body", "headers", "delay", "cut_after_chunks", "error_after_chunks"}
)


@dataclass(frozen=True, slots=True)
class FaultStep:
    """What to do to one chat request; the default step is a normal reply."""

    status: int | None = None
    body: Any = None  # dict/list: JSON; str: sent as is; None: flavour default
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    cut_after_chunks: int | None = None
    error_after_chunks: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> FaultStep:
        """Build a step from its JSON form; ValueError says what is wrong."""
        if not isinstance(raw, dict):
            raise ValueError(f"a step must be an object, got {raw!r}")
        unknown = set(raw) - _KEYS
        if unknown:
            raise ValueError(f"unknown step keys: {sorted(unknown)}")
        status = raw.get("status")
        if status is not None and (not _is_int(status) or not 100 <= status <= 599):
            raise ValueError(f"status must be an HTTP status code, got {status!r}")
        headers = raw.get("headers") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ValueError("headers must map strings to strings")
        delay = raw.get("delay", 0.0)
        if not isinstance(delay, int | float) or isinstance(delay, bool) or delay < 0:
            raise ValueError(f"delay must be a number of seconds >= 0, got {delay!r}")
        counts = {}
        for key in ("cut_after_chunks", "error_after_chunks"):
            count = raw.get(key)
            if count is not None and (not _is_int(count) or count < 0):
                raise ValueError(f"{key} must be an integer >= 0, got {count!r}")
            counts[key] = count
        if None not in counts.values():
            raise ValueError("cut_after_chunks and error_after_chunks end a stream two ways")
        return cls(status, raw.get("body"), dict(headers), float(delay), **counts)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class FaultScript:
    """FIFO of steps; an empty script means every request is served normally."""

    def __init__(self) -> None:
        self._steps: deque[FaultStep] = deque()

    def extend(self, steps: Iterable[FaultStep]) -> None:
        self._steps.extend(steps)

    def pop(self) -> FaultStep | None:
        return self._steps.popleft() if self._steps else None

    def clear(self) -> None:
        self._steps.clear()

    def __len__(self) -> int:
        return len(self._steps)


def parse_script(raw: Any) -> list[FaultStep]:
    """Parse the body of `POST /_fake/script` (a list of steps or a single step)."""
    items = raw if isinstance(raw, list) else [raw]
    return [FaultStep.parse(item) for item in items]
