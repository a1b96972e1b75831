"""`python -m bench.wakeup`: what waking a process costs on this machine, the host's share of
every latency at c=1.

One request at c=1 crosses six processes besides the client (api, RabbitMQ, dispatcher, Redis,
agent and the backend), and each hop wakes one that was asleep in `epoll_wait`. On a virtual
machine whose idle cores halt, that wakeup costs far more than the work around it, and it moves
with the host: the router's c=1 overhead measured 2.29 ms on a fast day and 3.33-3.44 ms on
middling ones.
This probe measures it without the router: two processes play ping-pong with one byte over
loopback TCP, each blocked in `recv()` until the other's byte arrives, so every round trip is
two wakeups and almost no work. The two are pinned to different cores (where there are two):
a wakeup on the same core is a context switch of a few microseconds, one on another core is
what costs. Run back to back (like c=1 JSON) and with a pause before each round trip (the
cores halt in between, like the paced TTFT series).
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.load import percentile

# The echoing side, run as `python -c`: connect, then send back every byte received.
_ECHO = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    b = s.recv(1)
    if not b:
        break
    s.sendall(b)
"""


@dataclass(frozen=True)
class RoundTrips:
    """Round-trip times between two processes over loopback, in microseconds."""

    p50_us: float
    p99_us: float
    samples: int

    def brief(self) -> str:
        return f"p50 {self.p50_us:.0f} us, p99 {self.p99_us:.0f} us"


def summarise(times_ns: list[int]) -> RoundTrips:
    if not times_ns:
        raise ValueError("no round trips")
    us = [t / 1000 for t in times_ns]
    return RoundTrips(statistics.median(us), percentile(us, 99), len(us))


def two_cores() -> tuple[int, int] | None:
    """Two cores this process may run on, or None (one core, or no affinity on this OS)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else None


def ping_pong(
    rounds: int, pause: float = 0.0, warmup: int = 50, cores: tuple[int, int] | None = None
) -> RoundTrips:
    """`rounds` one-byte round trips with a child process, `pause` seconds before each; with
    `cores`, this process runs on the first and the child on the second."""
    before = os.sched_getaffinity(0) if cores is not None else None
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c", _ECHO, str(port)], stdin=subprocess.DEVNULL)
        try:
            if cores is not None:
                os.sched_setaffinity(0, {cores[0]})
                os.sched_setaffinity(child.pid, {cores[1]})
            server.settimeout(10)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)  # a wedged child fails the probe, never the bench
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                times: list[int] = []
                for i in range(warmup + rounds):
                    if pause:
                        time.sleep(pause)
                    started = time.perf_counter_ns()
                    conn.sendall(b"x")
                    if conn.recv(1) != b"x":
                        raise OSError("the echoing process went away")
                    if i >= warmup:
                        times.append(time.perf_counter_ns() - started)
        finally:
            if before is not None:
                os.sched_setaffinity(0, before)
            child.kill()
            child.wait(timeout=10)
    return summarise(times)


WHAT = (
    "round trips between two processes on two cores, one byte each way over loopback TCP: two"
    " wakeups each (python -m bench.wakeup)"
)


def describe(rounds: int = 2000, idle_rounds: int = 300, pause: float = 0.005) -> str:
    """The figures in one phrase, for a report's set-up; says why instead of failing."""
    cores = two_cores()
    try:
        warm = ping_pong(rounds, cores=cores)
        idle = ping_pong(idle_rounds, pause=pause, cores=cores)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return f"not measured ({type(e).__name__}: {e})"
    where = "" if cores else " (one core only)"
    return f"back to back {warm.brief()}, after {pause * 1000:g} ms idle {idle.brief()}{where}"


def main() -> None:
    print(f"{describe()}\n({WHAT})")


if __name__ == "__main__":
    main()
