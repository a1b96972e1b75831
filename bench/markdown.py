"""The run's report as markdown (stdout, bench/out/<timestamp>.md, bench/RESULTS.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.series import DIRECT, LITELLM, ROUTER

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"


def _f(value: float | None, fmt: str = "{:.2f}", unit: str = "") -> str:
    return "n/a" if value is None else fmt.format(value) + unit


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def render(meta: dict[str, Any], s: dict[str, Any], rows: list[tuple[str, str, str, str]]) -> str:
    lines = [f"# Router benchmark, {meta['started']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta["setup"].items()]
    lines += ["", "## Targets", ""]
    lines += _table(["target", "goal", "measured", "status"], [list(r) for r in rows])
    sections = (
        _latency, _throughput, _streams, _ttft, _cpu, _c1_path, _floor, _modes, _cache, _scaling,
        _soak, _dummy, _ttft_instant,
    )  # fmt: skip
    for section in sections:
        lines += ["", *section(meta, s)]
    if meta.get("profile"):
        lines += ["", "## Profile (py-spy)", ""]
        for name, text in meta["profile"].items():
            lines += [f"### {name}", "", "```", text, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _overhead_rows(s: dict[str, Any], p50: str, p99: str, extra: int = 0) -> list[list[str]]:
    return [
        [f"**{n} overhead**", _f(s[p50.format(n)]), _f(s[p99.format(n)]), *([""] * extra)]
        for n in (ROUTER, LITELLM)
        if n in s["targets"]
    ]


def _latency(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    body = [[n, _f(s["latency"][n]["p50"]), _f(s["latency"][n]["p99"])] for n in s["targets"]]
    body += _overhead_rows(s, "{}_overhead_p50", "{}_overhead_p99")
    return ["## Latency, JSON, c=1 (ms)", "", *_table(["path", "p50", "p99"], body)]


def _throughput(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    t = s["targets"]
    header = ["clients", *t, "router/direct"]
    if LITELLM in t:
        header.append("router/litellm")
    body = []
    for c, by in s["rps"].items():
        row = [str(c), *(_f(by.get(n), "{:.0f}") for n in t)]
        row.append(_ratio(by.get(ROUTER), by.get(DIRECT)))
        if LITELLM in t:
            row.append(_ratio(by.get(ROUTER), by.get(LITELLM)))
        body.append(row)
    table = _table(header, body)
    return ["## Throughput, JSON (requests/s)", "", *table, *_retakes(s, "json_c")]


def _retakes(s: dict[str, Any], series: str) -> list[str]:
    """Which LiteLLM runs of the series named `series...` were taken again because a worker
    sat idle (see series.py)."""
    retakes = [r for r in s.get("retakes", []) if r[0].startswith(series)]
    if not retakes:
        return []
    still = ", one worker still idle: left out of its median"
    runs = "; ".join(
        f"{key} round {rnd} ({n}x{still if idle else ''})" for key, rnd, n, idle in retakes
    )
    return [
        "",
        "LiteLLM runs taken again because one of its two workers got every connection (they "
        f"share one listening socket), so the run measured one worker: {runs}.",
    ]


def _streams(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    t = s["targets"]
    row = [_f(s["streams"].get(n), "{:.0f}") for n in t]
    header = [*t]
    if LITELLM in t:
        header.append("router/litellm")
        row.append(_ratio(s["streams"].get(ROUTER), s["streams"].get(LITELLM)))
    title = f"## Streams, c={meta['stream_concurrency']} (complete streams/s)"
    return [title, "", *_table(header, [row]), *_retakes(s, "streams")]


def _ttft(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    body = [
        [n, _f(s["ttft"][n]["p50"]), _f(s["ttft"][n]["p99"]), _f(s["ttft"][n]["first_p50"]),
         _f(s["ttft"][n]["total_p50"])]
        for n in s["targets"]
    ]  # fmt: skip
    body += _overhead_rows(s, "{}_ttft_overhead", "{}_ttft_overhead_p99", extra=2)
    header = ["path", "TTFT p50", "TTFT p99", "first event p50", "whole stream p50"]
    return ["## Time to first token, stream, c=1, paced backend (ms)", "", *_table(header, body)]


def _cpu(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    body = []
    for series, key in (("JSON c=32", "cpu"), ("streams", "cpu_streams")):
        for target, per in s[key].items():
            for name, value in per.items():
                body.append([series, target, name, _f(value, "{:.3f}")])
    header = ["series", "path", "process", "CPU ms/request"]
    return ["## CPU per request (ms), JSON c=32 and streams", "", *_table(header, body)]


def _c1_path(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    title = "## Per request at c=1: CPU and wakeups, by process"
    if not s.get("c1_path"):
        return [title, "", "n/a: no per-process figures for JSON c=1"]
    body = [
        [target, name, _f(v["cpu_ms"], "{:.3f}"), _f(v["wakeups"], "{:.1f}"),
         _f(v["preemptions"], "{:.1f}")]
        for target, per in s["c1_path"].items()
        for name, v in per.items()
    ]  # fmt: skip
    header = ["path", "process", "CPU ms", "wakeups", "preemptions"]
    note = (
        "One request in flight: every process on the path sleeps and is woken for its part"
        " (a *wakeup*: a voluntary context switch, summed over its threads); a *preemption*"
        " is an involuntary one, the process put off the CPU for another. Compare the CPU"
        " with the c=32 table above: the difference is the price of running each part alone."
    )
    return [title, "", note, "", *_table(header, body)]


def _floor(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    title = "## The design's floor: the same shape with nothing else in it"
    if not s.get("floor"):
        return [title, "", "n/a: the floor was not run"]
    note = (
        "`bench/floor.py`: api -> RabbitMQ -> dispatcher -> RabbitMQ -> agent -> backend, the"
        " answer back over a reply queue, with the router's default durability (durable queues,"
        " persistent messages, confirms, acks after the next publish) and nothing else: no"
        " validation, authentication, registry or deadlines. `floor+cache` adds the response"
        " cache in its bare shape (a Redis GET before each hand-off, a `completed` message and a"
        " SET after each answer). Measured in the same rounds as the router; each difference is"
        " taken per round, then the median. Overheads and differences in ms."
    )
    floors = s["floor"]["floors"]
    header = ["figure", *floors, ROUTER, *(f"router minus {f}" for f in floors)]
    body = [_floor_row(name, floors, v) for name, v in s["floor"]["rows"].items()]
    return [title, "", note, "", *_table(header, body)]


def _floor_row(name: str, floors: list[str], v: dict[str, float | None]) -> list[str]:
    if name.startswith("requests/s"):  # throughput: a ratio says more than a difference
        values = [_f(v.get(t), "{:.0f}") for t in (*floors, ROUTER)]
        return [name, *values, *(f"router/{f} {_f(v.get(f'vs {f}'), '{:.2f}x')}" for f in floors)]
    fmt, diff = ("{:.3f}", "{:+.3f}") if "CPU" in name else ("{:.2f}", "{:+.2f}")
    values = [_f(v.get(t), fmt) for t in (*floors, ROUTER)]
    return [name, *values, *(_f(v.get(f"vs {f}"), diff) for f in floors)]


def _modes(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    main = s["main_mode"]
    lines = [f"## Durability modes (the targets are judged on {main})", ""]
    missing = meta.get("modes_missing") or {}
    note = "n/a: " + "; ".join(f"{mode} {why}" for mode, why in missing.items()) if missing else ""
    if len(s["modes"]) < 2:  # only the main router's: nothing to compare
        return [*lines, note or "n/a: no other mode asked for (BENCH_MODES)"]
    c = meta["stream_concurrency"]
    header = ["mode", "overhead p50 c=1 (ms)", "RPS c=32"]
    header += ["CPU ms/request c=32 (whole path, incl. RabbitMQ)", f"streams/s c={c}"]
    body = [
        [f"{mode} (main)" if mode == main else mode, _f(v["overhead_p50"]),
         _f(v["rps_c32"], "{:.0f}"), _f(v["cpu_c32"], "{:.3f}"), _f(v["streams"], "{:.0f}")]
        for mode, v in s["modes"].items()
    ]  # fmt: skip
    return [*lines, *_table(header, body), *(["", note] if note else [])]


def _cache(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    lines = ["## Cache-hit path, c=1, one repeated body (ms)", ""]
    if not s.get("cache"):
        return [*lines, s.get("cache_note") or "n/a"]
    c = s["cache"]
    body = [[n, _f(c[n]["p50"]), _f(c[n]["p99"])] for n in (DIRECT, ROUTER)]
    body.append(["**router overhead**", _f(s["cache_overhead"]), _f(s["cache_overhead_p99"])])
    rate = s.get("cache_hit_rate")
    hits = f"router requests answered from the cache: {_f(rate and 100 * rate, '{:.1f}', '%')}"
    return [*lines, hits, "", *_table(["path", "p50", "p99"], body)]


def _scaling(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    first = next(iter(s["scaling"].values()), None)
    ceiling = meta["scaling_ceiling"]  # requests/s one agent can do at most
    body = [
        [str(n), _f(v, "{:.0f}"), _ratio(v, first), f"{n * ceiling:.0f}", _pct(v, n * ceiling)]
        for n, v in s["scaling"].items()
    ]
    header = ["agents", "requests/s", "vs 1 agent", "ceiling", "of ceiling"]
    title = f"## Agent scaling, backend latency {meta['scaling_latency_ms']:.0f} ms"
    note = "ceiling: agents x AGENT_CONCURRENCY / backend latency (the latency-bound maximum)"
    return [title, "", note, "", *_table(header, body)]


def _soak(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    soak = s.get("soak") or {}
    lines = ["## RSS over the soak (MiB)", ""]
    if not soak:
        return [*lines, "not run"]
    lines += [f"{soak['seconds']:.0f} s, {soak['requests']} requests, {soak['errors']} errors", ""]
    body = [
        [name, _f(before, "{:.1f}"), _f(soak["rss_after_mb"][name], "{:.1f}"),
         _f(soak["rss_peak_mb"][name], "{:.1f}"), _f(s["rss_growth"].get(name), "{:+.1f}", "%")]
        for name, before in soak["rss_before_mb"].items()
    ]  # fmt: skip
    return [*lines, *_table(["service", "before", "after", "peak", "growth"], body)]


def _dummy(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    d = s.get("dummy") or {}
    if d.get("p50") is None:
        return []
    cpu = d.get("cpu_c32") or {}
    parts = ", ".join(f"{name} {_f(v, '{:.3f}')}" for name, v in cpu.items())
    return [
        "## Diagnostics: the `dummy` model (api + dispatcher, no agent hop, no backend)",
        "",
        f"- c=1: p50 {_f(d['p50'])} ms, p99 {_f(d['p99'])} ms "
        f"(against the agent path's {_f(s['latency'].get(ROUTER, {}).get('p50'))} ms p50)",
        f"- c=32: {_f(d['rps_c32'], '{:.0f}')} requests/s; CPU ms/request: {parts or 'n/a'}",
    ]


def _ttft_instant(meta: dict[str, Any], s: dict[str, Any]) -> list[str]:
    instant = s.get("ttft_instant_overhead")
    if instant is None:
        return []
    return [
        "## Diagnostics: time to first token from an instant backend (stream, c=1)",
        "",
        f"- router TTFT overhead p50: {_f(instant)} ms with the instant backend, "
        f"{_f(s.get(f'{ROUTER}_ttft_overhead'))} ms with the paced one (the target's series).",
        "- Between paced tokens the cores go idle, and each hop of the path then wakes from",
        "  idle: the difference is that cost, not work the router does.",
    ]


def _pct(a: float | None, b: float) -> str:
    return f"{100 * a / b:.0f}%" if a is not None and b else "n/a"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def fill_results(path: Path, report: str) -> bool:
    """Replace the block between the markers of bench/RESULTS.md; False if they are missing."""
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return False
    # One heading level down: the template's own title stays the page's only H1.
    shifted = "\n".join(
        "#" + line if line.startswith("#") else line for line in report.rstrip().splitlines()
    )
    block = f"{BEGIN}\n{shifted}\n{END}"
    path.write_text(pattern.sub(lambda _: block, text))
    return True
