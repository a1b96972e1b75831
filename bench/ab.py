"""`python -m bench.ab --b PATH`: two versions of the router side by side, runs alternated.

For deciding whether a change to the hot path is worth keeping. A second checkout of the
candidate (`git worktree add --detach /tmp/candidate <commit>`) runs beside this one: each has
its own api, dispatcher and agent in a broker namespace of its own, in front of one shared fake
backend, on the same RabbitMQ and Redis. Runs alternate between the two, A then B in even
rounds and B then A in odd ones, so neither profits from the machine's drift.

The router started second has come out ahead by up to 11% (bench/RESULTS.md), more than most
changes are worth. So by default (`--seating both`) the comparison is made twice: the rounds
with A's router started first, then both routers stopped and started again with B's first,
and the same rounds again. Prints every run, then per series the medians of requests/s, p50,
TTFT and CPU ms and wakeups per request (whole path and per process) over all rounds, and for
each seating in how many rounds B did more requests/s (had the lower TTFT, in a one-client
stream series): a change that wins only in one seating has not won.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import procstat, wakeup
from bench.__main__ import clean_broker
from bench.config import ROOT, BenchConfig
from bench.load import LoadResult
from bench.micro import SERIES as MICRO_SERIES
from bench.series import Runner, router_target
from bench.stack import INSTANT_MODEL, PACED_MODEL, Stack, run_main

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

    def b_wins(self, *, by_ttft: bool = False) -> int:
        """Rounds in which B did more requests/s than A (or, `by_ttft`, had the lower TTFT)."""
        pairs = zip(self.runs["A"], self.runs["B"], strict=False)
        if by_ttft:
            return sum(
                b.ttft_p50_ms < a.ttft_p50_ms
                for a, b in pairs
                if a.ttft_p50_ms is not None and b.ttft_p50_ms is not None
            )
        return sum(b.rps > a.rps for a, b in pairs)

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
                parts.append(f"{name} {_per_request(runs, [r.cpu_ms for r in runs], name):.3f}")
        if runs[0].wakeups:
            woken = " ".join(
                f"{name} {_per_request(runs, [r.wakeups for r in runs], name):.1f}"
                for name in runs[0].wakeups
            )
            parts.append(f"wakeups per request: {woken}")
        return ", ".join(parts)


def _per_request(runs: list[LoadResult], counts: Sequence[Mapping[str, float]], name: str) -> float:
    """Median over the runs of process `name`'s count (CPU ms, wakeups: each run's table in
    `counts`) per request."""
    return statistics.median(
        table.get(name, 0.0) / r.requests
        for r, table in zip(runs, counts, strict=True)
        if r.requests
    )


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


# The order in which the two routers start, per seating.
SEATINGS = {"a-first": (("A", "B"),), "b-first": (("B", "A"),), "both": (("A", "B"), ("B", "A"))}


def seating_name(order: tuple[str, ...]) -> str:
    return f"{order[0]} started first"


async def compare(args: argparse.Namespace) -> None:
    config = BenchConfig.from_env()
    wanted = [SERIES[key] for key in args.series.split(",")]
    paced = any(s.model == PACED_MODEL for s in wanted)
    run_id = f"ab-{time.strftime('%Y%m%d-%H%M%S')}"
    fakes = Stack(config, run_id, subdir="fakes")
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    # series -> seating -> the runs of A and B
    tallies: dict[str, dict[str, Tally]] = {series.key: {} for series in wanted}
    try:
        await fakes.start_fake(INSTANT_MODEL)
        if paced:
            await fakes.start_fake(PACED_MODEL, token_rate=config.ttft_token_rate)
        print(f"wakeups: {await asyncio.to_thread(wakeup.describe)}", flush=True)
        beam = procstat.rabbitmq_pid()
        for order in SEATINGS[args.seating]:
            print(f"--- {seating_name(order)}", flush=True)
            sides = {
                name: Stack(
                    config,
                    run_id,
                    secret=fakes.secret,
                    fakes=fakes.fakes,
                    subdir=f"{name}-{order[0]}-first",
                    tree=trees[name],
                )
                for name in order
            }
            try:
                for name in order:
                    await start_side(config, sides[name], paced)
                targets = {name: router_target(name, stack, beam) for name, stack in sides.items()}
                runner = Runner(config, fakes, targets)
                for series in wanted:  # warm-up, not counted
                    for target in targets.values():
                        await runner.measure(target, series, 2)
                for index in range(args.rounds):
                    for series in wanted:
                        tally = tallies[series.key].setdefault(seating_name(order), Tally())
                        for name in seat_order(index):
                            result = await runner.measure(targets[name], series, args.seconds)
                            tally.add(name, result)
                            print(
                                f"round {index + 1} {series.key:8} {name}  {brief(result)}",
                                flush=True,
                            )
            finally:
                for stack in sides.values():
                    stack.stop()
                for stack in sides.values():
                    await clean_broker(stack.namespace)
        for series in wanted:
            print()
            by_ttft = series.kind == "stream" and series.concurrency == 1
            for line in summary_lines(series.key, tallies[series.key], trees, by_ttft=by_ttft):
                print(line)
    finally:
        fakes.stop()


def summary_lines(
    key: str, by_seating: dict[str, Tally], trees: dict[str, Path], *, by_ttft: bool = False
) -> list[str]:
    """Medians over every round of every seating, then B's wins seating by seating: by
    requests/s, or by TTFT for a one-client stream series (whose requests/s the stream's length
    sets)."""
    merged = Tally()
    for tally in by_seating.values():
        for side, runs in tally.runs.items():
            merged.runs[side].extend(runs)
    lines = [f"{key}: {side} ({trees[side]}): {merged.median_line(side)}" for side in ("A", "B")]
    wins = ", ".join(
        f"{tally.b_wins(by_ttft=by_ttft)} of {len(tally.runs['B'])} rounds with {seating}"
        for seating, tally in by_seating.items()
    )
    what = "had the lower TTFT p50" if by_ttft else "did more requests/s"
    lines.append(f"{key}: B {what} in {wins}")
    return lines


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--a", type=Path, default=ROOT, help="the base checkout (this one)")
    parser.add_argument("--b", type=Path, required=True, help="the candidate's checkout")
    choices = ", ".join(SERIES)
    parser.add_argument("--series", default="json_c32", help=f"comma-separated: {choices}")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    parser.add_argument(
        "--seating",
        choices=sorted(SEATINGS),
        default="both",
        help="which router starts first: both (the rounds once each way), a-first, b-first",
    )
    parser.add_argument("--b-first", action="store_true", help="the same as --seating b-first")
    args = parser.parse_args(argv)
    if args.b_first:
        args.seating = "b-first"
    unknown = set(args.series.split(",")) - set(SERIES)
    if unknown:
        parser.error(f"unknown series: {', '.join(sorted(unknown))}")
    return args


if __name__ == "__main__":
    run_main(compare(parse()))
