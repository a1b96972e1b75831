"""The harness's pure parts (`.venv/bin/pytest bench/test_bench.py`; no processes, and sockets
only to a closed port)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from bench import ab, procstat, versions, wakeup
from bench.__main__ import clean_broker
from bench.config import ROOT, BenchConfig
from bench.load import LoadResult, percentile
from bench.markdown import BEGIN, END, fill_results, render
from bench.profile import summarise as summarise_profile
from bench.report import summarise, verdicts
from bench.series import (
    DIRECT,
    FLOOR,
    FLOOR_CACHE,
    LITELLM,
    ROUTER,
    Results,
    Runner,
    Series,
    idle_worker,
    mode_target,
    plan,
    rotated,
)
from bench.stack import INSTANT_MODEL, PACED_MODEL, Stack, litellm_config, router_id
from shared.settings import RedisSettings


def result(rps: float, p50: float, p99: float, **kw: object) -> LoadResult:
    return LoadResult(requests=int(rps * 10), errors=0, seconds=10.0, p50_ms=p50, p99_ms=p99, **kw)  # type: ignore[arg-type]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) == 0.0


def test_rotation_moves_every_target_to_the_front_once() -> None:
    targets = [DIRECT, ROUTER, LITELLM]
    assert [rotated(targets, i)[0] for i in range(3)] == [DIRECT, ROUTER, LITELLM]


def test_quick_config_and_overrides() -> None:
    quick = BenchConfig.from_env({"BENCH_QUICK": "1", "BENCH_ROUNDS": "5"})
    assert (quick.quick, quick.rounds, quick.duration, quick.soak) == (True, 5, 2.0, 15.0)
    assert not quick.should_write_results
    full = BenchConfig.from_env({})
    assert (full.rounds, full.soak, full.agent_concurrency) == (3, 600.0, 64)
    assert full.should_write_results


def test_modes_default_to_the_two_beside_the_main_one_and_an_empty_list_disables_them() -> None:
    assert BenchConfig.from_env({}).modes == ("transient", "quorum")
    assert BenchConfig.from_env({"BENCH_DURABILITY": "quorum"}).modes == ("transient", "durable")
    assert BenchConfig.from_env({"BENCH_MODES": "quorum, durable"}).modes == ("quorum",)
    assert BenchConfig.from_env({"BENCH_MODES": ""}).modes == ()
    with pytest.raises(ValueError, match="BENCH_MODES"):
        BenchConfig.from_env({"BENCH_MODES": "lazy"})


def test_the_main_mode_is_checked_too_and_the_others_are_measured_beside_it() -> None:
    config = BenchConfig.from_env({"BENCH_DURABILITY": " Quorum "})
    assert config.durability == "quorum"
    assert config.modes == ("transient", "durable")
    with pytest.raises(ValueError, match="BENCH_DURABILITY: 'lazy' is not one of"):
        BenchConfig.from_env({"BENCH_DURABILITY": "lazy"})


def test_only_the_modes_section_series_run_on_the_mode_targets() -> None:
    series = plan(BenchConfig())
    on_mode = [s.key for s in series if s.runs_on(mode_target("quorum"))]
    assert on_mode == ["json_c1", "json_c32", "streams"]
    on_router = [s.key for s in series if s.runs_on(ROUTER)]
    assert on_router == [s.key for s in series]  # the main router keeps every series
    assert [s.key for s in series if s.runs_on(DIRECT)] == [
        s.key for s in series if not s.key.startswith("dummy")
    ]


def test_litellm_config_names_each_fake_as_the_router_does() -> None:
    text = litellm_config({"m": "http://127.0.0.1:1"})
    assert f"model_name: {router_id('m')}" in text
    assert "api_base: http://127.0.0.1:1/v1" in text


def _results() -> Results:
    r = Results()
    for direct_p50, router_p50 in ((0.2, 2.2), (0.3, 2.0), (0.2, 9.0)):
        r.add("json_c1", DIRECT, result(4000, direct_p50, 1.0))
        r.add("json_c1", ROUTER, result(400, router_p50, 6.0))
        r.add("json_c1", LITELLM, result(100, 10.0, 30.0))
        r.add("json_c32", ROUTER, result(1000, 30, 60, cpu_ms={"api": 5000.0, "rabbitmq": 5000.0}))
        r.add("json_c32", LITELLM, result(200, 100, 200))
    r.scaling = {1: [result(40, 50, 60)], 4: [result(150, 50, 60)]}
    return r


def _meta() -> dict[str, object]:
    """What `render` needs of a run besides its summary."""
    return {
        "started": "now",
        "setup": {},
        "stream_concurrency": 32,
        "scaling_latency_ms": 50.0,
        "scaling_ceiling": 40.0,
    }


def test_overhead_is_the_median_of_per_round_differences() -> None:
    s = summarise(BenchConfig(json_concurrency=(1, 32)), _results())
    assert s["router_overhead_p50"] == pytest.approx(2.0)  # rounds: 2.0, 1.7, 8.8
    assert s["values"]["rps_c32_vs_litellm"] == pytest.approx(5.0)
    assert s["values"]["cpu_ms"] == pytest.approx(1.0)  # 10 s of CPU over 10,000 requests
    assert s["values"]["scaling"] == pytest.approx(3.75)


def test_verdicts_say_met_missed_and_why_not_measured() -> None:
    config = BenchConfig(json_concurrency=(1, 32))
    rows = {row[0]: row for row in verdicts(config, summarise(config, _results()))}
    assert rows["Router overhead p50, c=1"][3] == "met"
    assert rows["Agent throughput 1 -> 4 agents"][3] == "met"
    assert rows["Router overhead p99, c=1"][3] == "met"
    assert rows["Streams/s vs LiteLLM"][2:] == ("not measured", "n/a")  # no stream series here
    assert rows["Cache-hit overhead p50, c=1"][3] == "n/a"


def test_a_measured_value_never_reads_as_the_other_verdict() -> None:
    config = BenchConfig(json_concurrency=(1, 32))
    s = summarise(config, _results())
    rows = {row[0]: row for row in verdicts(config, s)}
    assert rows["RPS at c=32 vs LiteLLM"][2:] == ("5.00x", "met")  # two decimals as a rule
    s["values"]["rps_c32_vs_litellm"] = 3.9956  # the run of 2026-11-27 05:06 printed "4.00x"
    s["values"]["overhead_p50"] = 2.5041
    rows = {row[0]: row for row in verdicts(config, s)}
    assert rows["RPS at c=32 vs LiteLLM"][2:] == ("3.996x", "missed")
    assert rows["Router overhead p50, c=1"][2:] == ("2.504 ms", "missed")


def test_results_md_block_is_replaced_and_headings_shifted(tmp_path: Path) -> None:
    page = tmp_path / "RESULTS.md"
    page.write_text(f"# Results\n\nintro\n\n{BEGIN}\nold\n{END}\n")
    config = BenchConfig(json_concurrency=(1, 32))
    s = summarise(config, _results())
    meta = {
        "started": "now",
        "setup": {"machine": "test"},
        "stream_concurrency": 32,
        "scaling_latency_ms": 50.0,
        "scaling_ceiling": 40.0,
    }
    assert fill_results(page, render(meta, s, verdicts(config, s)))
    text = page.read_text()
    assert text.startswith("# Results\n\nintro")
    assert "old" not in text
    assert "## Router benchmark, now" in text and "### Targets" in text


def test_profile_summary_names_native_time_and_skips_entry_frames(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    lib = "/x/lib/python3.11"
    raw.write_text(
        f"main (/w/services/cli.py:1);Runner.run ({lib}/asyncio/runners.py:118) 3\n"
        f"main (/w/services/cli.py:1);publish (/w/shared/amqp.py:9);"
        f"StreamWriter.write ({lib}/asyncio/streams.py:325) 1\n"
    )
    text = summarise_profile(raw)
    assert "75.0%  [event loop" in text
    assert "25.0%  [socket send" in text
    assert "publish (shared/amqp)" in text
    assert "services/cli" not in text


def test_the_instant_ttft_diagnostic_is_reported_beside_the_paced_target() -> None:
    config = BenchConfig(json_concurrency=(1, 32))
    results = _results()
    for direct, router in ((1.0, 4.0), (1.2, 4.6), (0.9, 3.8)):
        results.add("ttft", DIRECT, result(10, 70, 80, ttft_p50_ms=direct, ttft_p99_ms=direct))
        results.add("ttft", ROUTER, result(10, 75, 85, ttft_p50_ms=router, ttft_p99_ms=router))
    for direct, router in ((0.3, 3.0), (0.4, 3.4), (0.3, 3.1)):
        results.add("ttft_instant", DIRECT, result(500, 1, 2, ttft_p50_ms=direct))
        results.add("ttft_instant", ROUTER, result(300, 3, 4, ttft_p50_ms=router))
    s = summarise(config, results)
    assert s["ttft_instant_overhead"] == pytest.approx(2.8)  # per round: 2.7, 3.0, 2.8
    assert s["router_ttft_overhead"] == pytest.approx(3.0)  # per round: 3.0, 3.4, 2.9
    meta = _meta()
    text = render(meta, s, verdicts(config, s))
    assert "2.80 ms with the instant backend, 3.00 ms with the paced one" in text


def test_the_modes_section_has_a_row_per_mode_or_says_why_not() -> None:
    config = BenchConfig(json_concurrency=(1, 32), modes=("transient", "quorum"))
    results = _results()
    for direct_p50, mode_p50 in ((0.2, 1.7), (0.3, 1.8), (0.2, 1.6)):
        results.add("json_c1", mode_target("transient"), result(500, mode_p50, 5.0))
        results.add("json_c1", mode_target("quorum"), result(300, mode_p50 + direct_p50 + 1, 9.0))
    for _ in range(3):
        cpu = {"api": 4000.0, "rabbitmq": 4000.0}
        results.add("json_c32", mode_target("transient"), result(1200, 25, 50, cpu_ms=cpu))
        results.add("streams", mode_target("transient"), result(150, 200, 300))
    s = summarise(config, results)
    assert list(s["modes"]) == ["durable", "transient", "quorum"]
    assert s["modes"]["transient"]["overhead_p50"] == pytest.approx(1.5)  # 1.5, 1.5, 1.4
    assert s["modes"]["quorum"]["overhead_p50"] == pytest.approx(2.7)  # 2.7, 2.8, 2.6
    meta = _meta()
    text = render(meta, s, verdicts(config, s))
    assert "## Durability modes (the targets are judged on durable)" in text
    assert "| durable (main) | 2.00 | 1000 | 1.000 | n/a |" in text
    assert "| transient | 1.50 | 1200 | 0.667 | 150 |" in text
    assert "| quorum | 2.70 | n/a | n/a | n/a |" in text

    alone = summarise(BenchConfig(json_concurrency=(1, 32)), _results())
    text = render(meta, alone, verdicts(config, alone))
    assert "n/a: no other mode asked for (BENCH_MODES)" in text
    meta["modes_missing"] = {"quorum": "did not start: api exited early"}
    assert "n/a: quorum did not start: api exited early" in render(meta, alone, [])


def test_versions_name_the_cpu_and_say_unknown_rather_than_fail(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU @ 3.0GHz\n")
    assert versions.cpu_model(cpuinfo) == "Some CPU @ 3.0GHz"
    assert versions.cpu_model(tmp_path / "missing") == versions.UNKNOWN
    assert versions.git_commit(tmp_path) == versions.UNKNOWN  # not a repository
    closed = "127.0.0.1:1"  # nothing listens on port 1
    assert asyncio.run(versions.rabbitmq_version(f"amqp://guest:guest@{closed}/")) == "?"
    assert asyncio.run(versions.redis_version(f"redis://{closed}/0")) == "?"


def _litellm_run(rps: float, *workers: float) -> LoadResult:
    cpu = {"litellm": 10.0, **{f"litellm-{i}": ms for i, ms in enumerate(workers, start=1)}}
    return result(rps, 100, 200, cpu_ms=cpu)


def test_a_litellm_run_with_an_idle_worker_is_told_apart() -> None:
    assert idle_worker(_litellm_run(134, 0.0, 9980.0, 10.0))  # every connection on one worker
    assert not idle_worker(_litellm_run(224, 0.0, 9360.0, 9310.0))
    assert not idle_worker(result(800, 30, 60, cpu_ms={"api": 1.0, "rabbitmq": 1.0}))


def test_litellm_runs_that_left_a_worker_idle_are_taken_again_and_reported() -> None:
    config = BenchConfig(json_concurrency=(1, 32), load_tool="python")
    runner = Runner(config, None, {LITELLM: None})  # type: ignore[arg-type, dict-item]
    takes = iter([_litellm_run(250, 0.0, 9000.0, 8800.0)])
    calls: list[str] = []

    async def measure(target: object, series: Series, duration: float) -> LoadResult:
        calls.append(series.key)
        return next(takes)

    runner.measure = measure  # type: ignore[method-assign, assignment]
    series = Series("json_c32", "json", "m", 32)
    results = _results()
    first = _litellm_run(134, 0.0, 9980.0, 10.0)
    taken = asyncio.run(runner._with_both_workers(series, 1, first, results))
    assert taken.rps == pytest.approx(250) and calls == ["json_c32"]
    assert results.retakes == [("json_c32", 2, 1, False)]
    summary = summarise(config, results)
    meta = _meta()
    assert "one worker: json_c32 round 2 (1x)." in render(meta, summary, [])


def test_ab_alternates_who_runs_first_each_round() -> None:
    assert [ab.seat_order(i) for i in range(3)] == [["A", "B"], ["B", "A"], ["A", "B"]]


def test_ab_tally_counts_the_rounds_b_won_and_takes_medians_per_process() -> None:
    tally = ab.Tally()
    for a_rps, b_rps in ((100, 120), (110, 105), (90, 130)):
        tally.add("A", result(a_rps, 2.0, 4.0, cpu_ms={"api": a_rps * 10 * 0.5}))
        tally.add("B", result(b_rps, 1.5, 3.0, cpu_ms={"api": b_rps * 10 * 0.4}))
    assert tally.b_wins() == 2
    line = tally.median_line("B")
    assert "requests/s 120" in line and "p50 1.50 ms" in line
    assert "CPU 0.400 ms/request" in line and "api 0.400" in line
    assert "TTFT" not in line  # a JSON series has none


def test_ab_tally_gives_each_process_wakeups_per_request() -> None:
    tally = ab.Tally()
    for requests, woken in ((100, 350), (120, 480), (110, 330)):
        run = result(requests / 10, 2.0, 4.0, cpu_ms={"api": 100.0}, wakeups={"api": woken})
        tally.add("B", run)
    assert "wakeups per request: api 3.5" in tally.median_line("B")  # 3.5, 4.0, 3.0


def test_context_switches_are_counted_over_every_thread_of_a_process() -> None:
    import threading
    import time

    before = procstat.switches_snapshot([os.getpid()])
    napped, counted = threading.Event(), threading.Event()

    def nap() -> None:
        for _ in range(5):
            time.sleep(0.001)  # each sleep is a voluntary switch of this thread
        napped.set()
        counted.wait(5)  # alive while counted: an ended thread takes its count with it

    thread = threading.Thread(target=nap)
    thread.start()
    assert napped.wait(5)
    voluntary, _ = procstat.switches_delta(before)[os.getpid()]
    counted.set()
    thread.join()
    assert voluntary >= 5
    assert procstat.switches(2**22 + 1) == (0, 0)  # no such process
    assert procstat.switches_delta({2**22 + 1: (3, 4)}) == {2**22 + 1: (0, 0)}


def test_the_broker_is_found_by_the_port_it_listens_on() -> None:
    import socket

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert procstat.listener_pid(port) == os.getpid()
        assert procstat.rabbitmq_pid(f"amqp://guest:guest@127.0.0.1:{port}/") == os.getpid()
    assert procstat.listener_pid(port) is None  # closed now


def test_the_c1_section_gives_cpu_and_wakeups_per_request_by_process() -> None:
    config = BenchConfig(json_concurrency=(1, 32))
    results = _results()
    for requests, api_woken in ((1000, 2500), (1200, 3600), (1100, 2200)):
        rps = requests / 10
        run = result(
            rps,
            3.0,
            6.0,
            cpu_ms={"api": requests * 1.5, "rabbitmq": requests * 2.0},
            wakeups={"api": api_woken, "rabbitmq": requests * 20},
            preemptions={"api": requests, "rabbitmq": 0},
        )
        results.add("json_c1", ROUTER, run)
    s = summarise(config, results)
    path = s["c1_path"][ROUTER]
    assert path["api"] == {"cpu_ms": 1.5, "wakeups": 2.5, "preemptions": 1.0}  # 2.5, 3.0, 2.0
    assert path["whole path"]["cpu_ms"] == pytest.approx(3.5)
    assert path["whole path"]["wakeups"] == pytest.approx(22.5)  # 22.5, 23.0, 22.0
    assert LITELLM not in s["c1_path"]  # its c=1 runs carried no per-process figures
    meta = _meta()
    text = render(meta, s, verdicts(config, s))
    assert "## Per request at c=1: CPU and wakeups, by process" in text
    assert "| router | api | 1.500 | 2.5 | 1.0 |" in text
    assert "| router | whole path | 3.500 | 22.5 | 1.0 |" in text

    alone = summarise(config, _results())
    assert "n/a: no per-process figures for JSON c=1" in render(meta, alone, [])


def test_ab_compares_in_both_seatings_unless_told_otherwise() -> None:
    assert ab.parse(["--b", "/tmp/candidate"]).seating == "both"
    assert ab.parse(["--b", "/tmp/candidate", "--b-first"]).seating == "b-first"
    assert ab.parse(["--b", "/tmp/candidate", "--seating", "a-first"]).seating == "a-first"
    assert ab.SEATINGS["both"] == (("A", "B"), ("B", "A"))


def test_ab_summary_takes_medians_over_both_seatings_and_counts_wins_in_each() -> None:
    first, second = ab.Tally(), ab.Tally()
    for a_rps, b_rps in ((100, 120), (100, 130)):  # B started second: B wins
        first.add("A", result(a_rps, 2.0, 4.0))
        first.add("B", result(b_rps, 2.0, 4.0))
    for a_rps, b_rps in ((110, 105), (120, 100)):  # A started second: A wins
        second.add("A", result(a_rps, 2.0, 4.0))
        second.add("B", result(b_rps, 2.0, 4.0))
    trees = {"A": Path("/a"), "B": Path("/b")}
    lines = ab.summary_lines(
        "json_c32", {"A started first": first, "B started first": second}, trees
    )
    assert lines[0].startswith("json_c32: A (/a): requests/s 105,")  # 100, 100, 110, 120
    assert lines[1].startswith("json_c32: B (/b): requests/s 112,")  # 100, 105, 120, 130
    assert lines[2] == (
        "json_c32: B did more requests/s in 2 of 2 rounds with A started first,"
        " 0 of 2 rounds with B started first"
    )

    paced = ab.Tally()
    for a_ttft, b_ttft in ((5.0, 4.0), (5.0, 6.0), (5.0, 4.5)):
        paced.add("A", result(12, 80.0, 90.0, ttft_p50_ms=a_ttft))
        paced.add("B", result(12, 80.0, 90.0, ttft_p50_ms=b_ttft))
    lines = ab.summary_lines("ttft", {"A started first": paced}, trees, by_ttft=True)
    assert lines[2] == "ttft: B had the lower TTFT p50 in 2 of 3 rounds with A started first"


def test_ab_refuses_an_unknown_series() -> None:
    with pytest.raises(SystemExit):
        ab.parse(["--b", "/tmp/candidate", "--series", "json_c32,nope"])
    assert ab.parse(["--b", "/tmp/candidate"]).series == "json_c32"


def test_another_checkout_runs_on_its_own_venv_when_it_has_one(tmp_path: Path) -> None:
    config = BenchConfig()
    assert Stack(config, "t").python == sys.executable  # this checkout: this interpreter
    assert Stack(config, "t", tree=tmp_path).python == sys.executable  # no venv of its own
    own = tmp_path / ".venv" / "bin" / "python"
    own.parent.mkdir(parents=True)
    own.touch()
    assert Stack(config, "t", tree=tmp_path).python == str(own)


def test_wakeup_summary_takes_the_median_and_the_99th_percentile_in_microseconds() -> None:
    trips = wakeup.summarise([1000 * n for n in range(1, 101)])  # 1..100 us
    assert (trips.p50_us, trips.p99_us, trips.samples) == (50.5, 99.0, 100)  # nearest rank
    with pytest.raises(ValueError):
        wakeup.summarise([])


def test_wakeup_ping_pong_runs_against_a_real_process_and_restores_affinity() -> None:
    before = os.sched_getaffinity(0)
    trips = wakeup.ping_pong(20, warmup=2, cores=wakeup.two_cores())
    assert trips.samples == 20
    assert 0 < trips.p50_us <= trips.p99_us
    assert os.sched_getaffinity(0) == before


def test_the_floors_run_only_the_series_the_latency_targets_are_judged_on() -> None:
    for floor in (FLOOR, FLOOR_CACHE):
        on_floor = [s.key for s in plan(BenchConfig()) if s.runs_on(floor)]
        assert on_floor == ["json_c1", "json_c32", "ttft", "ttft_instant"]


def test_the_floor_section_gives_each_floor_and_the_routers_distance_per_round() -> None:
    config = BenchConfig(json_concurrency=(1, 32))
    results = _results()  # router c=1 p50 per round: 2.2, 2.0, 9.0; direct: 0.2, 0.3, 0.2
    for bare, cached in ((1.2, 1.8), (1.7, 1.9), (6.0, 8.0)):
        results.add("json_c1", FLOOR, result(400, bare, 2 * bare))
        results.add("json_c1", FLOOR_CACHE, result(400, cached, 2 * cached))
    results.add("json_c32", FLOOR, result(1100, 30, 60, cpu_ms={"api": 5500, "rabbitmq": 5500}))
    s = summarise(config, results)
    assert s["floor"]["floors"] == [FLOOR, FLOOR_CACHE]
    c1 = s["floor"]["rows"]["overhead p50, JSON c=1"]
    assert c1[FLOOR] == pytest.approx(1.4)  # per round: 1.0, 1.4, 5.8
    assert c1[FLOOR_CACHE] == pytest.approx(1.6)  # 1.6, 1.6, 7.8
    assert c1[ROUTER] == pytest.approx(2.0)  # 2.0, 1.7, 8.8
    assert c1[f"vs {FLOOR}"] == pytest.approx(1.0)  # 1.0, 0.3, 3.0
    assert c1[f"vs {FLOOR_CACHE}"] == pytest.approx(0.4)  # 0.4, 0.1, 1.0
    cpu = s["floor"]["rows"]["whole-path CPU ms per request, JSON c=32"]
    assert cpu[FLOOR] == pytest.approx(1.0) and cpu[f"vs {FLOOR}"] == pytest.approx(0.0)
    assert FLOOR_CACHE not in cpu  # it ran no c=32 series here
    text = render(_meta(), s, verdicts(config, s))
    assert "## The design's floor: the same shape with nothing else in it" in text
    assert (
        "| figure | floor | floor+cache | router | router minus floor | router minus floor+cache |"
        in text
    )
    assert "| overhead p50, JSON c=1 | 1.40 | 1.60 | 2.00 | +1.00 | +0.40 |" in text
    c32 = (
        "| requests/s, JSON c=32 | 1100 | n/a | 1000 | router/floor 0.91x | router/floor+cache n/a"
    )
    assert c32 in text
    assert s["values"]["overhead_p50"] == pytest.approx(2.0)  # the targets stay the router's
    without = summarise(config, _results())
    assert "n/a: the floor was not run" in render(_meta(), without, [])


def test_the_floor_relays_answers_streams_and_errors_through_the_real_broker() -> None:
    async def scenario() -> None:
        stack = Stack(BenchConfig(), "test-floor")
        try:
            await stack.start_fake(INSTANT_MODEL)
            await stack.start_fake(PACED_MODEL, token_rate=500)
            await stack.start_floor(FLOOR, [INSTANT_MODEL, PACED_MODEL])
            url = f"{stack.floors[FLOOR].url}/v1/chat/completions"
            messages = [{"role": "user", "content": "hi"}]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                body = orjson.dumps({"model": INSTANT_MODEL, "messages": messages})
                async with session.post(url, data=body) as r:
                    answer = orjson.loads(await r.read())
                    assert r.status == 200
                    assert answer["choices"][0]["message"]["content"].startswith("Hello")
                # The paced fake sends its events over time: each read becomes one message.
                body = orjson.dumps({"model": PACED_MODEL, "messages": messages, "stream": True})
                async with session.post(url, data=body) as r:
                    text = (await r.read()).decode()
                    assert r.status == 200 and r.content_type == "text/event-stream"
                    assert text.count("data: ") > 3 and text.rstrip().endswith("data: [DONE]")
                # The backend's error status and body come back as they are.
                body = orjson.dumps({"model": INSTANT_MODEL, "messages": "not a list"})
                async with session.post(url, data=body) as r:
                    assert r.status == 400
                    assert "error" in orjson.loads(await r.read())
        finally:
            stack.stop()
            await clean_broker(stack.namespace)

    asyncio.run(scenario())


def test_the_floor_with_its_bare_cache_answers_a_repeat_from_redis() -> None:
    async def scenario() -> None:
        stack = Stack(BenchConfig(), "test-floor-cache")
        try:
            fake = await stack.start_fake(INSTANT_MODEL)
            redis_url = RedisSettings().redis_url
            await stack.start_floor(FLOOR_CACHE, [INSTANT_MODEL], redis_url=redis_url)
            url = f"{stack.floors[FLOOR_CACHE].url}/v1/chat/completions"
            body = orjson.dumps(
                {"model": INSTANT_MODEL, "messages": [{"role": "user", "content": stack.run_id}]}
            )
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

                async def calls() -> int:
                    async with session.get(f"{fake}/_fake/stats") as r:
                        return int((await r.json())["requests"])

                # The entry is written after the answer, from the agent's `completed` message:
                # repeat until one is answered without the backend (each miss rewrites it).
                answers: list[bytes] = []
                for _ in range(50):
                    before = await calls()
                    async with session.post(url, data=body) as r:
                        answer = await r.read()
                    if await calls() == before:
                        assert answers and answer in answers
                        break
                    answers.append(answer)
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("no repeat was answered from the cache")
        finally:
            stack.stop()
            await clean_broker(stack.namespace)

    asyncio.run(scenario())


SIGTERMED = """
import asyncio
from bench.stack import run_main

async def main():
    try:
        print("ready", flush=True)
        await asyncio.sleep(60)
    finally:
        print("cleaned up", flush=True)

run_main(main())
"""


def test_sigterm_stops_a_bench_run_through_its_cleanup() -> None:
    """A supervisor's SIGTERM must not leave the run's services and queues behind."""
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERMED],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=10)
    assert out == "cleaned up\n"
    assert err == "bench: stopped by SIGTERM, after its cleanup\n"  # no traceback
    assert child.returncode == 143


def _verdict(results: Results, text: str, **summary: object) -> tuple[str, str]:
    config = BenchConfig(json_concurrency=(1, 32))
    s = summarise(config, results)
    s.update(summary)
    row = {row[0]: row for row in verdicts(config, s)}[text]
    return row[2], row[3]


def test_a_router_that_failed_requests_misses_its_target_whatever_its_speed() -> None:
    """An error answered fast is a low latency: an all-404 router once read as met, with a
    negative overhead."""
    r = _results()
    r.runs["json_c1"][ROUTER][1] = LoadResult(
        requests=0, errors=6305, seconds=10.0, p50_ms=0.1, p99_ms=3.0
    )
    assert _verdict(r, "Router overhead p50, c=1") == ("failed requests (router 6306)", "missed")
    assert _verdict(r, "RPS at c=32 vs LiteLLM")[1] == "met"  # another series: unaffected


def test_a_baseline_that_failed_requests_leaves_its_target_unjudged() -> None:
    r = _results()
    r.runs["json_c32"][LITELLM][0] = LoadResult(
        requests=1500, errors=40, seconds=10.0, p50_ms=100, p99_ms=200
    )
    assert _verdict(r, "RPS at c=32 vs LiteLLM") == ("failed requests (litellm 40)", "n/a")


def test_a_service_gone_after_the_soak_misses_the_rss_target() -> None:
    r = _results()
    r.soak = {
        "seconds": 600.0,
        "requests": 1000,
        "errors": 0,
        "rss_before_mb": {"api": 60.0, "agent": 55.0},
        "rss_after_mb": {"api": 60.5, "agent": 0.0},  # what /proc says of a dead pid
        "rss_peak_mb": {"api": 61.0, "agent": 300.0},
    }
    assert _verdict(r, "RSS growth over the soak") == (
        "agent not running after the soak",
        "missed",
    )
    r.soak["rss_after_mb"]["agent"] = 55.2
    assert _verdict(r, "RSS growth over the soak")[1] == "met"
    r.soak["errors"] = 3
    assert _verdict(r, "RSS growth over the soak") == ("3 failed requests in the soak", "missed")


def test_whole_path_cpu_without_the_brokers_process_is_not_judged() -> None:
    r = _results()
    for run in r.runs["json_c32"][ROUTER]:
        run.cpu_ms = {"api": 5000.0}
    measured, status = _verdict(r, "Whole-path CPU per request")
    assert status == "n/a" and "RabbitMQ" in measured


def test_litellm_runs_with_a_worker_still_idle_are_left_out_of_its_median() -> None:
    r = _results()
    idle = {"litellm-1": 900.0, "litellm-2": 10.0}
    for i in (0, 1):  # two of three rounds at one worker's pace
        r.runs["json_c32"][LITELLM][i] = result(120, 100, 200, cpu_ms=idle)
    assert _verdict(r, "RPS at c=32 vs LiteLLM") == ("5.00x", "met")  # 1000/200, not 1000/120
    r.runs["json_c32"][LITELLM] = [result(120, 100, 200, cpu_ms=idle)] * 3
    assert _verdict(r, "RPS at c=32 vs LiteLLM") == (
        "LiteLLM had a worker idle in every run",
        "n/a",
    )
