"""Starting the router's real service processes for integration tests.

Each process gets the test run's own broker namespace, so tests never steal each other's jobs
(nor a running `make dev`'s). Processes are stopped by the pids the tests started, never by
name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = ROOT / "var" / "test-logs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Every namespace this test process handed out: its queues and exchanges are deleted when the
# session ends (tests/conftest.py), so runs do not leave idle durable queues on the broker.
NAMESPACES: set[str] = set()


def new_namespace() -> str:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    NAMESPACES.add(namespace)
    return namespace


@dataclass
class Service:
    """One running service process and its log file."""

    name: str
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    def start(self) -> Service:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{self.name}-{uuid.uuid4().hex[:6]}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *self.args],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.is_running():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        if self.is_running():
            assert self.process is not None
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def wait_http(
    url: str, *, timeout: float = 20.0, status: int = 200, service: Service | None = None
) -> None:
    """Poll `url` until it answers `status`; fail with the service's log if it never does."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if service is not None and not service.is_running():
            raise RuntimeError(f"{service.name} exited early:\n{service.log()[-4000:]}")
        try:
            response = httpx.get(url, timeout=1.0)
            if response.status_code == status:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.1)
    log = service.log()[-4000:] if service else ""
    raise TimeoutError(f"{url} not ready: {last}\n{log}")


def wait_for(
    predicate: object, *, timeout: float, interval: float = 0.1, message: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise TimeoutError(message or "condition not met in time")


@dataclass
class Stack:
    """A set of router processes sharing one broker namespace."""

    namespace: str
    base_env: dict[str, str]
    services: list[Service] = field(default_factory=list)
    api_ports: list[int] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {"BROKER_NAMESPACE": self.namespace, **self.base_env, **extra}

    def start_api(self, **extra: str) -> str:
        port = free_port()
        service = Service("api", ["api"], self.env(API_PORT=str(port), **extra)).start()
        self.services.append(service)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ready", service=service)
        self.api_ports.append(port)
        return url

    def start_dispatcher(self, tmp: Path, **extra: str) -> Service:
        path = tmp / f"registry-{uuid.uuid4().hex[:6]}.sqlite3"
        env = self.env(REGISTRY_PATH=str(path), **extra)
        service = Service("dispatcher", ["dispatcher"], env).start()
        self.services.append(service)
        return service

    def start(self, name: str, args: list[str], **extra: str) -> Service:
        service = Service(name, args, self.env(**extra)).start()
        self.services.append(service)
        return service

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


@contextmanager
def running_stack(base_env: dict[str, str] | None = None) -> Iterator[Stack]:
    stack = Stack(namespace=new_namespace(), base_env=base_env or {})
    try:
        yield stack
    finally:
        stack.stop()
