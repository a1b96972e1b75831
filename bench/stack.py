"""Starting and stopping the processes under test: fakes, router services, LiteLLM.

Every process starts in its own session (so a multi-process server's workers can be stopped
with it) and is stopped by the pid the bench started: SIGTERM, then SIGKILL to its group.
The router's services share a broker namespace of their own (`bench<hex>`), so the bench never
takes jobs from tests or a `make dev` on the same broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import uvloop

from bench.config import PEERS_VENV, ROOT, BenchConfig
from bench.load import chat_body
from services.api.agent_auth import derive_agent_token
from shared.settings import BrokerSettings

# The fakes' model names (as the fake serves them) and the router ids agents expose them as.
DUMMY_MODEL = "dummy"  # answered by the dispatcher itself
INSTANT_MODEL = "mistral-7b-instruct"
PACED_MODEL = "paced-model"
SLOW_MODEL = "slow-model"


def router_id(model: str) -> str:
    return model if model == DUMMY_MODEL else f"local_{model}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    """One process the bench started, with its log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path = ROOT  # the tree whose code runs (`python -m services.cli` imports from it)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def is_running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM); `stop` waits and then makes sure."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen is None:
            return
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        # Workers of a multi-process server (LiteLLM) live in the group this process leads.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


T = TypeVar("T")


def run_main(main: Coroutine[Any, Any, T]) -> T:
    """`uvloop.run(main)` for a bench command, stoppable by SIGTERM as by Ctrl-C.

    SIGTERM (a supervisor, `timeout`, `kill`) cancels `main`'s task, so its `finally` stops the
    stacks and empties their broker namespaces; the default handler ended the process there and
    then, leaving every service it had started running, and their queues on the broker. Either
    way the command ends in one line (exit 143, or 130 for Ctrl-C), not a traceback of the
    cancellation that would hide that the cleanup ran.
    """

    async def stoppable() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main

    try:
        return uvloop.run(stoppable())
    except asyncio.CancelledError:
        print("bench: stopped by SIGTERM, after its cleanup", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        print("bench: stopped by Ctrl-C, after its cleanup", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


class StartupError(RuntimeError):
    """A process did not come up; the message carries the end of its log."""


async def wait_http(
    url: str, process: Process, *, timeout: float = 60.0, status: int = 200
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if not process.is_running():
                raise StartupError(f"{process.name} exited early:\n{process.tail()}")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == status:
                        return
                    last = f"{r.status} {(await r.text())[:200]}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = repr(e)
            await asyncio.sleep(0.2)
    raise StartupError(f"{url} not ready ({last}); {process.name} log:\n{process.tail()}")


@dataclass(frozen=True)
class Floor:
    """A bare pipeline the bench started: where it listens, and each model's processes."""

    url: str
    pids: dict[str, dict[str, int]]  # fake model -> api, dispatcher and agent pids


@dataclass
class Stack:
    """Everything one bench run starts; `stop()` ends all of it."""

    config: BenchConfig
    run_id: str
    namespace: str = field(default_factory=lambda: f"bench{secrets.token_hex(5)}")
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    # The api runs with client keys, as in production: authentication is part of the path.
    client_key: str = field(default_factory=lambda: f"sk-bench-{secrets.token_hex(24)}")
    processes: list[Process] = field(default_factory=list)
    fakes: dict[str, str] = field(default_factory=dict)  # fake model -> base URL (no /v1)
    fake_procs: dict[str, Process] = field(default_factory=dict)
    api_url: str = ""
    api: Process | None = None
    dispatcher: Process | None = None
    agents: dict[str, list[Process]] = field(default_factory=dict)  # fake model -> agents
    floors: dict[str, Floor] = field(default_factory=dict)  # target name -> bare pipeline
    litellm: Process | None = None
    litellm_url: str = ""
    litellm_key: str = field(default_factory=lambda: f"sk-bench-{secrets.token_hex(24)}")
    subdir: str = ""  # of the run's log dir: a sibling's logs stay apart from the main ones
    tree: Path = ROOT  # the checkout whose services run (another one for `python -m bench.ab`)
    _spawned: int = 0

    @property
    def python(self) -> str:
        """The interpreter the router's services run on: another checkout's own `.venv` when it
        has one (so `bench.ab` can compare Python versions and dependencies), else this one."""
        own = self.tree / ".venv" / "bin" / "python"
        return str(own) if self.tree != ROOT and own.exists() else sys.executable

    @property
    def log_dir(self) -> Path:
        return ROOT / "var" / "bench" / self.run_id / self.subdir

    def sibling(self, mode: str) -> Stack:
        """A stack for a router in another durability mode, in front of these same fakes.

        Its own namespace, client key and logs, the run's agent secret; it starts nothing until
        `start_router` and stops only what it started (the fakes stay this stack's).
        """
        config = replace(self.config, durability=mode)
        return Stack(config, self.run_id, secret=self.secret, fakes=self.fakes, subdir=mode)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        self._spawned += 1  # a restarted agent keeps its name: its log must not overwrite
        log = self.log_dir / f"{self._spawned:02d}-{name}.log"
        process = Process(name, argv, env, log, cwd=self.tree).start()
        self.processes.append(process)
        return process

    def _service_env(self, **extra: str) -> dict[str, str]:
        return {
            "BROKER_NAMESPACE": self.namespace,
            "DURABILITY": self.config.durability,
            "LOG_LEVEL": self.config.log_level,
            **extra,
        }

    # --- fakes -------------------------------------------------------------------------------
    async def start_fake(self, model: str, *, latency: float = 0.0, token_rate: float = 0.0) -> str:
        port = free_port()
        argv = [sys.executable, "-m", "services.cli", "fake-vllm", "--port", str(port)]
        argv += ["--models", model, "--tokens", str(self.config.stream_tokens)]
        argv += ["--latency", str(latency), "--token-rate", str(token_rate)]
        process = self._spawn(f"fake-{model}", argv, {})
        url = f"http://127.0.0.1:{port}"
        await wait_http(f"{url}/health", process)
        self.fakes[model] = url
        self.fake_procs[model] = process
        return url

    # --- the router ----------------------------------------------------------------------------
    async def start_router(self) -> None:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        cli = [self.python, "-m", "services.cli"]
        self.api = self._spawn(
            "api",
            [*cli, "api"],
            self._service_env(
                API_PORT=str(port),
                AGENT_TOKEN_SECRET=self.secret,
                CLIENT_KEYS=f"bench:{self.client_key}",
            ),
        )
        await wait_http(f"{self.api_url}/ready", self.api)
        registry = self.log_dir / "registry.sqlite3"
        self.dispatcher = self._spawn(
            "dispatcher", [*cli, "dispatcher"], self._service_env(REGISTRY_PATH=str(registry))
        )

    async def start_agent(self, model: str, concurrency: int) -> Process:
        """One more agent in front of the fake serving `model`; waits until it is ready."""
        assert self.api is not None
        index = len(self.agents.get(model, [])) + 1
        name = f"bench-{model}-{index}"
        health_port = free_port()
        env = self._service_env(
            AGENT_NAME=name,
            AGENT_TOKEN=derive_agent_token(self.secret, name),
            ROUTER_URL=self.api_url,
            VLLM_URL=f"{self.fakes[model]}/v1",
            AGENT_CONCURRENCY=str(concurrency),
            AGENT_PORT=str(health_port),
            AGENT_BIND="127.0.0.1",
            HEARTBEAT_INTERVAL="2",
        )
        process = self._spawn(name, [self.python, "-m", "services.cli", "agent"], env)
        self.agents.setdefault(model, []).append(process)
        await wait_http(f"http://127.0.0.1:{health_port}/ready", process, timeout=60)
        await self.wait_model_listed(router_id(model))
        return process

    def stop_agent(self, model: str) -> None:
        process = self.agents[model].pop()
        process.stop()
        self.processes.remove(process)

    async def wait_model_listed(self, model: str, timeout: float = 30.0) -> None:
        """Until a dispatcher routes to `model` (its registration went through)."""
        assert self.dispatcher is not None
        deadline = time.monotonic() + timeout
        last = ""
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not self.dispatcher.is_running():
                    raise StartupError(f"dispatcher exited:\n{self.dispatcher.tail()}")
                try:
                    auth = {"Authorization": f"Bearer {self.client_key}"}
                    async with session.get(f"{self.api_url}/v1/models", headers=auth) as r:
                        last = await r.text()
                        if r.status == 200 and f'"{model}"' in last:
                            return
                except aiohttp.ClientError as e:
                    last = repr(e)
                await asyncio.sleep(0.2)
        raise StartupError(f"{model} never listed by the router ({last[:300]})")

    def router_pids(self, model: str) -> dict[str, int]:
        """The router's processes on the path of a request for `model`."""
        assert self.api is not None and self.dispatcher is not None
        pids = {"api": self.api.pid, "dispatcher": self.dispatcher.pid}
        for i, agent in enumerate(self.agents.get(model, []), start=1):
            pids[f"agent-{i}" if len(self.agents[model]) > 1 else "agent"] = agent.pid
        return pids

    def service_pids(self) -> dict[str, int]:
        """Every router service process, for the RSS table."""
        pids: dict[str, int] = {}
        if self.api is not None:
            pids["api"] = self.api.pid
        if self.dispatcher is not None:
            pids["dispatcher"] = self.dispatcher.pid
        for model, agents in self.agents.items():
            for i, agent in enumerate(agents, start=1):
                pids[f"agent ({model} #{i})"] = agent.pid
        return pids

    # --- the floor ---------------------------------------------------------------------------
    async def start_floor(
        self, name: str, models: list[str], *, redis_url: str | None = None
    ) -> None:
        """A bare pipeline (`bench/floor.py`) in front of the fakes serving `models`, as target
        `name`, in a namespace under this stack's own (so `clean_broker` removes its queues
        too); with `redis_url`, its bare cache too. Listed in `floors` once it answers."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        floor = [sys.executable, "-m", "bench.floor"]
        common = ["--namespace", f"{self.namespace}.{name.replace('+', '-')}"]
        common += ["--rabbitmq-url", BrokerSettings().rabbitmq_url]
        api = self._spawn(f"{name}-api", [*floor, "api", *common, "--port", str(port)], {})
        await wait_http(f"{url}/health", api)
        cache = ["--redis-url", redis_url] if redis_url else []
        dispatcher = self._spawn(f"{name}-dispatcher", [*floor, "dispatcher", *common, *cache], {})
        agents = {
            model: self._spawn(
                f"{name}-agent-{model}",
                [*floor, "agent", *common, "--model", model, "--backend", self.fakes[model]],
                {},
            )
            for model in models
        }
        # Nothing to wait on but an answer: the agents' consumers are up once one comes back.
        await wait_floor(url, models, [api, dispatcher, *agents.values()])
        pids = {
            model: {"api": api.pid, "dispatcher": dispatcher.pid, "agent": agent.pid}
            for model, agent in agents.items()
        }
        self.floors[name] = Floor(url, pids)

    # --- LiteLLM -------------------------------------------------------------------------------
    def spawn_litellm(self) -> None:
        """Start LiteLLM (after the fakes); it takes a minute to import: see `litellm_ready`."""
        port = free_port()
        config = self.log_dir / "litellm.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(litellm_config(self.fakes))
        argv = [str(PEERS_VENV / "bin" / "litellm"), "--config", str(config)]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "2"]
        env = {
            "LITELLM_MASTER_KEY": self.litellm_key,  # it refuses to start without one
            "LITELLM_LOG": "ERROR",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map at start
            "LITELLM_MODE": "PRODUCTION",
            "DISABLE_ADMIN_UI": "True",
            "NO_DOCS": "True",
            "TELEMETRY": "False",
        }
        self.litellm = self._spawn("litellm", argv, env)
        self.litellm_url = f"http://127.0.0.1:{port}"

    async def litellm_ready(self) -> None:
        assert self.litellm is not None
        await wait_http(f"{self.litellm_url}/health/liveliness", self.litellm, timeout=300)

    # --- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()  # all at once: each drains in parallel
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


async def wait_floor(url: str, models: list[str], processes: list[Process]) -> None:
    """Until a floor answers a request for each model (its queues and consumers are up)."""
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for model in models:
            body = chat_body(model, "floor up?")
            while True:
                dead = [p for p in processes if not p.is_running()]
                if dead:
                    raise StartupError(f"{dead[0].name} exited:\n{dead[0].tail()}")
                try:
                    async with session.post(f"{url}/v1/chat/completions", data=body) as r:
                        if r.status == 200:
                            break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise StartupError(f"the floor never answered for {model}")
                await asyncio.sleep(0.2)


def litellm_config(fakes: dict[str, str]) -> str:
    """LiteLLM's proxy config: each fake as an OpenAI-compatible backend, logging off."""
    lines = ["model_list:"]
    for model, url in fakes.items():
        lines += [
            f"  - model_name: {router_id(model)}",
            "    litellm_params:",
            f"      model: openai/{model}",
            f"      api_base: {url}/v1",
            "      api_key: none",
        ]
    lines += [
        "litellm_settings:",
        "  set_verbose: false",
        "  json_logs: false",
        "  turn_off_message_logging: true",
        "  telemetry: false",
        "  request_timeout: 60",
        "general_settings:",
        "  disable_spend_logs: true",
        "  disable_error_logs: true",
        "  disable_reset_budget: true",
        "  allow_requests_on_db_unavailable: true",
    ]
    return "\n".join(lines) + "\n"
