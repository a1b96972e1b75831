"""The suite's own RabbitMQ node and Redis server, as processes the tests own.

Neither touches the machine's shared servers (RabbitMQ on 5672, Redis on 6379): each runs on
spare ports, with its data, logs, pid file and Erlang cookie in a temporary directory, in its own
process group. Every signal (SIGTERM, SIGKILL, SIGSTOP, SIGCONT) goes to that group only, by the
pid the suite started, never by name.

RabbitMQ's config file sets:
- `loopback_users = none`: the `guest` user may connect (it does anyway on 127.0.0.1; explicit
  so the node behaves the same if the address changes).
- `consumer_timeout = 60000` (ms): the broker closes the channel of a consumer that holds a
  delivery unacked longer than this. One minute is above every deadline the suite uses (30 s at
  most), so a slow but healthy consumer is never cut off by the broker, which would look like a
  fault the test did not inject; and it is far below the 30-minute default, so a consumer
  frozen with SIGSTOP (TCP still open, heartbeats not yet missed) cannot sit on jobs for long.
  Production should set it above its own longest job (REQUEST_TIMEOUT) for the same reason.
- `heartbeat = 10` (s): a frozen peer is detected in ~20 s instead of ~2 min.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

RABBITMQ_SCRIPTS = (Path("/usr/lib/rabbitmq/bin"),)


def _find_rabbitmq_script(name: str) -> str | None:
    """The real RabbitMQ script, not Debian's /usr/sbin wrapper (which `su`s to `rabbitmq`)."""
    for folder in RABBITMQ_SCRIPTS:
        candidate = folder / name
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


def rabbitmq_installed() -> bool:
    return _find_rabbitmq_script("rabbitmq-server") is not None


def redis_installed() -> bool:
    return shutil.which("redis-server") is not None


def spare_port() -> int:
    """A free port below the kernel's ephemeral range (32768+), so outgoing connections of
    other processes never happen to hold it when a node restarts on it."""
    for _ in range(200):
        port = random.randint(20_000, 32_000)
        if _port_is_free(port) and _port_is_free(port + 1):
            return port
    raise RuntimeError("no spare port found")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _signal_group(process: subprocess.Popen[bytes] | None, sig: int) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)  # the group this process leads (start_new_session)


@dataclass
class RabbitNode:
    """A RabbitMQ node of our own: `start()`, then break it with `stop()`, `kill()`, `pause()`.

    The node keeps its name, ports and data directory across restarts, so durable queues and
    persistent messages survive them exactly as they would in production.
    """

    base: Path
    name: str = field(default_factory=lambda: f"rabbit_faults_{os.getpid()}@localhost")
    port: int = 0
    dist_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.base / f"server-{self.starts}.log"

    def _prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        home = self.base / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():  # a private cookie: the CLI and the node share this HOME
            cookie.write_text(uuid.uuid4().hex.upper())
            cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "consumer_timeout = 60000\n"
            "heartbeat = 10\n"
        )

    def _env(self) -> dict[str, str]:
        b = self.base
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(b / "home"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_PID_FILE": str(b / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 90.0) -> None:
        """Start (or restart) the node and wait until it accepts connections.

        The first start picks ports and retries once on a port lost to a race; restarts keep
        the ports (clients reconnect to the same URL).
        """
        if self.is_running():
            raise RuntimeError("the node is already running")
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            if attempts > 1:
                self.port, self.dist_port = spare_port(), spare_port()
            self._prepare()
            self.starts += 1
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    [str(_find_rabbitmq_script("rabbitmq-server"))],
                    env=self._env(),
                    cwd=self.base,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group: signals reach only it
                )
            try:
                self._await_startup(timeout)
                return
            except RuntimeError:
                self.kill()
                if attempt == attempts - 1:
                    raise

    def _await_startup(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_running():
                raise RuntimeError(f"RabbitMQ exited while starting:\n{self.log_tail()}")
            # Fails at once while the node is not yet registered with epmd: poll it.
            result = self.ctl("await_startup", "--timeout", "15", check=False, timeout=30)
            if result.returncode == 0 and self._accepts_connections():
                return
            time.sleep(0.5)
        raise RuntimeError(f"RabbitMQ did not start in {timeout:.0f}s:\n{self.log_tail()}")

    def _accepts_connections(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True
        except OSError:
            return False

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """`rabbitmqctl -n <this node> ...` with this node's cookie."""
        result = subprocess.run(
            [str(_find_rabbitmq_script("rabbitmqctl")), "-n", self.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr[-2000:]}")
        return result

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown (SIGTERM: the node closes connections and flushes queues)."""
        _signal_group(self.process, signal.SIGCONT)  # a paused node cannot shut down
        _signal_group(self.process, signal.SIGTERM)
        self._wait(timeout)

    def kill(self) -> None:
        """kill -9 the node's whole process group: no goodbye to any client."""
        _signal_group(self.process, signal.SIGKILL)
        self._wait(30)

    def pause(self) -> None:
        _signal_group(self.process, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_group(self.process, signal.SIGCONT)

    def _wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait(30)
        # The group may outlive its leader for a moment (beam after its shell).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            for _ in range(100):
                os.killpg(self.process.pid, 0)
                time.sleep(0.1)
            os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    # --- what the tests look at -----------------------------------------------------------------
    def queues(self) -> dict[str, tuple[int, int]]:
        """{name: (messages ready, consumers)} of every queue on the node."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "messages", "consumers")
        found: dict[str, tuple[int, int]] = {}
        for line in out.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit():
                found[parts[0]] = (int(parts[1]), int(parts[2]))
        return found


@dataclass
class RedisNode:
    """A redis-server of our own, in its own process group, with no persistence."""

    base: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = spare_port()
        log = (self.base / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(shutil.which("redis-server")),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--pidfile",
                str(self.base / "redis.pid"),
                "--dir",
                str(self.base),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("redis-server exited while starting")
            if self.ping():
                return
            time.sleep(0.1)
        raise RuntimeError("redis-server did not answer PING")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        _signal_group(self.process, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def pause(self) -> None:
        _signal_group(self.process, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_group(self.process, signal.SIGCONT)

    def stop(self) -> None:
        _signal_group(self.process, signal.SIGCONT)
        _signal_group(self.process, signal.SIGTERM)
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
