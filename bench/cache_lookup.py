"""`python -m bench.cache_lookup`: the dispatcher's Redis cost per cache lookup, on its own.

Runs `RedisStore` against `REDIS_URL` (default: the machine's Redis) on fresh keys, and reports
wall time and this process's CPU per lookup for:

- a deterministic miss, one at a time: the probe that also takes the single-flight lock, and,
  for comparison, a probe followed by a separate `SET NX PX` (how it was done before);
- a probe alone, and 32 probes at once (how they arrive under load), which the store sends as
  one batch; each also for sampled jobs (not deterministic, so no single flight), whose probes
  read only the entry, with MGET instead of the script.

Then a sampled job's probe after the process slept `IDLE_MS` (default 20: a dispatcher between
the jobs of paced streams), p50 and p90 of `IDLE_LOOKUPS` (default 300), through the store as it
runs (its pipelined connection, services/dispatcher/resp.py) and through a store on redis-py
alone, taken in turn.

`LOOKUPS` (default 2000) sets how many per row; `ROUNDS` (default 2) repeats the rows in turn.
Keys live under `bench-lookup:<hex>` and are deleted at the end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable

import uvloop
from redis.asyncio import Redis

from services.dispatcher.cache import LockRequest, RedisStore
from services.dispatcher.cache_key import lock_key
from shared.settings import RedisSettings


async def after_idle(stores: dict[str, RedisStore], fresh: Callable[[], str]) -> None:
    """A sampled probe after the process slept `IDLE_MS`, through each store in turn."""
    idle = float(os.environ.get("IDLE_MS", "20")) / 1000
    took: dict[str, list[float]] = {name: [] for name in stores}
    for _ in range(int(os.environ.get("IDLE_LOOKUPS", "300"))):
        for name, each in stores.items():
            await asyncio.sleep(idle)
            started = time.perf_counter()
            await each.probe(fresh(), lock_state=False)
            took[name].append((time.perf_counter() - started) * 1e6)
    for name, times in took.items():
        times.sort()
        p50, p90 = statistics.median(times), times[int(len(times) * 0.9)]
        label = f"sampled probe after {idle * 1000:.0f} ms idle, {name}"
        print(f"{label:52} p50 {p50:6.0f} us  p90 {p90:6.0f} us", flush=True)


async def main() -> None:
    url = RedisSettings().redis_url  # the dispatcher's own setting and default
    if not url:
        raise SystemExit("bench.cache_lookup: REDIS_URL is empty (the cache is off)")
    lookups = int(os.environ.get("LOOKUPS", "2000"))
    rounds = int(os.environ.get("ROUNDS", "2"))
    prefix = f"bench-lookup:{secrets.token_hex(4)}"
    store = RedisStore.from_url(url, timeout=1.0)
    made: list[str] = []
    counter = 0

    def fresh() -> str:
        nonlocal counter
        counter += 1
        key = f"{prefix}:{counter}"
        made.extend((key, lock_key(key)))
        return key

    async def merged() -> None:
        probe = await store.probe(fresh(), LockRequest("bench", 5000))
        assert probe.acquired

    async def separate() -> None:
        key = fresh()
        await store.probe(key)
        assert await store.acquire(key, "bench", 5000)

    async def single() -> None:
        await store.probe(fresh())

    async def sampled() -> None:
        await store.probe(fresh(), lock_state=False)

    async def burst() -> None:
        await asyncio.gather(*(store.probe(fresh()) for _ in range(32)))

    async def sampled_burst() -> None:
        await asyncio.gather(*(store.probe(fresh(), lock_state=False) for _ in range(32)))

    rows: list[tuple[str, Callable[[], Awaitable[None]], int]] = [
        ("miss, probe and lock in one call", merged, 1),
        ("miss, probe then SET NX (before)", separate, 1),
        ("one probe at a time", single, 1),
        ("one sampled job's probe (MGET)", sampled, 1),
        ("32 probes at once (per probe)", burst, 32),
        ("32 sampled at once (per probe)", sampled_burst, 32),
    ]

    on_redis_py = RedisStore(Redis.from_url(url), timeout=1.0)
    try:
        await merged()  # loads the script
        for _ in range(rounds):
            for name, run, per_call in rows:
                calls = max(lookups // per_call, 1)
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    await run()
                n = calls * per_call
                wall_us = (time.perf_counter() - wall) / n * 1e6
                cpu_us = (time.process_time() - cpu) / n * 1e6
                print(f"{name:36} wall {wall_us:6.0f} us  cpu {cpu_us:6.0f} us", flush=True)
        await on_redis_py.probe(fresh(), lock_state=False)  # connected
        await after_idle({"pipelined": store, "redis-py": on_redis_py}, fresh)
    finally:
        redis = Redis.from_url(url)
        for i in range(0, len(made), 1000):
            await redis.delete(*made[i : i + 1000])
        await redis.aclose()
        await store.aclose()
        await on_redis_py.aclose()


if __name__ == "__main__":
    uvloop.run(main())
