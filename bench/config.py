"""The bench's parameters: every `BENCH_*` variable is read here and nowhere else."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import Durability

ROOT = Path(__file__).resolve().parents[1]
PEERS_VENV = ROOT / "bench" / ".peers"
LITELLM_VERSION = "1.108.0"  # keep in step with bench/peers.sh


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _num(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    return float(raw) if raw else default


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    return int(_num(env, name, default))


MODES = [m.value for m in Durability]


def _mode(variable: str, name: str) -> str:
    """A durability mode's name, or a ValueError naming the variable (before anything starts,
    not as a service that refuses its `DURABILITY` halfway through a run)."""
    if name not in MODES:
        raise ValueError(f"{variable}: {name!r} is not one of {MODES}")
    return name


def _modes(env: Mapping[str, str], main: str) -> tuple[str, ...]:
    """`BENCH_MODES`: the modes measured beside the main router's (default: the other two)."""
    raw = env.get("BENCH_MODES")
    names = MODES if raw is None else raw.replace(",", " ").split()
    return tuple(m for m in dict.fromkeys(_mode("BENCH_MODES", n) for n in names) if m != main)


@dataclass(frozen=True)
class BenchConfig:
    """One bench run. `from_env` documents each variable's default (see bench/README.md)."""

    quick: bool = False
    rounds: int = 3
    duration: float = 10.0  # seconds per measured run
    warmup: float = 2.0  # seconds of unmeasured load per target before round 1
    soak: float = 600.0  # seconds of the RSS soak
    agent_concurrency: int = 64  # AGENT_CONCURRENCY of the throughput agents
    json_concurrency: tuple[int, ...] = (1, 8, 32, 64)
    stream_concurrency: int = 32
    stream_tokens: int = 16  # completion tokens of every fake answer
    ttft_token_rate: float = 200.0  # tokens/s of the paced backend (TTFT series)
    scaling_agents: tuple[int, ...] = (1, 2, 4)
    # Latency-bound on purpose: 4 agents x 2 slots / 50 ms = 160 requests/s at most, well
    # under what the router's CPU allows on 2 cores, so the series measures how work spreads
    # over agents, not how fast the machine is.
    scaling_concurrency: int = 2  # AGENT_CONCURRENCY of each scaling agent (fixed)
    scaling_latency: float = 0.05  # seconds the scaling backend waits before answering
    scaling_clients: int = 16  # client connections of the scaling series (2x the 4 agents' slots)
    soak_json_clients: int = 16
    soak_stream_clients: int = 8
    peers: str = "auto"  # auto: LiteLLM when bench/.peers has it; require; off
    profile: bool = False  # py-spy the router's services during one c=32 run
    load_tool: str = "auto"  # auto (wrk if installed), wrk, python
    durability: str = "durable"  # the main router's: the targets are judged on it
    modes: tuple[str, ...] = ()  # other modes, each measured on a router of its own
    log_level: str = "WARNING"  # of the router's services (and LiteLLM's)
    write_results: str = "auto"  # auto: bench/RESULTS.md on full runs only; 1; 0
    out_dir: Path = field(default_factory=lambda: ROOT / "bench" / "out")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BenchConfig:
        env = os.environ if env is None else env
        quick = _flag(env, "BENCH_QUICK")
        base = cls(quick=True, rounds=2, duration=2.0, warmup=1.0, soak=15.0) if quick else cls()
        durability = _mode(
            "BENCH_DURABILITY", env.get("BENCH_DURABILITY", base.durability).strip().lower()
        )
        return cls(
            quick=quick,
            rounds=max(_int(env, "BENCH_ROUNDS", base.rounds), 1),
            duration=_num(env, "BENCH_DURATION", base.duration),
            warmup=_num(env, "BENCH_WARMUP", base.warmup),
            soak=_num(env, "BENCH_SOAK", base.soak),
            agent_concurrency=_int(env, "BENCH_AGENT_CONCURRENCY", base.agent_concurrency),
            scaling_concurrency=_int(env, "BENCH_SCALING_CONCURRENCY", base.scaling_concurrency),
            scaling_latency=_num(env, "BENCH_SCALING_LATENCY_MS", base.scaling_latency * 1000)
            / 1000,
            scaling_clients=_int(env, "BENCH_SCALING_CLIENTS", base.scaling_clients),
            peers=env.get("BENCH_PEERS", base.peers).strip().lower() or "auto",
            profile=_flag(env, "BENCH_PROFILE"),
            load_tool=env.get("BENCH_LOAD", base.load_tool).strip().lower() or "auto",
            durability=durability,
            modes=_modes(env, durability),
            log_level=env.get("BENCH_LOG_LEVEL", base.log_level),
            write_results=env.get("BENCH_WRITE_RESULTS", base.write_results).strip().lower(),
            out_dir=Path(env.get("BENCH_OUT", str(base.out_dir))),
        )

    @property
    def should_write_results(self) -> bool:
        if self.write_results in ("1", "true", "yes"):
            return True
        if self.write_results in ("0", "false", "no"):
            return False
        return not self.quick
