"""The router's real processes wired to the suite's own broker and Redis.

A `FaultRouter` wraps `tests.support.procs.Stack` (fresh broker namespace, processes stopped by
the pids it started) and adds what the fault cases need: fake vLLM servers, agents, optional
fault proxies in front of the broker, Redis or an inference server, and dispatchers built with
test-only crash hooks (`tests.faults.harness.crashing`, never part of the service code).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fakes.cli import build_parser, config_from_args
from fakes.core import reply_tokens
from services.dispatcher.dummy import PLACEHOLDER
from tests.faults.harness.load import Ledger, assert_ledger, failures
from tests.faults.harness.nodes import RabbitNode, RedisNode
from tests.faults.harness.proxy import FaultProxy
from tests.support.procs import LOG_DIR, ROOT, Service, Stack, free_port, wait_for, wait_http

MODEL = "tiny"  # what the fake vLLM serves
LOCAL = f"local_{MODEL}"  # what clients ask the router for
AGENT_NAMES = ("a1", "a2", "a3")
AGENT_TOKENS = ",".join(f"{name}=tok-{name}" for name in AGENT_NAMES)
OPENAI_MODELS = "gpt-4o-mini,gpt-4o"  # what the fake OpenAI serves


def fake_answer(args: list[str], *, models: str = MODEL) -> str | None:
    """The text a fake started with these flags answers every request (None with --echo)."""
    parser = build_parser("fake", port=0, models=models, api_key="sk-fake")
    config = config_from_args(parser.parse_args(args))
    return None if config.echo else "".join(reply_tokens(config))


@dataclass
class ModuleService(Service):
    """A service started as `python -m <module>` (the crash-hook wrappers)."""

    module: str = ""

    def start(self) -> ModuleService:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{self.name}-{uuid.uuid4().hex[:6]}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self


@dataclass
class Fake:
    service: Service
    url: str
    answer: str | None = None  # what it answers every request; None when that varies

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_fake/stats", timeout=5).json())

    def script(self, *steps: dict[str, Any]) -> None:
        """Queue fault steps (fakes.faults): one is used per chat request."""
        httpx.post(f"{self.url}/_fake/script", json=list(steps), timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_fake/reset", timeout=5).raise_for_status()


@dataclass
class Agent:
    name: str
    service: Service
    url: str


@dataclass
class FaultRouter:
    stack: Stack
    tmp: Path
    rabbit: RabbitNode
    redis: RedisNode | None = None
    broker_proxy: FaultProxy | None = None
    apis: list[str] = field(default_factory=list)
    proxies: list[FaultProxy] = field(default_factory=list)
    fakes: list[Fake] = field(default_factory=list)
    openai_fakes: list[Fake] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.apis[0]

    @property
    def namespace(self) -> str:
        return self.stack.namespace

    @property
    def durability(self) -> str:
        return self.stack.base_env.get("DURABILITY", "durable")

    @property
    def prefix(self) -> str:
        return f"{self.namespace}.v1.{self.durability}"

    def proxy(self, port: int) -> FaultProxy:
        proxy = FaultProxy(port).start()
        self.proxies.append(proxy)
        return proxy

    # --- processes --------------------------------------------------------------------------
    def add_api(self, **extra: str) -> str:
        url = self.stack.start_api(AGENT_TOKENS=AGENT_TOKENS, **extra)
        self.apis.append(url)
        return url

    def add_dispatcher(self, **extra: str) -> Service:
        return self.stack.start_dispatcher(self.tmp, **extra)

    def add_crashing_dispatcher(self, **hooks: str) -> Service:
        """A dispatcher with a crash hook (see `tests.faults.harness.crashing`)."""
        path = self.tmp / f"registry-{uuid.uuid4().hex[:6]}.sqlite3"
        env = self.stack.env(REGISTRY_PATH=str(path), **hooks)
        service = ModuleService(
            "dispatcher-crashing", [], env, module="tests.faults.harness.crashing"
        ).start()
        self.stack.services.append(service)
        return service

    def fake(self, *args: str) -> Fake:
        port = free_port()
        flags = ["--port", str(port), "--models", MODEL, *args]
        service = self.stack.start("fake-vllm", ["fake-vllm", *flags])
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", service=service)
        fake = Fake(service, url, fake_answer(flags))
        self.fakes.append(fake)
        return fake

    def fake_openai(self, *args: str) -> Fake:
        """A fake OpenAI (key `sk-fake`, models gpt-4o-mini and gpt-4o)."""
        port = free_port()
        flags = ["--port", str(port), *args]
        service = self.stack.start("fake-openai", ["fake-openai", *flags])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(f"{url}/_fake/stats"), timeout=20, message="fake-openai down")
        fake = Fake(service, url, fake_answer(flags, models=OPENAI_MODELS))
        self.openai_fakes.append(fake)
        return fake

    def agent(self, name: str, upstream: str, *, ready: bool = True, **extra: str) -> Agent:
        """An agent serving `local_tiny` from the server at `upstream` (a base URL)."""
        port = free_port()
        env = {
            "AGENT_NAME": name,
            "AGENT_TOKEN": f"tok-{name}",
            "ROUTER_URL": self.api,
            "VLLM_URL": f"{upstream}/v1",
            "AGENT_MODELS": MODEL,
            "AGENT_PORT": str(port),
            "AGENT_BIND": "127.0.0.1",
            "AGENT_HOST": "127.0.0.1",
            "HEARTBEAT_INTERVAL": "0.5",
            "AGENT_CONCURRENCY": "2",
            "DRAIN_TIMEOUT": "2",
            **extra,
        }
        service = self.stack.start(f"agent-{name}", ["agent"], **env)
        url = f"http://127.0.0.1:{port}"
        if ready:
            wait_http(f"{url}/ready", service=service, timeout=30)
        return Agent(name, service, url)

    # --- observations -----------------------------------------------------------------------
    def models(self) -> list[str]:
        try:
            response = httpx.get(f"{self.api}/v1/models", timeout=5)
        except httpx.HTTPError:
            return []
        if response.status_code != 200:
            return []
        return [entry["id"] for entry in response.json()["data"]]

    def wait_listed(self, model: str = LOCAL, timeout: float = 20.0) -> None:
        wait_for(lambda: model in self.models(), timeout=timeout, message=f"{model} not listed")

    def chat(self, model: str = "dummy", *, timeout: float = 30.0, **body: Any) -> httpx.Response:
        return httpx.post(
            f"{self.api}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
            timeout=timeout,
        )

    def queue(self, suffix: str) -> tuple[int, int] | None:
        """(messages, consumers) of `<prefix>.<suffix>`, None when it does not exist."""
        return self.rabbit.queues().get(f"{self.prefix}.{suffix}")

    def explain(self, request_ids: list[str], limit: int = 60) -> str:
        """What every process of this router logged about these requests."""
        lines = []
        for service in self.stack.services:
            for line in service.log().splitlines():
                if any(rid in line for rid in request_ids):
                    lines.append(f"[{service.name} {service.pid}] {line[:300]}")
        return "\n".join(lines[:limit]) or "(no log line names them)"

    def answers(self) -> dict[str, str]:
        """Each model's one answer, as far as this router's fakes give one: `dummy`'s, and a
        model's served by fakes that all answer the same fixed text (others go unchecked)."""
        answers = {"dummy": PLACEHOLDER}
        for models, fakes in ([LOCAL], self.fakes), (OPENAI_MODELS.split(","), self.openai_fakes):
            texts = {fake.answer for fake in fakes}
            if len(texts) == 1 and (text := texts.pop()) is not None:
                answers.update(dict.fromkeys(models, text))
        return answers

    def check(self, ledger: Ledger, **expectations: Any) -> None:
        """`assert_ledger`, with the processes' log lines about the failed requests; every
        model's `answers()` are checked unless the case passes its own `answers`."""
        expectations.setdefault("answers", self.answers())
        try:
            assert_ledger(ledger, **expectations)
        except AssertionError as e:
            bad = [x.request_id for x in failures(ledger, **expectations) if x.request_id]
            raise AssertionError(f"{e}\n--- logs ---\n{self.explain(bad[:10])}") from None

    def logs(self, name: str) -> str:
        return "\n".join(s.log() for s in self.stack.services if s.name.startswith(name))

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
