"""A router stack with agents in front of fake vLLM servers, for integration tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.procs import Service, Stack, free_port, wait_for, wait_http

TTL = 3.0
NAMES = ("a1", "a2", "a3", "b1", "b2")
AGENT_TOKENS = ",".join(f"{name}=tok-{name}" for name in NAMES)
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Fake:
    service: Service
    url: str

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_fake/stats", timeout=2).json())


@dataclass
class Agent:
    service: Service
    url: str


@dataclass
class Router:
    stack: Stack
    tmp: Path
    apis: list[str]

    @property
    def api(self) -> str:
        return self.apis[0]

    def add_api(self, **extra: str) -> str:
        url = self.stack.start_api(AGENT_TOKENS=AGENT_TOKENS, **extra)
        self.apis.append(url)
        return url

    def add_dispatcher(self) -> Service:
        return self.stack.start_dispatcher(self.tmp, HEARTBEAT_TTL=str(TTL))

    def fake(self, *args: str, models: str = "m") -> Fake:
        port = free_port()
        service = self.stack.start(
            "fake-vllm", ["fake-vllm", "--port", str(port), "--models", models, *args]
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", service=service)
        return Fake(service, url)

    def agent(
        self, name: str, fake: Fake, *, ready: bool = True, token: str = "", **extra: str
    ) -> Agent:
        port = free_port()
        env = {
            "AGENT_NAME": name,
            "AGENT_TOKEN": token or f"tok-{name}",
            "ROUTER_URL": self.api,
            "VLLM_URL": f"{fake.url}/v1",
            "AGENT_PORT": str(port),
            "AGENT_HOST": "127.0.0.1",
            "HEARTBEAT_INTERVAL": "0.5",
            "AGENT_CONCURRENCY": "2",
            "DRAIN_TIMEOUT": "2",
            **extra,
        }
        service = self.stack.start(f"agent-{name}", ["agent"], **env)
        url = f"http://127.0.0.1:{port}"
        if ready:
            wait_http(f"{url}/ready", service=service)
        return Agent(service, url)

    def models(self, api: str | None = None) -> list[str]:
        response = httpx.get(f"{api or self.api}/v1/models", timeout=5)
        response.raise_for_status()
        return [entry["id"] for entry in response.json()["data"]]

    def wait_listed(self, model: str, *, timeout: float = 5.0) -> None:
        wait_for(lambda: model in self.models(), timeout=timeout, message=f"{model} not listed")

    def chat(self, model: str, *, api: str | None = None, **body: Any) -> httpx.Response:
        return httpx.post(
            f"{api or self.api}/v1/chat/completions",
            json={"model": model, "messages": MESSAGES, **body},
            timeout=25,
        )
