"""A broker that closes a service's connections (a restart, `rabbitmqctl close_connection`), as
the service's log tells it: one WARNING that the broker was lost, one INFO that it is back, and
no ERROR or traceback from the client library for what heals itself."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shared.amqp import Broker
from shared.logs import configure_logging
from tests.conftest import require_services, skip_or_fail

pytestmark = pytest.mark.integration

URL = "amqp://guest:guest@127.0.0.1:5672/"


def close_connections(name: str) -> int:
    """Have the broker close every connection whose `connection_name` starts with `name/`."""

    def ctl(*args: str) -> str:
        return subprocess.run(
            ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
        ).stdout

    rows = ctl("list_connections", "pid", "client_properties", "--no-table-headers")
    pids = [row.split("\t", 1)[0] for row in rows.splitlines() if f'"{name}/' in row]
    for pid in pids:
        ctl("close_connection", pid, "restart")
    return len(pids)


@dataclass
class Line:
    level: int
    name: str
    message: str
    traceback: bool


class Keep(logging.Handler):
    """Each record as written, formatted at once (aio-pika's arguments do not outlive it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[Line] = []

    def emit(self, record: logging.LogRecord) -> None:
        traceback = bool(record.exc_info or record.exc_text)
        self.lines.append(Line(record.levelno, record.name, record.getMessage(), traceback))


@pytest.fixture
def logged() -> Iterator[Keep]:
    """The service's logging set-up at INFO, its records kept."""
    require_services()
    if shutil.which("rabbitmqctl") is None:
        skip_or_fail("rabbitmqctl not installed: cannot close a connection from the broker")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("INFO", "test")
    keep = Keep()
    for handler in root.handlers:
        keep.filters = handler.filters  # the redactor, as every handler has it
    root.addHandler(keep)
    try:
        yield keep
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


async def test_a_broker_restart_is_one_warning_and_one_info(logged: Keep) -> None:
    name = f"logs-{uuid.uuid4().hex[:8]}"
    broker = Broker(URL, name=name, publish_timeout=2)
    await broker.connect()
    try:
        channel = await broker.channel(prefetch=1)
        queue = await channel.declare_queue("", exclusive=True)

        async def ignore(*_: object) -> None:
            return None

        await broker.consume(channel, queue, ignore)
        assert close_connections(name) == 2
        for _ in range(100):
            await asyncio.sleep(0.1)
            if any(x.level == logging.INFO and x.name == "shared.amqp" for x in logged.lines):
                break
        await asyncio.sleep(0.5)  # anything the client library logs late
        assert await broker.publishing(5)
    finally:
        await broker.close()
    lines = logged.lines
    assert not [x for x in lines if x.level >= logging.ERROR or x.traceback], lines
    ours = [(x.level, x.message) for x in lines if x.name == "shared.amqp"]
    assert [level for level, _ in ours] == [logging.WARNING, logging.INFO], lines
    assert f"{name}: lost the broker at 127.0.0.1:5672" in ours[0][1]
    assert "CONNECTION_FORCED - restart" in ours[0][1]
    assert len(lines) == 2, lines
