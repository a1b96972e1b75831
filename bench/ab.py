"""`python -m bench.ab --b PATH`: two versions of the router side by side, runs alternated.

For deciding whether a change to the hot path is worth keeping. A second checkout of the
candidate (`git worktree add --detach /tmp/candidate <commit>`) runs beside this one: each has
its own api, dispatcher and agent in a broker namespace of its own, in front of one shared fake
backend, on the same RabbitMQ and Redis. Runs alternate between the two, A then B in even
rounds and B then A in odd ones, so neither profits from the machine's drift. The router
started second has come out ahead by up to 7% (bench/RESULTS.md): run each comparison a second
time with `--b-first`. Prints every run, then per series the medians of requests/s, p50, TTFT
and CPU ms per request (whole path and per process), and in how many rounds B did more
requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench import procstat, wakeup
from bench.__main__ import clean_broker
from bench.config import ROOT, BenchConfig
from bench.load import LoadResult
from bench.micro import SERIES as MICRO_SERIES
from bench.series import Runner, router_target
from bench.stack import INSTANT_MODEL, PACED_MODEL, Stack
from shared.settings import BrokerSettings

SERIES = {series.key: series for series in MICRO_SERIES}  # the same runs as bench.micro


def seat_order(round_index: int) -> list[str]:
    """A first in even rounds, B first in odd ones."""
    return ["A", "B"] if round_index % 2 == 0 else ["B", "A"]


@dataclass
class Tally:
    """One series' runs of A and B, round by round."""

    runs: dict[str, list[LoadResult]] = field(default_factory=lambda: {"A": [], "B": []})

    def add(self, side: str, result: LoadResult) -> None:
        self.runs[side].append(result)

    def b_wins(self) -> int:
        """Rounds in which B did more requests/s than A."""
        return sum(b.rps > a.rps for a, b in zip(self.runs["A"], self.runs["B"], strict=False))

    def median_line(self, side: str) -> str:
        runs = self.runs[side]
        cpu = [r.cpu_per_request() for r in runs]
        ttft = [r.ttft_p50_ms for r in runs if r.ttft_p50_ms is not None]
        parts = [
            f"requests/s {statistics.median(r.rps for r in runs):.0f}",
            f"p50 {statistics.median(r.p50_ms for r in runs):.2f} ms",
        ]
        if ttft:
            parts.append(f"TTFT p50 {statistics.median(ttft):.2f} ms")
        if all(c is not None for c in cpu):
            parts.append(f"CPU {statistics.median(c for c in cpu if c is not None):.3f} ms/request")
            for name in runs[0].cpu_ms:
                parts.append(f"{name} {_per_request(runs, lambda r, n=name: r.cpu_ms.get(n)):.3f}")
        if runs[0].wakeups:
            woken = " ".join(
                f"{name} {_per_request(runs, lambda r, n=name: r.wakeups.get(n)):.1f}"
                for name in runs[0].wakeups
            )
            parts.append(f"wakeups per request: {woken}")
        return ", ".join(parts)


def _per_request(runs: list[LoadResult], count: Callable[[LoadResult], float | None]) -> float:
    """Median over the runs of a process's count (CPU ms, wakeups) per request."""
    return statistics.median((count(r) or 0.0) / r.requests for r in runs if r.requests)


def brief(result: LoadResult) -> str:
    cpu = result.cpu_per_request()
    ttft = f" ttft {result.ttft_p50_ms:.2f}" if result.ttft_p50_ms is not None else ""
    cpu_text = f" cpu {cpu:.3f} ms/request" if cpu is not None else ""
    return f"{result.rps:7.0f}/s p50 {result.p50_ms:6.2f} ms{ttft}{cpu_text} errors {result.errors}"


async def start_side(config: BenchConfig, stack: Stack, with_paced: bool) -> None:
    await stack.start_router()
    await stack.start_agent(INSTANT_MODEL, config.agent_concurrency)
    if with_paced:
        await stack.start_agent(PACED_MODEL, config.agent_concurrency)


async def compare(args: argparse.Namespace) -> None:
    config = BenchConfig.from_env()
    wanted = [SERIES[key] for key in args.series.split(",")]
    paced = any(s.model == PACED_MODEL for s in wanted)
    run_id = f"ab-{time.strftime('%Y%m%d-%H%M%S')}"
    fakes = Stack(config, run_id, subdir="fakes")
    sides = {
        name: Stack(
            config, run_id, secret=fakes.secret, fakes=fakes.fakes, subdir=name, tree=tree.resolve()
        )
        for name, tree in (("A", args.a), ("B", args.b))
    }
    try:
        await fakes.start_fake(INSTANT_MODEL)
        if paced:
            await fakes.start_fake(PACED_MODEL, token_rate=config.ttft_token_rate)
        for name in ("B", "A") if args.b_first else ("A", "B"):
            await start_side(config, sides[name], paced)
        beam = procstat.rabbitmq_pid(BrokerSettings().rabbitmq_url)
        targets = {name: router_target(name, stack, beam) for name, stack in sides.items()}
        runner = Runner(config, fakes, targets)
        for series in wanted:  # warm-up, not counted
            for target in targets.values():
                await runner.measure(target, series, 2)
        print(f"wakeups: {await asyncio.to_thread(wakeup.describe)}", flush=True)
        tallies = {series.key: Tally() for series in wanted}
        for index in range(args.rounds):
            for series in wanted:
                for name in seat_order(index):
                    result = await runner.measure(targets[name], series, args.seconds)
                    tallies[series.key].add(name, result)
                    print(f"round {index + 1} {series.key:8} {name}  {brief(result)}", flush=True)
        for series in wanted:
            tally = tallies[series.key]
            print(f"\n{series.key}: A ({sides['A'].tree}): {tally.median_line('A')}")
            print(f"{series.key}: B ({sides['B'].tree}): {tally.median_line('B')}")
            wins = tally.b_wins()
            print(f"{series.key}: B did more requests/s in {wins} of {args.rounds} rounds")
    finally:
        for stack in (*sides.values(), fakes):
            stack.stop()
        for stack in sides.values():
            await clean_broker(stack.namespace)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--a", type=Path, default=ROOT, help="the base checkout (this one)")
    parser.add_argument("--b", type=Path, required=True, help="the candidate's checkout")
    choices = ", ".join(SERIES)
    parser.add_argument("--series", default="json_c32", help=f"comma-separated: {choices}")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    parser.add_argument("--b-first", action="store_true", help="start B's router first")
    args = parser.parse_args(argv)
    unknown = set(args.series.split(",")) - set(SERIES)
    if unknown:
        parser.error(f"unknown series: {', '.join(sorted(unknown))}")
    return args


if __name__ == "__main__":
    uvloop.run(compare(parse()))
