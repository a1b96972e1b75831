"""Load generators: wrk (JSON), an asyncio/aiohttp fallback (JSON), and a stream client.

Every run is bounded in time (and so in count) and talks to 127.0.0.1 only. Each request body
carries a prompt unique to the run and the request, so no cache can answer it, except in the
cache-hit series, which repeats one body on purpose.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from bench.config import ROOT

WRK_SCRIPT = ROOT / "bench" / "wrk" / "chat.lua"
CACHE_PROMPT = "bench cache probe"


@dataclass
class LoadResult:
    """What one run measured. Latencies in ms; per process of the path: `cpu_ms`, and its
    `wakeups` (sleeps it woke from: voluntary context switches) and `preemptions`."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    first_event_p50_ms: float | None = None  # first SSE event of any kind (role-only too)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    wakeups: dict[str, int] = field(default_factory=dict)
    preemptions: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def cpu_per_request(self, names: Callable[[str], bool] = lambda _: True) -> float | None:
        total = sum(ms for name, ms in self.cpu_ms.items() if names(name))
        return total / self.requests if self.requests and self.cpu_ms else None

    def to_json(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "ttft_p50_ms": None if self.ttft_p50_ms is None else round(self.ttft_p50_ms, 3),
            "ttft_p99_ms": None if self.ttft_p99_ms is None else round(self.ttft_p99_ms, 3),
            "first_event_p50_ms": None
            if self.first_event_p50_ms is None
            else round(self.first_event_p50_ms, 3),
            "cpu_ms": {k: round(v, 1) for k, v in self.cpu_ms.items()},
            "wakeups": dict(self.wakeups),
            "preemptions": dict(self.preemptions),
        }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(math.ceil(q / 100.0 * len(ordered)) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


def chat_body(model: str, prompt: str, *, stream: bool = False, same: bool = False) -> bytes:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": CACHE_PROMPT if same else prompt}],
        "max_tokens": 16,
    }
    if same:
        body["temperature"] = 0
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def headers(key: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}


# --- wrk -----------------------------------------------------------------------------------------
def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"wrk (\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "?"


async def run_wrk(
    base_url: str,
    model: str,
    concurrency: int,
    duration: float,
    *,
    same: bool = False,
    key: str = "bench",
) -> LoadResult:
    """One wrk run (1 thread: the client must not take the cores the router needs)."""
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(round(duration), 1)}s"]
    argv += ["--timeout", "10s", "-s", str(WRK_SCRIPT), f"{base_url}/v1/chat/completions"]
    argv += ["--", model, "same" if same else "unique", secrets.token_hex(6), key]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary:\n{text[-2000:]}")
    s = orjson.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(
        int(s[k])
        for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return LoadResult(
        requests=int(s["requests"]) - int(s["status_errors"]),
        errors=errors,
        seconds=int(s["duration_us"]) / 1e6,
        p50_ms=int(s["p50_us"]) / 1000,
        p99_ms=int(s["p99_us"]) / 1000,
    )


# --- the Python fallback for JSON ---------------------------------------------------------------
async def run_python_json(
    base_url: str,
    model: str,
    concurrency: int,
    duration: float,
    *,
    same: bool = False,
    key: str = "bench",
) -> LoadResult:
    """The same load as `run_wrk` from asyncio workers (slower client: use wrk when you can)."""
    url = f"{base_url}/v1/chat/completions"
    hdrs = headers(key)
    nonce = secrets.token_hex(6)
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + duration

        async def worker(wid: int) -> None:
            nonlocal errors
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                body = chat_body(model, f"bench {nonce}-{wid}-{n}", same=same)
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=hdrs) as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        seconds = time.perf_counter() - started
    return LoadResult(
        requests=len(latencies),
        errors=errors,
        seconds=seconds,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
    )


# --- streams -------------------------------------------------------------------------------------
async def run_streams(
    base_url: str, model: str, concurrency: int, duration: float, *, key: str = "bench"
) -> LoadResult:
    """Streams back to back from `concurrency` workers: time to first token and total time.

    TTFT is the time to the first SSE event that carries content text (the role-only event
    before it is timed too, as "first event"); a stream counts only if it ended with
    `data: [DONE]` and carried content.
    """
    url = f"{base_url}/v1/chat/completions"
    hdrs = headers(key)
    nonce = secrets.token_hex(6)
    totals: list[float] = []
    ttfts: list[float] = []
    firsts: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + duration

        async def one(body: bytes) -> tuple[float, float, float] | None:
            t0 = time.perf_counter()
            ttft: float | None = None
            first: float | None = None
            tail = b""
            async with session.post(url, data=body, headers=hdrs) as r:
                if r.status != 200:
                    await r.read()
                    return None
                async for data in r.content.iter_any():
                    if first is None and b"data:" in data:
                        first = time.perf_counter() - t0
                    if ttft is None and b'"content":"' in data and _has_text(data):
                        ttft = time.perf_counter() - t0
                    tail = (tail + data)[-64:]
            if ttft is None or first is None or not tail.rstrip().endswith(b"data: [DONE]"):
                return None
            return first * 1000, ttft * 1000, (time.perf_counter() - t0) * 1000

        async def worker(wid: int) -> None:
            nonlocal errors
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                body = chat_body(model, f"bench {nonce}-{wid}-{n}", stream=True)
                try:
                    result = await one(body)
                except (aiohttp.ClientError, TimeoutError):
                    result = None
                if result is None:
                    errors += 1
                else:
                    firsts.append(result[0])
                    ttfts.append(result[1])
                    totals.append(result[2])

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        seconds = time.perf_counter() - started
    return LoadResult(
        requests=len(totals),
        errors=errors,
        seconds=seconds,
        p50_ms=percentile(totals, 50),
        p99_ms=percentile(totals, 99),
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        first_event_p50_ms=percentile(firsts, 50),
    )


def _has_text(data: bytes) -> bool:
    """True when some `"content":"..."` in these SSE bytes is non-empty."""
    return re.search(rb'"content":"[^"]', data) is not None
