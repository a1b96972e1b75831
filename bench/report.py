"""From the measurements to numbers, a markdown table and the met/missed verdicts.

Each figure is the median over rounds. An overhead is computed per round (router minus direct,
measured back to back) and then the median taken; a ratio is the ratio of the medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bench.config import BenchConfig
from bench.load import LoadResult
from bench.series import DIRECT, FLOORS, LITELLM, ROUTER, Results, idle_worker, mode_target


def med(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def overhead(
    results: Results,
    series: str,
    target: str,
    pick: Callable[[LoadResult], float | None],
    base: str = DIRECT,
) -> float | None:
    """Median over rounds of target minus `base` (direct), on the figure `pick` reads."""
    mine, theirs = results.get(series, target), results.get(series, base)
    diffs: list[float | None] = []
    for a, b in zip(mine, theirs, strict=False):
        x, y = pick(a), pick(b)
        diffs.append(x - y if x is not None and y is not None else None)
    return med(diffs)


def cpu_per_request(runs: list[LoadResult], name_filter: Callable[[str], bool]) -> float | None:
    return med([r.cpu_per_request(name_filter) for r in runs])


@dataclass(frozen=True)
class Target:
    key: str
    text: str
    goal: str
    check: Callable[[float], bool]
    unit: str
    series: str = ""  # the series it is judged on, whose runs must have failed no request
    against: tuple[str, ...] = (DIRECT,)  # what the router is compared with there


TARGETS = [
    Target(
        "overhead_p50", "Router overhead p50, c=1", "<= 2.5 ms", lambda v: v <= 2.5, "ms",
        "json_c1",
    ),
    Target(
        "overhead_p99", "Router overhead p99, c=1", "<= 8 ms", lambda v: v <= 8.0, "ms",
        "json_c1",
    ),
    Target(
        "rps_c32_vs_litellm", "RPS at c=32 vs LiteLLM", ">= 4x", lambda v: v >= 4.0, "x",
        "json_c32", (LITELLM,),
    ),
    Target(
        "streams_vs_litellm", "Streams/s vs LiteLLM", ">= 6x", lambda v: v >= 6.0, "x",
        "streams", (LITELLM,),
    ),
    Target("ttft_overhead", "TTFT overhead p50, c=1", "<= 3 ms", lambda v: v <= 3.0, "ms", "ttft"),
    Target(
        "cache_overhead", "Cache-hit overhead p50, c=1", "<= 1.5 ms", lambda v: v <= 1.5, "ms",
        "cache",
    ),
    Target(
        "cpu_ms", "Whole-path CPU per request", "<= 2.5 ms", lambda v: v <= 2.5, "ms",
        "json_c32", (),
    ),
    Target("rss_growth", "RSS growth over the soak", "< 10%", lambda v: v < 10.0, "%"),
    Target("scaling", "Agent throughput 1 -> 4 agents", ">= 3.6x", lambda v: v >= 3.6, "x"),
]  # fmt: skip


def failed(runs: Iterable[LoadResult]) -> int:
    """Failed requests in `runs`, and one for each run that completed none: figures drawn
    from such runs describe errors (a fast 404 is a low latency), not the path."""
    return sum(r.errors + (0 if r.requests else 1) for r in runs)


def two_worker_runs(runs: list[LoadResult]) -> list[LoadResult]:
    """LiteLLM's runs with both workers working: one still idle after its retakes measured
    one worker, half the throughput the comparison is about, and is left out."""
    return [r for r in runs if not idle_worker(r)]


def summarise(config: BenchConfig, results: Results) -> dict[str, Any]:
    """Every headline figure (None where it could not be measured)."""
    s: dict[str, Any] = {}
    has_litellm = bool(results.get("json_c1", LITELLM))
    targets = [t for t in (DIRECT, ROUTER, LITELLM) if results.get("json_c1", t)]
    s["targets"] = targets
    s["latency"] = {
        t: {
            "p50": med([r.p50_ms for r in results.get("json_c1", t)]),
            "p99": med([r.p99_ms for r in results.get("json_c1", t)]),
        }
        for t in targets
    }
    for t in (ROUTER, LITELLM):
        s[f"{t}_overhead_p50"] = overhead(results, "json_c1", t, lambda r: r.p50_ms)
        s[f"{t}_overhead_p99"] = overhead(results, "json_c1", t, lambda r: r.p99_ms)
    s["rps"] = {
        c: {t: med([r.rps for r in _compared(results, f"json_c{c}", t)]) for t in targets}
        for c in config.json_concurrency
    }
    s["streams"] = {t: med([r.rps for r in _compared(results, "streams", t)]) for t in targets}
    s["ttft"] = {
        t: {
            "p50": med([r.ttft_p50_ms for r in results.get("ttft", t)]),
            "p99": med([r.ttft_p99_ms for r in results.get("ttft", t)]),
            "total_p50": med([r.p50_ms for r in results.get("ttft", t)]),
            "first_p50": med([r.first_event_p50_ms for r in results.get("ttft", t)]),
        }
        for t in targets
    }
    for t in (ROUTER, LITELLM):
        s[f"{t}_ttft_overhead"] = overhead(results, "ttft", t, lambda r: r.ttft_p50_ms)
        s[f"{t}_ttft_overhead_p99"] = overhead(results, "ttft", t, lambda r: r.ttft_p99_ms)
    s["ttft_instant_overhead"] = overhead(results, "ttft_instant", ROUTER, lambda r: r.ttft_p50_ms)
    if results.get("cache", ROUTER):
        s["cache"] = {
            t: {
                "p50": med([r.p50_ms for r in results.get("cache", t)]),
                "p99": med([r.p99_ms for r in results.get("cache", t)]),
            }
            for t in (DIRECT, ROUTER)
        }
        s["cache_overhead"] = overhead(results, "cache", ROUTER, lambda r: r.p50_ms)
        s["cache_overhead_p99"] = overhead(results, "cache", ROUTER, lambda r: r.p99_ms)
        s["cache_hit_rate"] = med(results.cache_hits)
    s["cache_note"] = results.cache_note
    c1, c32 = results.get("dummy_c1", ROUTER), results.get("dummy_c32", ROUTER)
    s["dummy"] = {
        "p50": med([r.p50_ms for r in c1]),
        "p99": med([r.p99_ms for r in c1]),
        "rps_c32": med([r.rps for r in c32]),
        "cpu_c32": _cpu(results, "dummy_c32").get(ROUTER, {}),
    }
    s["cpu"] = _cpu(results, "json_c32")
    s["c1_path"] = _c1_path(results)
    s["cpu_streams"] = _cpu(results, "streams")
    s["main_mode"] = config.durability
    s["retakes"] = list(results.retakes)
    s["modes"] = _modes(config, results)
    s["floor"] = _floor(results)
    s["scaling"] = {n: med([r.rps for r in runs]) for n, runs in sorted(results.scaling.items())}
    first, last = min(results.scaling, default=None), max(results.scaling, default=None)
    s["scaling_ratio"] = (
        ratio(s["scaling"][last], s["scaling"][first])
        if first is not None and last != first
        else None
    )
    s["soak"] = results.soak
    if results.soak:
        before, after = results.soak["rss_before_mb"], results.soak["rss_after_mb"]
        # A service with no RSS at either end was not running: it died (an out-of-memory
        # kill is what a soak looks for), and its growth is not -100%.
        s["soak_gone"] = sorted(n for n in before if not before[n] or not after.get(n))
        s["rss_growth"] = {
            name: 100.0 * (after[name] - mb) / mb
            for name, mb in before.items()
            if name not in s["soak_gone"]
        }
    s["failed"] = {
        t.key: {
            target: failed(results.get(t.series, target))
            for target in (ROUTER, *t.against)
            if results.get(t.series, target)
        }
        for t in TARGETS
        if t.series
    }
    s["failed"]["scaling"] = {
        f"{n} agents": failed(runs) for n, runs in sorted(results.scaling.items())
    }
    s["litellm_idle_only"] = [
        series
        for series in ("json_c32", "streams")
        if results.get(series, LITELLM) and not two_worker_runs(results.get(series, LITELLM))
    ]
    cpu_runs = results.get("json_c32", ROUTER)
    s["broker_counted"] = bool(cpu_runs) and all("rabbitmq" in r.cpu_ms for r in cpu_runs)
    values = {
        "overhead_p50": s[f"{ROUTER}_overhead_p50"],
        "overhead_p99": s[f"{ROUTER}_overhead_p99"],
        "rps_c32_vs_litellm": ratio(
            s["rps"].get(32, {}).get(ROUTER), s["rps"].get(32, {}).get(LITELLM)
        )
        if has_litellm
        else None,
        "streams_vs_litellm": ratio(s["streams"].get(ROUTER), s["streams"].get(LITELLM))
        if has_litellm
        else None,
        "ttft_overhead": s[f"{ROUTER}_ttft_overhead"],
        "cache_overhead": s.get("cache_overhead"),
        "cpu_ms": s["cpu"].get(ROUTER, {}).get("whole path") if s["broker_counted"] else None,
        "rss_growth": max(s["rss_growth"].values()) if s.get("rss_growth") else None,
        "scaling": s["scaling_ratio"],
    }
    s["values"] = values
    return s


def _compared(results: Results, series: str, target: str) -> list[LoadResult]:
    runs = results.get(series, target)
    return two_worker_runs(runs) if target == LITELLM and series != "json_c1" else runs


def _cpu(results: Results, series: str) -> dict[str, dict[str, float | None]]:
    """ms of CPU per request, per process and for the whole path, for router and LiteLLM."""
    out: dict[str, dict[str, float | None]] = {}
    for t in (ROUTER, LITELLM):
        runs = results.get(series, t)
        if not runs or not runs[0].cpu_ms:
            continue
        names = list(runs[0].cpu_ms)
        per = {n: cpu_per_request(runs, lambda x, n=n: x == n) for n in names}  # type: ignore[misc]
        if t == ROUTER:
            per["without rabbitmq"] = cpu_per_request(runs, lambda x: x != "rabbitmq")
        per["whole path"] = cpu_per_request(runs, lambda _: True)
        out[t] = per
    return out


def _c1_path(results: Results) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per request at c=1 (JSON), for router and LiteLLM, per process and for the whole path:
    CPU ms, wakeups (sleeps ended) and preemptions, each the median over the rounds. One
    request in flight shares no wakeup with another, so this is what a request costs alone."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for t in (ROUTER, LITELLM):
        runs = [r for r in results.get("json_c1", t) if r.requests and r.cpu_ms]
        if not runs:
            continue
        names = [*runs[0].cpu_ms, "whole path"]
        per: dict[str, dict[str, float | None]] = {}
        for n in names:
            wanted = (lambda _: True) if n == "whole path" else (lambda x, n=n: x == n)  # type: ignore[misc]
            per[n] = {
                "cpu_ms": med([_count(r.cpu_ms, wanted) / r.requests for r in runs]),
                "wakeups": med([_count(r.wakeups, wanted) / r.requests for r in runs]),
                "preemptions": med([_count(r.preemptions, wanted) / r.requests for r in runs]),
            }
        out[t] = per
    return out


def _count(values: dict[str, float] | dict[str, int], wanted: Callable[[str], bool]) -> float:
    return float(sum(v for name, v in values.items() if wanted(name)))


def _modes(config: BenchConfig, results: Results) -> dict[str, dict[str, float | None]]:
    """The modes section's figures, per durability mode measured (the main router's first)."""
    targets = {config.durability: ROUTER} | {m: mode_target(m) for m in config.modes}
    return {
        mode: {
            "overhead_p50": overhead(results, "json_c1", t, lambda r: r.p50_ms),
            "rps_c32": med([r.rps for r in results.get("json_c32", t)]),
            "cpu_c32": cpu_per_request(results.get("json_c32", t), lambda _: True),
            "streams": med([r.rps for r in results.get("streams", t)]),
        }
        for mode, t in targets.items()
        if results.get("json_c1", t)
    }


def _floor(results: Results) -> dict[str, Any]:
    """The bare pipelines (`bench/floor.py`) beside the router, measured in the same rounds.

    `floors`: the floor targets that ran; `rows`: per figure, each floor's and the router's
    value, and under `vs <floor>` the router's distance from that floor (a difference, taken
    per round and then the median, so a slow round moves both sides together; for requests/s,
    the ratio of the medians).
    """
    floors = [f for f in FLOORS if results.get("json_c1", f)]
    if not floors:
        return {}

    def p50(r: LoadResult) -> float | None:
        return r.p50_ms

    def p99(r: LoadResult) -> float | None:
        return r.p99_ms

    def ttft(r: LoadResult) -> float | None:
        return r.ttft_p50_ms

    figures = {
        "overhead p50, JSON c=1": ("json_c1", p50),
        "overhead p99, JSON c=1": ("json_c1", p99),
        "TTFT overhead p50, paced": ("ttft", ttft),
        "TTFT overhead p50, instant": ("ttft_instant", ttft),
    }
    rows: dict[str, dict[str, float | None]] = {}
    for name, (series, pick) in figures.items():
        present = [f for f in floors if results.get(series, f)]
        if present:
            rows[name] = {
                **{f: overhead(results, series, f, pick) for f in present},
                ROUTER: overhead(results, series, ROUTER, pick),
                **{f"vs {f}": overhead(results, series, ROUTER, pick, base=f) for f in present},
            }
    present = [f for f in floors if results.get("json_c32", f)]
    if present:
        runs = {t: results.get("json_c32", t) for t in (*present, ROUTER)}
        rps = {t: med([r.rps for r in each]) for t, each in runs.items()}
        cpu = {t: cpu_per_request(each, lambda _: True) for t, each in runs.items()}
        rows["requests/s, JSON c=32"] = {
            **rps,
            **{f"vs {f}": ratio(rps[ROUTER], rps[f]) for f in present},
        }
        rows["whole-path CPU ms per request, JSON c=32"] = {
            **cpu,
            **{f"vs {f}": _minus(cpu[ROUTER], cpu[f]) for f in present},
        }
    return {"floors": floors, "rows": rows}


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def verdicts(config: BenchConfig, summary: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, goal, measured, met/missed/n/a) for each target of the issue."""
    rows = []
    for t in TARGETS:
        value = summary["values"].get(t.key)
        refused = _refusal(t, summary)
        if refused is not None:
            rows.append((t.text, t.goal, *refused))
            continue
        if value is None:
            why = _why_missing(t.key, summary)
            rows.append((t.text, t.goal, why, "n/a"))
            continue
        shown = _digits_that_agree(value, t.check)
        measured = f"{shown} {t.unit}" if t.unit != "x" else f"{shown}x"
        status = "met" if t.check(value) else "missed"
        if t.key == "rss_growth" and config.soak < 600:
            measured += f" (soak {config.soak:.0f} s, not 600: indicative)"
        rate = summary.get("cache_hit_rate")
        if t.key == "cache_overhead" and rate is not None and rate < 0.99:
            measured += f" (only {100 * rate:.0f}% were hits)"
        rows.append((t.text, t.goal, measured, status))
    return rows


def _refusal(t: Target, summary: dict[str, Any]) -> tuple[str, str] | None:
    """(measured, status) for a target whose figure cannot stand, else None: the router
    failed requests (missed: a failure is no speed), a baseline did (n/a: its figure is not
    the path's), or a service died during the soak (missed)."""
    failures = {name: n for name, n in summary.get("failed", {}).get(t.key, {}).items() if n}
    if failures:
        said = ", ".join(f"{name} {n}" for name, n in failures.items())
        router_failed = ROUTER in failures or t.key == "scaling"
        return f"failed requests ({said})", "missed" if router_failed else "n/a"
    if t.key == "rss_growth" and summary.get("soak"):
        gone = summary.get("soak_gone") or []
        errors = summary["soak"].get("errors", 0)
        if gone:
            return f"{', '.join(gone)} not running after the soak", "missed"
        if errors:
            return f"{errors} failed requests in the soak", "missed"
    return None


def _digits_that_agree(value: float, check: Callable[[float], bool]) -> str:
    """Two decimals, or more where rounding would tell the other verdict: 3.996x beside
    "missed" must not read 4.00x."""
    for digits in (2, 3, 4):
        shown = f"{value:.{digits}f}"
        if check(float(shown)) == check(value):
            return shown
    return repr(value)


def _why_missing(key: str, summary: dict[str, Any]) -> str:
    if key in ("rps_c32_vs_litellm", "streams_vs_litellm") and LITELLM not in summary["targets"]:
        return "no LiteLLM (run `make bench-peers`)"
    if key == "cache_overhead":
        return summary.get("cache_note") or "no cache series"
    if key == "cpu_ms" and summary["cpu"].get(ROUTER) and not summary.get("broker_counted"):
        return "RabbitMQ's process not found: the whole path's CPU cannot be counted"
    series = {"rps_c32_vs_litellm": "json_c32", "streams_vs_litellm": "streams"}.get(key)
    if series in summary.get("litellm_idle_only", ()):
        return "LiteLLM had a worker idle in every run"
    return "not measured"
