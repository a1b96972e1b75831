"""`python -m bench.micro`: a one-minute check of the hot path while working on it.

Not the bench: one stack, a few short runs, no LiteLLM, no rounds, no report file. Prints p50,
requests/s and CPU ms/request (from /proc, the most load-robust figure), and per process its
wakeups and preemptions per request, for the series that the issue's targets are about.
`MICRO_SECONDS` (default 5) sets each run's length; `MICRO_SERIES` (comma-separated keys) runs
only some series; `MICRO_FLOOR=1` also runs the bare shape (`bench/floor.py`), alone and
with a bare cache, where it applies;
`MICRO_PROFILE=1` also records py-spy (`raw` stacks in bench/out/micro-*.txt) during an extra
run of the first chosen series (c=32 JSON when all run) and prints its summary.
"""

from __future__ import annotations

import asyncio
import os
import time

from bench import procstat, profile, wakeup
from bench.__main__ import clean_broker, start_floors
from bench.config import BenchConfig
from bench.series import DIRECT, FLOORS, ROUTER, Runner, Series, build_targets
from bench.stack import DUMMY_MODEL, INSTANT_MODEL, PACED_MODEL, Stack, run_main

SERIES = (
    Series("json_c1", "json", INSTANT_MODEL, 1, floor=True),
    Series("json_c32", "json", INSTANT_MODEL, 32, floor=True),
    Series("streams", "stream", INSTANT_MODEL, 32),
    Series("ttft", "stream", PACED_MODEL, 1, floor=True),
    Series("ttft_instant", "stream", INSTANT_MODEL, 1, floor=True),
    Series("dummy_c1", "json", DUMMY_MODEL, 1),
    Series("dummy_c32", "json", DUMMY_MODEL, 32),
    Series("cache_c1", "json", INSTANT_MODEL, 1, same=True),
)


def line(name: str, target: str, r: object) -> str:
    from bench.load import LoadResult

    assert isinstance(r, LoadResult)
    cpu = r.cpu_per_request()
    per = " ".join(f"{k}={v / r.requests:.3f}" for k, v in r.cpu_ms.items()) if r.requests else ""
    ttft = f" ttft_p50={r.ttft_p50_ms:.2f}" if r.ttft_p50_ms is not None else ""
    woken = ""
    if r.requests and r.wakeups:
        counts = " ".join(
            f"{k}={r.wakeups[k] / r.requests:.1f}/{r.preemptions.get(k, 0) / r.requests:.1f}"
            for k in r.wakeups
        )
        woken = f" wakeups/preemptions per request [{counts}]"
    return (
        f"{name:10} {target:7} p50={r.p50_ms:6.2f} p99={r.p99_ms:6.2f} rps={r.rps:7.0f}"
        f" err={r.errors}{ttft} cpu/req={cpu if cpu is None else round(cpu, 3)} [{per}]{woken}"
    )


async def main() -> None:
    seconds = float(os.environ.get("MICRO_SECONDS", "5"))
    config = BenchConfig.from_env()
    stack = Stack(config, f"micro-{time.strftime('%H%M%S')}")
    try:
        await stack.start_fake(INSTANT_MODEL)
        await stack.start_fake(PACED_MODEL, token_rate=config.ttft_token_rate)
        await stack.start_router()
        await stack.start_agent(INSTANT_MODEL, config.agent_concurrency)
        await stack.start_agent(PACED_MODEL, config.agent_concurrency)
        if os.environ.get("MICRO_FLOOR"):
            await start_floors(stack)
        targets = build_targets(stack, procstat.rabbitmq_pid(), False)
        runner = Runner(config, stack, targets)
        wanted = [k for k in os.environ.get("MICRO_SERIES", "").split(",") if k]
        chosen = [s for s in SERIES if not wanted or s.key in wanted]
        for series in chosen:  # warm-up
            await runner.measure(targets[ROUTER], series, 1)
        print(f"wakeups    {await asyncio.to_thread(wakeup.describe)}", flush=True)
        for series in chosen:
            names = [ROUTER] if series.model == DUMMY_MODEL else [DIRECT, ROUTER]
            if series.key in {"json_c32", "streams"}:
                names = [ROUTER]
            if series.floor:
                names += [name for name in FLOORS if name in targets]
            for name in names:
                result = await runner.measure(targets[name], series, seconds)
                print(line(series.key, name, result), flush=True)
        if os.environ.get("MICRO_PROFILE"):
            assert stack.api is not None and stack.dispatcher is not None
            pids = {
                "api": stack.api.pid,
                "dispatcher": stack.dispatcher.pid,
                "agent": stack.agents[INSTANT_MODEL][0].pid,
            }
            config.out_dir.mkdir(parents=True, exist_ok=True)
            prefix = config.out_dir / f"micro-{time.strftime('%H%M%S')}"
            recording = asyncio.create_task(profile.record(pids, seconds, prefix))
            await asyncio.sleep(0.5)
            profiled = chosen[0] if wanted else SERIES[1]
            await runner.measure(targets[ROUTER], profiled, seconds)
            for name, path in (await recording).items():
                print(f"--- {name} ({path})\n{profile.summarise(path, top=25)}")
    finally:
        stack.stop()
        await clean_broker(stack.namespace)


if __name__ == "__main__":
    run_main(main())
