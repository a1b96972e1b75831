"""`python -m bench` (what `make bench` runs): start the stack, measure, report.

Progress goes to stderr; the report (markdown) to stdout, to bench/out/<timestamp>.md (with the
raw measurements beside it as .json) and, on a full run, into bench/RESULTS.md.
Parameters are `BENCH_*` environment variables (bench/config.py, bench/README.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import procstat, profile, wakeup
from bench.broker import delete_namespace
from bench.config import PEERS_VENV, ROOT, BenchConfig
from bench.load import wrk_available, wrk_version
from bench.markdown import fill_results, render
from bench.report import summarise, verdicts
from bench.series import (
    DIRECT,
    FLOOR,
    FLOOR_CACHE,
    FLOORS,
    LITELLM,
    ROUTER,
    Results,
    Runner,
    Series,
    Target,
    build_targets,
    plan,
    sanity_check,
    target_mode,
)
from bench.stack import (
    INSTANT_MODEL,
    PACED_MODEL,
    SLOW_MODEL,
    Stack,
    StartupError,
    run_main,
)
from bench.versions import describe
from shared.settings import BrokerSettings, RedisSettings

log = logging.getLogger("bench")


def litellm_version() -> str | None:
    found = sorted(PEERS_VENV.glob("lib/python*/site-packages/litellm-*.dist-info"))
    return found[-1].name.removeprefix("litellm-").removesuffix(".dist-info") if found else None


def wants_litellm(config: BenchConfig) -> bool:
    installed = (PEERS_VENV / "bin" / "litellm").exists()
    if config.peers == "require" and not installed:
        raise SystemExit("bench: BENCH_PEERS=require but bench/.peers has no LiteLLM")
    return installed and config.peers != "off"


def setup_lines(
    config: BenchConfig, stack: Stack, siblings: dict[str, Stack], use_wrk: bool, litellm: bool
) -> dict[str, str]:
    others = ", ".join(f"{mode} (namespace {s.namespace})" for mode, s in siblings.items())
    lines = {
        "machine": f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start",
        "load generator": f"wrk {wrk_version()} (1 thread, Lua script bench/wrk/chat.lua)"
        if use_wrk
        else "Python asyncio/aiohttp load generator (the fallback: a slower, client-bound client)",
        "rounds": f"{config.rounds} x {config.duration:g} s per run; medians of the rounds; "
        "targets interleaved, their order rotated each round",
        "backend": f"fake vLLM, {config.stream_tokens} tokens per answer: instant (JSON, streams); "
        f"paced at {config.ttft_token_rate:g} tokens/s (TTFT); "
        f"{config.scaling_latency * 1000:g} ms latency (agent scaling)",
        "router": f"api + dispatcher + agent on namespace {stack.namespace}, "
        f"DURABILITY={config.durability}, LOG_LEVEL={config.log_level}, "
        f"AGENT_CONCURRENCY={config.agent_concurrency}, client keys on, Redis cache as configured "
        "(REDIS_URL, CACHE_TTL)",
        "durability modes": f"{config.durability} (the router above, the targets' mode); "
        + (
            f"{others}: api + dispatcher + one agent each, in front of the same instant fake, "
            "for JSON c=1 and c=32 and streams only"
            if others
            else "no other (see the modes section)"
        ),
        "agent scaling": f"AGENT_CONCURRENCY={config.scaling_concurrency} per agent, "
        f"{config.scaling_clients} client connections, agents {config.scaling_agents}",
        "floors": f"bench/floor.py: {', '.join(stack.floors) or 'none started'} (api + "
        f"dispatcher + agent per model, in namespaces under {stack.namespace}), in front of the "
        "same fakes, for JSON c=1 and c=32 and both TTFT series",
        "LiteLLM": f"{litellm_version()}, 2 workers, logging off, same fake backend"
        if litellm
        else "not run (`make bench-peers` installs it)",
        "soak": f"{config.soak:g} s, {config.soak_json_clients} JSON + "
        f"{config.soak_stream_clients} stream clients on the router",
    }
    if config.quick:
        lines["quick"] = "BENCH_QUICK=1 smoke run: short runs, numbers indicative only"
    return lines


async def start(stack: Stack, config: BenchConfig, litellm: bool) -> bool:
    """Everything up; returns whether LiteLLM made it (it is optional)."""
    await stack.start_fake(INSTANT_MODEL)
    await stack.start_fake(PACED_MODEL, token_rate=config.ttft_token_rate)
    await stack.start_fake(SLOW_MODEL, latency=config.scaling_latency)
    if litellm:
        stack.spawn_litellm()
    await stack.start_router()
    await stack.start_agent(INSTANT_MODEL, config.agent_concurrency)
    await stack.start_agent(PACED_MODEL, config.agent_concurrency)
    await stack.start_agent(SLOW_MODEL, config.scaling_concurrency)
    log.info("router up (namespace %s)", stack.namespace)
    await start_floors(stack)
    if litellm:
        log.info("waiting for LiteLLM (its start takes a minute or more)")
        try:
            await stack.litellm_ready()
        except StartupError as e:
            log.warning("LiteLLM did not start, going on without it: %s", e)
            return False
    return litellm


async def start_floors(stack: Stack) -> None:
    """The bare pipelines: alone, and with a bare cache when the router's cache is on.
    Measuring sticks: one that does not start is left out."""
    redis = RedisSettings()
    floors: list[tuple[str, str | None]] = [(FLOOR, None)]
    if redis.redis_url and redis.cache_ttl > 0:
        floors.append((FLOOR_CACHE, redis.redis_url))
    for name, redis_url in floors:
        try:
            await stack.start_floor(name, [INSTANT_MODEL, PACED_MODEL], redis_url=redis_url)
        except StartupError as e:
            log.warning("%s did not start, going on without it: %s", name, e)


def command_line() -> str:
    """How this run was asked for: the command and the `BENCH_*` settings it was given."""
    asked = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_"))
    return f"{asked} python -m bench".strip() + " (what `make bench` runs)"


async def start_siblings(
    stack: Stack, config: BenchConfig, stacks: list[Stack], meta: dict[str, Any]
) -> dict[str, Stack]:
    """A router per extra durability mode (mode -> its stack); one that fails is left out.

    Each goes into `stacks` before it starts, so that the run stops it and cleans its namespace
    whatever happens.
    """
    started: dict[str, Stack] = {}
    for mode in config.modes:
        sibling = stack.sibling(mode)
        stacks.append(sibling)
        try:
            await sibling.start_router()
            await sibling.start_agent(INSTANT_MODEL, config.agent_concurrency)
        except StartupError as e:
            log.warning("the %s router did not start, going on without it: %s", mode, e)
            sibling.stop()
            note_missing(meta, mode, "did not start", e)
            continue
        log.info("%s router up (namespace %s)", mode, sibling.namespace)
        started[mode] = sibling
    return started


def note_missing(meta: dict[str, Any], mode: str, what: str, error: Exception) -> None:
    """Why `mode` has no row in the modes section (the full error is in the log)."""
    first = (str(error).splitlines() or [type(error).__name__])[0]
    meta.setdefault("modes_missing", {})[mode] = f"{what}: {first}"


async def profile_runs(
    runner: Runner, stack: Stack, config: BenchConfig, prefix: Path
) -> dict[str, str]:
    if profile.py_spy() is None:
        log.warning("BENCH_PROFILE=1 but no py-spy (bench/.peers or PATH): no profile")
        return {}
    assert stack.api is not None and stack.dispatcher is not None
    pids = {
        "api": stack.api.pid,
        "dispatcher": stack.dispatcher.pid,
        "agent": stack.agents[INSTANT_MODEL][0].pid,
    }
    out: dict[str, str] = {}
    for series in (
        Series("json_c32", "json", INSTANT_MODEL, 32),
        Series("streams", "stream", INSTANT_MODEL, config.stream_concurrency),
    ):
        log.info("profiling the router under %s", series.key)
        recording = asyncio.create_task(
            profile.record(pids, config.duration, prefix.with_name(f"{prefix.name}-{series.key}"))
        )
        await asyncio.sleep(0.5)  # py-spy attaches
        result = await runner.measure(runner.targets[ROUTER], series, config.duration)
        files = await recording
        for name, path in files.items():
            out[f"{series.key}, {name} ({result.rps:.0f}/s under py-spy)"] = profile.summarise(path)
    return out


async def check_targets(targets: dict[str, Target], meta: dict[str, Any]) -> None:
    """A JSON answer and a stream through each target; LiteLLM, the floor or a mode failing
    only drops it."""
    for target in list(targets.values()):
        mode = target_mode(target.name)
        for model in (INSTANT_MODEL,) if mode else (INSTANT_MODEL, PACED_MODEL):
            try:
                await sanity_check(target, model)
            except Exception as e:
                if target.name not in (LITELLM, *FLOORS) and not mode:
                    raise
                log.warning("%s fails the sanity check, dropped: %s", target.name, e)
                targets.pop(target.name, None)
                if mode:
                    note_missing(meta, mode, "failed the sanity check", e)
                elif target.name in FLOORS:
                    meta["setup"][target.name] = f"dropped: {e}"
                else:
                    meta["setup"]["LiteLLM"] = f"dropped: {e}"
                break


async def measure(
    config: BenchConfig,
    stack: Stack,
    litellm: bool,
    meta: dict[str, Any],
    run_id: str,
    *,
    siblings: dict[str, Stack],
) -> Results:
    """Every series, round after round, then the profile (if asked) and the soak."""
    results = Results()
    targets = build_targets(stack, procstat.rabbitmq_pid(), litellm, siblings)
    await check_targets(targets, meta)
    runner = Runner(config, stack, targets)
    series = plan(config)
    hits, note = await runner.cache_works()
    if hits:
        series.append(Series("cache", "json", INSTANT_MODEL, 1, same=True, only=(DIRECT, ROUTER)))
    else:
        results.cache_note = note
    log.info("targets %s; series %s", list(targets), [s.key for s in series])
    await runner.warm_up(series)
    for index in range(config.rounds):
        await runner.round(index, series, results)
        await runner.scaling_round(index, results)
    for sibling in siblings.values():  # done with: the profile and the soak are the main router's
        sibling.stop()
    await runner.scale_to(1)
    if config.profile:
        prefix = config.out_dir / f"{run_id}-profile"
        results.profile = await profile_runs(runner, stack, config, prefix)
        meta["profile"] = results.profile
    log.info("soak: %g s", config.soak)
    await runner.soak(results)
    return results


def write_report(config: BenchConfig, meta: dict[str, Any], results: Results, run_id: str) -> None:
    summary = summarise(config, results)
    report = render(meta, summary, verdicts(config, summary))
    print(report, flush=True)
    md = config.out_dir / f"{run_id}.md"
    md.write_text(report)
    raw = {
        "config": {k: str(v) for k, v in vars(config).items()},
        "meta": meta,
        "values": summary["values"],
        "runs": {
            series: {t: [r.to_json() for r in runs] for t, runs in by_target.items()}
            for series, by_target in results.runs.items()
        },
        "scaling": {n: [r.to_json() for r in runs] for n, runs in results.scaling.items()},
        "soak": results.soak,
        "litellm_retakes": results.retakes,
    }
    options = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    md.with_suffix(".json").write_bytes(orjson.dumps(raw, option=options))
    print(f"bench: wrote {md} and {md.with_suffix('.json').name}", file=sys.stderr)
    if config.should_write_results and fill_results(ROOT / "bench" / "RESULTS.md", report):
        print("bench: filled bench/RESULTS.md", file=sys.stderr)


async def run(config: BenchConfig) -> int:
    started = datetime.now(UTC)
    run_id = started.strftime("%Y%m%d-%H%M%S")
    stack = Stack(config, run_id)
    stacks = [stack]  # and one per other durability mode: all stopped and cleaned at the end
    litellm = wants_litellm(config)
    use_wrk = config.load_tool == "wrk" or (config.load_tool == "auto" and wrk_available())
    meta: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "stream_concurrency": config.stream_concurrency,
        "scaling_latency_ms": config.scaling_latency * 1000,
        "scaling_ceiling": config.scaling_concurrency / config.scaling_latency,
    }
    config.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        try:
            litellm = await start(stack, config, litellm)
        except StartupError as e:
            log.error("the stack did not start: %s", e)
            return 1
        siblings = await start_siblings(stack, config, stacks, meta)
        meta["setup"] = setup_lines(config, stack, siblings, use_wrk, litellm)
        redis_url = RedisSettings().redis_url or ""  # the services' own settings and defaults
        meta["setup"].update(await describe(ROOT, BrokerSettings().rabbitmq_url, redis_url))
        meta["setup"]["command"] = command_line()
        # The host's cost of a wakeup moves the c=1 latencies more than most code changes.
        start_wakeups = await asyncio.to_thread(wakeup.describe)
        results = await measure(config, stack, litellm, meta, run_id, siblings=siblings)
        meta["setup"]["machine"] += f", {os.getloadavg()[0]:.2f} at end"
        end_wakeups = await asyncio.to_thread(wakeup.describe)
        meta["setup"]["wakeups"] = f"{wakeup.WHAT}: at start {start_wakeups}; at end {end_wakeups}"
    finally:
        for each in reversed(stacks):  # the main stack, which runs the fakes, last
            each.stop()
        for each in stacks:
            await clean_broker(each.namespace)
    write_report(config, meta, results, run_id)
    log.info("done in %.0f s", time.monotonic() - t0)
    return 0


async def clean_broker(namespace: str) -> None:
    url = BrokerSettings().rabbitmq_url  # the services' own setting and default
    try:
        gone = await delete_namespace(url, namespace)
    except Exception as e:  # cleanup must not hide the run's own outcome
        log.warning("could not clean namespace %s: %s", namespace, e)
    else:
        log.info("removed %d queues and exchanges of %s", gone, namespace)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="bench %(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    sys.exit(run_main(run(BenchConfig.from_env())))


if __name__ == "__main__":
    main()
