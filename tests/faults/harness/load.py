"""Load with a ledger: every request's life, and the assertions the fault cases share.

Each request gets a ledger entry keyed by our own sequence number: when it was sent, when it
was accepted (status line and first byte), its terminal outcome and its latency. Outcomes:

  ok           200 with a chat.completion, or a stream that ended `data: [DONE]` with a finish
               chunk and at most one role and one finish chunk per choice (a duplicated
               stream has two)
  error        a non-200 whose body is an OpenAI error object
  error_event  a 200 stream that ended with `data: {"error": {...}}` and no [DONE]
  bad          anything else: a non-OpenAI error body, a stream cut without an error event,
               a malformed or duplicated answer
  hang         no terminal outcome within the request's deadline plus `GRACE` seconds
  transport    the API itself dropped or refused the connection

`assert_ledger()` is the contract every case checks: 0 accepted requests lost (no hang, no
transport failure once accepted), every request ending in `ok`, `error` or `error_event` within
its deadline plus 2 s, and no duplicate reply delivered as far as a client can tell. One HTTP
request gets one response, so a duplicate can only show inside it: a stream with a second role
or finish chunk (`bad`), or an `ok` answer whose text is not its model's answer in `answers`
(`dummy` and the fakes give every request the same one), as a repeated, lost or reordered
content chunk or a mixed-up JSON body makes it. Requests given the same answer look alike, so
a whole reply delivered to the wrong request would go unseen.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

GRACE = 2.0
TERMINAL = frozenset({"ok", "error", "error_event"})


@dataclass
class Entry:
    key: int
    model: str
    stream: bool
    timeout: float  # the router's REQUEST_TIMEOUT for this request
    sent: float = 0.0
    accepted: float | None = None
    finished: float | None = None
    status: int | None = None
    request_id: str | None = None
    outcome: str = "pending"
    detail: str = ""
    error_code: str | None = None
    text: str = ""
    cache: str | None = None  # the x-cache verdict the router answered with
    retry_after: str | None = None

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.sent

    def describe(self) -> str:
        latency = "-" if self.latency is None else f"{self.latency:.2f}s"
        return (
            f"#{self.key} {self.model} stream={self.stream} sent@{self.sent:.2f} "
            f"status={self.status} outcome={self.outcome} code={self.error_code} "
            f"latency={latency} id={self.request_id} {self.detail[:160]}"
        )


def is_openai_error(payload: Any) -> bool:
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
        return False
    error = payload["error"]
    return (
        isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and "param" in error
        and "code" in error
    )


def classify_json(entry: Entry, status: int, body: bytes) -> None:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        entry.outcome, entry.detail = "bad", f"non-JSON body {body[:120]!r}"
        return
    if status == 200:
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if payload.get("object") == "chat.completion" and choices:
            entry.outcome = "ok"
            entry.text = str(choices[0].get("message", {}).get("content") or "")
        else:
            entry.outcome, entry.detail = "bad", f"200 without a completion: {body[:120]!r}"
    elif is_openai_error(payload):
        entry.outcome = "error"
        entry.error_code = str(payload["error"].get("code"))
        entry.detail = str(payload["error"].get("message"))
    else:
        entry.outcome, entry.detail = "bad", f"{status} not an OpenAI error: {body[:120]!r}"


def classify_stream(entry: Entry, raw: bytes) -> None:
    """Judge a whole SSE body (comments such as `: ping` are keep-alives, ignored)."""
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    payloads: list[bytes] = []
    for event in events:
        lines = [line for line in event.split(b"\n") if not line.startswith(b":")]
        if not lines:
            continue
        if len(lines) != 1 or not lines[0].startswith(b"data: "):
            entry.outcome, entry.detail = "bad", f"malformed event {event[:120]!r}"
            return
        payloads.append(lines[0][len(b"data: ") :])
    if not payloads:
        entry.outcome, entry.detail = "bad", "stream without any event"
        return
    last = payloads[-1]
    body = payloads[:-1]
    if last == b"[DONE]":
        done = True
    else:
        done = False
        try:
            final = orjson.loads(last)
        except orjson.JSONDecodeError:
            entry.outcome, entry.detail = "bad", f"stream ended mid-event {last[:120]!r}"
            return
        if not is_openai_error(final):
            entry.outcome, entry.detail = "bad", "stream cut without [DONE] or an error event"
            return
        entry.error_code = str(final["error"].get("code"))
        entry.detail = str(final["error"].get("message"))
    tally = _tally(body)
    if isinstance(tally, str):
        entry.outcome, entry.detail = "bad", tally
        return
    roles, finishes, entry.text = tally
    if any(count > 1 for count in (*roles.values(), *finishes.values())):
        entry.outcome, entry.detail = "bad", f"duplicated stream: roles={roles} finish={finishes}"
        return
    if done:
        if not finishes:
            entry.outcome, entry.detail = "bad", "[DONE] without a finish_reason"
            return
        entry.outcome = "ok"
    else:
        entry.outcome = "error_event"


def _tally(body: list[bytes]) -> tuple[Counter[int], Counter[int], str] | str:
    """Role and finish chunks per choice, and choice 0's text; or what is wrong."""
    roles: Counter[int] = Counter()
    finishes: Counter[int] = Counter()
    text: list[str] = []
    for payload in body:
        if payload == b"[DONE]":
            return "[DONE] before the end of the stream"
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return f"malformed chunk {payload[:120]!r}"
        if "error" in chunk:
            return "an error event before the end of the stream"
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            index = int(choice.get("index", 0))
            if delta.get("role"):
                roles[index] += 1
            if choice.get("finish_reason"):
                finishes[index] += 1
            if index == 0 and isinstance(delta.get("content"), str):
                text.append(delta["content"])
    return roles, finishes, "".join(text)


@dataclass
class Ledger:
    entries: list[Entry] = field(default_factory=list)
    _keys: itertools.count[int] = field(default_factory=itertools.count)

    def new(self, model: str, stream: bool, timeout: float) -> Entry:
        entry = Entry(next(self._keys), model, stream, timeout)
        self.entries.append(entry)
        return entry

    def outcomes(self) -> Counter[str]:
        return Counter(
            f"{e.outcome}:{e.status}" + (f":{e.error_code}" if e.error_code else "")
            for e in self.entries
        )

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes().items()))

    def between(self, start: float, end: float = float("inf")) -> list[Entry]:
        return [e for e in self.entries if start <= e.sent < end]


async def send(
    http: httpx.AsyncClient,
    ledger: Ledger,
    *,
    model: str,
    stream: bool,
    timeout: float,
    extra: dict[str, Any] | None = None,
    content: str | None = None,
) -> Entry:
    """One request, recorded; never raises (the outcome says what happened).

    Each request says something new (`content` defaults to a unique text), so the response
    cache never answers it: the fault cases exercise the whole path.
    """
    entry = ledger.new(model, stream, timeout)
    text = content if content is not None else f"hi {uuid.uuid4().hex}"
    messages = [{"role": "user", "content": text}]
    body = {"model": model, "messages": messages, "stream": stream, **(extra or {})}
    entry.sent = time.monotonic()
    try:
        async with asyncio.timeout(timeout + GRACE):
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                entry.accepted = time.monotonic()
                entry.status = response.status_code
                entry.request_id = response.headers.get("x-request-id")
                entry.cache = response.headers.get("x-cache")
                entry.retry_after = response.headers.get("retry-after")
                raw = await response.aread()
        entry.finished = time.monotonic()
        is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
        if stream and entry.status == 200 and is_sse:
            classify_stream(entry, raw)
        else:
            classify_json(entry, entry.status, raw)
    except TimeoutError:
        entry.outcome = "hang"
        entry.detail = "accepted, then no end" if entry.accepted else "no status line"
    except httpx.HTTPError as e:
        entry.finished = time.monotonic()
        entry.outcome, entry.detail = "transport", repr(e)
    return entry


class LoadGenerator:
    """`concurrency` workers, each sending requests back to back (with `pause` between)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        ledger: Ledger,
        *,
        models: Iterable[str],
        timeout: float,
        concurrency: int = 8,
        stream_every: int = 2,
        pause: float = 0.05,
        extra: Callable[[int], dict[str, Any]] | None = None,
        content: Callable[[int], str | None] | None = None,
    ) -> None:
        self.http = http
        self.ledger = ledger
        self.models = list(models)
        self.timeout = timeout
        self.concurrency = concurrency
        self.stream_every = stream_every
        self.pause = pause
        self.extra = extra
        self.content = content
        self._stop = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._counter = itertools.count()

    def start(self) -> LoadGenerator:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]
        return self

    async def _work(self) -> None:
        while not self._stop.is_set():
            n = next(self._counter)
            # Every (model, stream) pair in turn: JSON and stream for each model.
            model = self.models[(n // max(self.stream_every, 1)) % len(self.models)]
            stream = self.stream_every > 0 and n % self.stream_every == 1
            await send(
                self.http,
                self.ledger,
                model=model,
                stream=stream,
                timeout=self.timeout,
                extra=self.extra(n) if self.extra else None,
                content=self.content(n) if self.content else None,
            )
            await asyncio.sleep(self.pause)

    async def stop(self) -> Ledger:
        """Stop sending and wait for every request in flight to end (each is bounded)."""
        self._stop.set()
        await asyncio.gather(*self._workers)
        return self.ledger


def _problem(
    entry: Entry, allowed: set[int], ok_after: float | None, answers: Mapping[str, str]
) -> str:
    if entry.outcome not in TERMINAL:
        return "not ended well"
    if entry.latency is not None and entry.latency > entry.timeout + GRACE:
        return "late"
    if entry.outcome == "error" and entry.status not in allowed:
        return "unexpected status"
    if ok_after is not None and entry.sent >= ok_after and entry.outcome != "ok":
        return "not served after recovery"
    answer = answers.get(entry.model)
    if entry.outcome == "ok" and answer is not None and entry.text != answer:
        return f"answered {entry.text[:120]!r}, not {answer[:120]!r}"
    return ""


def failures(
    ledger: Ledger,
    *,
    allowed_errors: Iterable[int] = (502, 503, 504),
    ok_after: float | None = None,
    min_requests: int = 1,
    answers: Mapping[str, str] | None = None,
) -> list[Entry]:
    return [e for e, _ in _judge(ledger, set(allowed_errors), ok_after, answers or {})]


def _judge(
    ledger: Ledger, allowed: set[int], ok_after: float | None, answers: Mapping[str, str]
) -> list[tuple[Entry, str]]:
    judged = []
    for entry in ledger.entries:
        problem = _problem(entry, allowed, ok_after, answers)
        if problem:
            judged.append((entry, problem))
    return judged


def assert_ledger(
    ledger: Ledger,
    *,
    allowed_errors: Iterable[int] = (502, 503, 504),
    ok_after: float | None = None,
    min_requests: int = 1,
    answers: Mapping[str, str] | None = None,
) -> None:
    """Every request ended in ok, an OpenAI error with an allowed status, or an error event,
    within its deadline plus GRACE; every ok answer of a model in `answers` (choice 0's text)
    was exactly that model's answer; and, from `ok_after` (monotonic) on, every request sent
    was answered ok."""
    assert len(ledger.entries) >= min_requests, f"only {len(ledger.entries)} requests sent"
    judged = _judge(ledger, set(allowed_errors), ok_after, answers or {})
    problems = [f"{why}: {e.describe()}" for e, why in judged]
    assert not problems, (
        f"{len(problems)} of {len(ledger.entries)} requests broke the contract "
        f"({ledger.summary()}):\n" + "\n".join(problems[:25])
    )


async def wait_full_service(
    http: httpx.AsyncClient,
    *,
    models: Iterable[str],
    since: float,
    within: float = 15.0,
    timeout: float = 10.0,
    streak: int = 6,
    explain: Callable[[list[str]], str] | None = None,
) -> float:
    """Seconds from `since` (monotonic) until `streak` requests in a row (JSON and streams, every
    model) are answered ok; fails past `within`, with `explain(request ids)` of the failed
    requests (the services' log lines about them) when given."""
    models = list(models)
    ledger = Ledger()
    good = 0
    n = 0
    while True:
        now = time.monotonic()
        if now - since > within:
            tail = "\n".join(e.describe() for e in ledger.entries[-6:])
            failed = [e.request_id for e in ledger.entries if e.outcome != "ok" and e.request_id]
            logs = f"\n--- logs ---\n{explain(failed)}" if explain else ""
            raise AssertionError(
                f"no full service {within:.0f}s after recovery ({ledger.summary()}):\n{tail}{logs}"
            )
        entry = await send(
            http,
            ledger,
            model=models[(n // 2) % len(models)],
            stream=n % 2 == 1,
            timeout=min(timeout, max(within - (now - since), 1.0)),
        )
        n += 1
        good = good + 1 if entry.outcome == "ok" else 0
        if good >= streak:
            return time.monotonic() - since
        if entry.outcome != "ok":
            await asyncio.sleep(0.2)
