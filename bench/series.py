"""What is measured, against which targets, in which order.

A target is one way to reach the fake backend: `direct` (the client calls the fake itself),
`router` (api -> dispatcher -> agent -> fake, over RabbitMQ), `floor` and `floor+cache` (the
same shape with nothing else in it, and with a bare cache: `bench/floor.py`, for the series
the targets judge by latency), `litellm` (the LiteLLM proxy in front of the same fake) or
`router@<mode>` (a router of its own in another durability mode, only for the series the modes
section shows). Each round runs every series once, each series on every target back to back;
the order of the targets rotates from round to round, so no target always runs first (warm
caches) or last (a busier machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench import procstat
from bench.config import BenchConfig
from bench.load import LoadResult, chat_body, headers, run_python_json, run_streams, run_wrk
from bench.stack import (
    DUMMY_MODEL,
    INSTANT_MODEL,
    PACED_MODEL,
    SLOW_MODEL,
    Floor,
    Stack,
    router_id,
)

log = logging.getLogger("bench")

DIRECT, ROUTER, LITELLM = "direct", "router", "litellm"
# The bare pipelines (`bench/floor.py`): the design's shape alone, and with its bare cache.
FLOOR, FLOOR_CACHE = "floor", "floor+cache"
FLOORS = (FLOOR, FLOOR_CACHE)


def mode_target(mode: str) -> str:
    """The target of the router running in durability `mode` beside the main one."""
    return f"{ROUTER}@{mode}"


def target_mode(name: str) -> str:
    """The durability mode of a `router@<mode>` target; "" for any other target."""
    return name.removeprefix(f"{ROUTER}@") if name.startswith(f"{ROUTER}@") else ""


@dataclass
class Target:
    name: str
    url: Callable[[str], str]  # fake model -> base URL
    model: Callable[[str], str]  # fake model -> the name to ask for
    pids: Callable[[str], dict[str, int]]  # fake model -> processes whose CPU is the path's
    key: str = "bench"


def with_broker(pids: dict[str, int], beam_pid: int | None) -> dict[str, int]:
    """A path's processes plus RabbitMQ's, whose CPU the path's requests cost too."""
    return pids if beam_pid is None else {**pids, "rabbitmq": beam_pid}


def router_target(name: str, stack: Stack, beam_pid: int | None) -> Target:
    """The path through `stack`'s router; its CPU counts RabbitMQ's too."""

    def pids(model: str) -> dict[str, int]:
        return with_broker(stack.router_pids(model), beam_pid)

    return Target(name, lambda _: stack.api_url, router_id, pids, stack.client_key)


def floor_target(name: str, floor: Floor, beam_pid: int | None) -> Target:
    """A bare pipeline, asked for the fake's own model names; its CPU counts RabbitMQ's too."""
    return Target(
        name, lambda _: floor.url, lambda m: m, lambda m: with_broker(floor.pids[m], beam_pid)
    )


def build_targets(
    stack: Stack,
    beam_pid: int | None,
    with_litellm: bool,
    siblings: Mapping[str, Stack] | None = None,
) -> dict[str, Target]:
    """direct, router, one router@<mode> per sibling (mode -> its stack), litellm."""

    def litellm_pids(_: str) -> dict[str, int]:
        assert stack.litellm is not None
        tree = procstat.with_children([stack.litellm.pid])
        return {("litellm" if i == 0 else f"litellm-{i}"): pid for i, pid in enumerate(tree)}

    targets = {
        DIRECT: Target(DIRECT, lambda m: stack.fakes[m], lambda m: m, lambda _: {}),
        ROUTER: router_target(ROUTER, stack, beam_pid),
    }
    for name, floor in stack.floors.items():
        targets[name] = floor_target(name, floor, beam_pid)
    for mode, sibling in (siblings or {}).items():
        targets[mode_target(mode)] = router_target(mode_target(mode), sibling, beam_pid)
    if with_litellm:
        targets[LITELLM] = Target(
            LITELLM, lambda _: stack.litellm_url, router_id, litellm_pids, stack.litellm_key
        )
    return targets


@dataclass(frozen=True)
class Series:
    key: str
    kind: str  # "json" | "stream"
    model: str  # which fake
    concurrency: int
    same: bool = False  # one identical body (cache hits) instead of unique ones
    only: tuple[str, ...] | None = None  # targets it runs on (None: all but the modes')
    modes: bool = False  # also on the router@<mode> targets (the modes section's series)
    floor: bool = False  # also on the floor targets

    def runs_on(self, target: str) -> bool:
        if target_mode(target):
            return self.modes
        if target in FLOORS:
            return self.floor
        return self.only is None or target in self.only


def plan(config: BenchConfig) -> list[Series]:
    # The durability modes are compared on overhead at c=1, throughput and CPU at c=32 and
    # streams: what a mode could change. The rest would only lengthen the run.
    # The floor runs the series whose targets are latencies (and c=32, for its CPU): how far the
    # router is from the bare shape on the same host, in the same rounds.
    series = [
        Series(f"json_c{c}", "json", INSTANT_MODEL, c, modes=c in (1, 32), floor=c in (1, 32))
        for c in config.json_concurrency
    ]
    series.append(Series("streams", "stream", INSTANT_MODEL, config.stream_concurrency, modes=True))
    series.append(Series("ttft", "stream", PACED_MODEL, 1, floor=True))
    # Diagnostic: time to first token when the backend answers at once. Paced streams leave
    # the cores idle between tokens, and waking a hop from idle costs more than a busy hop;
    # the difference between the two TTFT overheads is that, not the router's own work.
    series.append(
        Series("ttft_instant", "stream", INSTANT_MODEL, 1, only=(DIRECT, ROUTER), floor=True)
    )
    # Diagnostics: the router's own `dummy` model (api + dispatcher, no agent hop, no backend),
    # to tell the cost of the agent hop from the rest.
    series.append(Series("dummy_c1", "json", DUMMY_MODEL, 1, only=(ROUTER,)))
    series.append(Series("dummy_c32", "json", DUMMY_MODEL, 32, only=(ROUTER,)))
    return series


RETAKES = 2  # at most, per LiteLLM run that left a worker idle


def idle_worker(result: LoadResult) -> bool:
    """One of LiteLLM's workers did (almost) none of the run's work."""
    workers = sorted(
        (ms for name, ms in result.cpu_ms.items() if name.startswith(f"{LITELLM}-")),
        reverse=True,
    )
    return len(workers) >= 2 and workers[0] > 0 and workers[1] < 0.1 * workers[0]


def rotated(items: Sequence[str], by: int) -> list[str]:
    k = by % len(items) if items else 0
    return [*items[k:], *items[:k]]


@dataclass
class Results:
    """Every measurement, kept per series, target and round (for medians and the JSON file)."""

    runs: dict[str, dict[str, list[LoadResult]]] = field(default_factory=dict)
    cache_note: str = ""  # why the cache series was not run, when it was not
    scaling: dict[int, list[LoadResult]] = field(default_factory=dict)
    soak: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, str] = field(default_factory=dict)  # name -> summary text

    cache_hits: list[float] = field(default_factory=list)  # per round: share not reaching the fake
    # LiteLLM runs taken again (series, round, times, one worker still idle after them).
    retakes: list[tuple[str, int, int, bool]] = field(default_factory=list)

    def add(self, series: str, target: str, result: LoadResult) -> None:
        self.runs.setdefault(series, {}).setdefault(target, []).append(result)

    def get(self, series: str, target: str) -> list[LoadResult]:
        return self.runs.get(series, {}).get(target, [])


class Runner:
    """Runs series against targets and records CPU of the path around each run."""

    def __init__(self, config: BenchConfig, stack: Stack, targets: dict[str, Target]) -> None:
        self.config = config
        self.stack = stack
        self.targets = targets
        self.use_wrk = config.load_tool == "wrk" or (config.load_tool == "auto" and _has_wrk())
        if config.load_tool == "auto" and not self.use_wrk:
            # A fresh machine has no wrk until `make bench` installs it: say so, or a quick
            # `bench.micro`/`bench.ab` run measures the Python client instead of the router.
            log.warning(
                "wrk is not installed (bench/ensure-wrk.sh installs it): JSON load comes"
                " from the Python generator, which is slower than the router; its figures do"
                " not compare with wrk's"
            )

    async def measure(
        self, target: Target, series: Series, duration: float, *, clients: int | None = None
    ) -> LoadResult:
        url, model = target.url(series.model), target.model(series.model)
        concurrency = clients or series.concurrency
        pids = target.pids(series.model)
        before = procstat.cpu_snapshot(pids.values())
        switched = procstat.switches_snapshot(pids.values())
        if series.kind == "stream":
            result = await run_streams(url, model, concurrency, duration, key=target.key)
        elif self.use_wrk:
            result = await run_wrk(
                url, model, concurrency, duration, same=series.same, key=target.key
            )
        else:
            result = await run_python_json(
                url, model, concurrency, duration, same=series.same, key=target.key
            )
        delta = procstat.cpu_delta(before)
        switches = procstat.switches_delta(switched)
        result.cpu_ms = {name: delta.get(pid, 0.0) for name, pid in pids.items()}
        result.wakeups = {name: switches.get(pid, (0, 0))[0] for name, pid in pids.items()}
        result.preemptions = {name: switches.get(pid, (0, 0))[1] for name, pid in pids.items()}
        return result

    async def warm_up(self, series_list: Iterable[Series]) -> None:
        for series in series_list:
            for name in self._targets_of(series):
                await self.measure(self.targets[name], series, self.config.warmup)

    async def round(self, index: int, series_list: Iterable[Series], results: Results) -> None:
        for series in series_list:
            for name in rotated(self._targets_of(series), index):
                counting = series.same and name == ROUTER
                reached = await self._fake_count(series.model) if counting else 0
                result = await self.measure(self.targets[name], series, self.config.duration)
                if name == LITELLM and series.concurrency > 1:
                    result = await self._with_both_workers(series, index, result, results)
                if counting and result.requests:
                    reached = await self._fake_count(series.model) - reached
                    results.cache_hits.append(1.0 - reached / result.requests)
                results.add(series.key, name, result)
                log.info("round %d %-8s %-8s %s", index + 1, series.key, name, _brief(result))

    async def _with_both_workers(
        self, series: Series, index: int, result: LoadResult, results: Results
    ) -> LoadResult:
        """LiteLLM's run again (up to `RETAKES` times) while one of its workers sat idle.

        Its workers share one listening socket, and a burst of new connections (each run opens
        its own) can all land on one worker: that run measures one worker, not the two the
        comparison is about, at half the throughput. Taking it again is the stricter choice for
        the router; each retake is counted in the report.
        """
        retakes = 0
        while idle_worker(result) and retakes < RETAKES:
            retakes += 1
            log.info(
                "round %d %s litellm: one worker got no connection, again", index + 1, series.key
            )
            result = await self.measure(self.targets[LITELLM], series, self.config.duration)
        if retakes:
            results.retakes.append((series.key, index + 1, retakes, idle_worker(result)))
        return result

    async def _fake_count(self, model: str) -> int:
        async with aiohttp.ClientSession() as session:
            return await _fake_requests(session, self.stack.fakes[model])

    def _targets_of(self, series: Series) -> list[str]:
        return [n for n in self.targets if series.runs_on(n)]

    # --- cache hits --------------------------------------------------------------------------
    async def cache_works(self) -> tuple[bool, str]:
        """Prime one body through the router, repeat it, and see whether the fake saw repeats."""
        router = self.targets[ROUTER]
        fake = self.stack.fakes[INSTANT_MODEL]
        body = chat_body(router_id(INSTANT_MODEL), "", same=True)
        async with aiohttp.ClientSession() as session:
            url = f"{router.url(INSTANT_MODEL)}/v1/chat/completions"
            await _post(session, url, body, router.key)
            await asyncio.sleep(1.0)  # the cache is written from a job.completed event
            before = await _fake_requests(session, fake)
            for _ in range(10):
                await _post(session, url, body, router.key)
            reached = await _fake_requests(session, fake) - before
        if reached <= 1:
            return True, ""
        return False, f"n/a: {reached} of 10 identical requests reached the backend (no cache hit)"

    # --- agent scaling -----------------------------------------------------------------------
    async def scale_to(self, agents: int) -> None:
        current = self.stack.agents.get(SLOW_MODEL, [])
        while len(current) > agents:
            self.stack.stop_agent(SLOW_MODEL)
        while len(current) < agents:
            await self.stack.start_agent(SLOW_MODEL, self.config.scaling_concurrency)
            current = self.stack.agents[SLOW_MODEL]

    async def scaling_round(self, index: int, results: Results) -> None:
        series = Series("scaling", "json", SLOW_MODEL, self.config.scaling_clients)
        router = self.targets[ROUTER]
        for agents in rotated_ints(self.config.scaling_agents, index):
            await self.scale_to(agents)
            await self.measure(router, series, self.config.warmup)
            result = await self.measure(router, series, self.config.duration)
            results.scaling.setdefault(agents, []).append(result)
            log.info("round %d scaling  %d agent(s) %s", index + 1, agents, _brief(result))

    # --- soak ----------------------------------------------------------------------------------
    async def soak(self, results: Results) -> None:
        """Sustained JSON + stream load on the router; RSS of each service before and after."""
        pids = self.stack.service_pids()
        await asyncio.sleep(1.0)
        before = {name: procstat.rss_mb(pid) for name, pid in pids.items()}
        router = self.targets[ROUTER]
        json_series = Series("soak", "json", INSTANT_MODEL, self.config.soak_json_clients)
        stream_series = Series("soak", "stream", INSTANT_MODEL, self.config.soak_stream_clients)
        peak = dict(before)
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                for name, pid in pids.items():
                    peak[name] = max(peak[name], procstat.rss_mb(pid))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout=5.0)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        json_result, stream_result = await asyncio.gather(
            self.measure(router, json_series, self.config.soak),
            self.measure(router, stream_series, self.config.soak),
        )
        done.set()
        await sampler
        elapsed = time.monotonic() - started
        await asyncio.sleep(2.0)  # let in-flight work finish before the last look
        after = {name: procstat.rss_mb(pid) for name, pid in pids.items()}
        results.soak = {
            "seconds": elapsed,
            "requests": json_result.requests + stream_result.requests,
            "errors": json_result.errors + stream_result.errors,
            "rss_before_mb": before,
            "rss_after_mb": after,
            "rss_peak_mb": peak,
        }


def rotated_ints(items: Sequence[int], by: int) -> list[int]:
    k = by % len(items) if items else 0
    return [*items[k:], *items[:k]]


def _has_wrk() -> bool:
    from bench.load import wrk_available

    return wrk_available()


def _brief(r: LoadResult) -> str:
    extra = f" ttft p50 {r.ttft_p50_ms:.2f} ms" if r.ttft_p50_ms is not None else ""
    return f"{r.rps:8.1f}/s p50 {r.p50_ms:7.2f} ms p99 {r.p99_ms:7.2f} ms errors {r.errors}{extra}"


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, key: str) -> bytes:
    async with session.post(url, data=body, headers=headers(key)) as r:
        data = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url} answered {r.status}: {data[:300]!r}")
        return data


async def _fake_requests(session: aiohttp.ClientSession, fake_url: str) -> int:
    async with session.get(f"{fake_url}/_fake/stats") as r:
        return int((await r.json())["requests"])


async def sanity_check(target: Target, model: str) -> None:
    """One JSON answer and one stream through `target`; raises with what came back."""
    url = f"{target.url(model)}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        body = chat_body(target.model(model), "bench sanity")
        async with session.post(url, data=body, headers=headers(target.key)) as r:
            text = await r.text()
            if r.status != 200 or "Hello" not in text:
                raise RuntimeError(f"{target.name} JSON: {r.status} {text[:300]}")
        body = chat_body(target.model(model), "bench sanity", stream=True)
        async with session.post(url, data=body, headers=headers(target.key)) as r:
            text = await r.text()
            if r.status != 200 or not text.rstrip().endswith("data: [DONE]"):
                raise RuntimeError(f"{target.name} stream: {r.status} {text[-300:]}")
