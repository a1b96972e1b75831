"""The registry's warm-up on the real RabbitMQ: timed from when the dispatcher hears the control
fanout, at its start and again after its connection to the broker was lost.

One `DispatcherService` in this process, in the test's own broker namespace. The broker closes
its consuming connection (`rabbitmqctl close_connection`, as an operator or a failover would),
and aio-pika reconnects it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.dispatcher.service import DispatcherService
from services.dispatcher.settings import DispatcherSettings
from tests.conftest import require_services, skip_or_fail
from tests.support.procs import new_namespace

pytestmark = pytest.mark.integration

TTL = 3600.0  # far longer than the test: only when the warm-up started matters


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def close_connection(name: str) -> None:
    """Have the broker close the client connection named `name` (its `connection_name`)."""
    rows = rabbitmqctl("list_connections", "pid", "client_properties", "--no-table-headers")
    pids = [
        line.split("\t", 1)[0]
        for line in rows.splitlines()
        if f'{{"connection_name","{name}"}}' in line
    ]
    assert len(pids) == 1, f"connection {name} not found once: {rows}"
    rabbitmqctl("close_connection", pids[0], "test: connection lost")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[DispatcherService]:
    require_services()
    if shutil.which("rabbitmqctl") is None:
        skip_or_fail("rabbitmqctl not installed: cannot close a connection from the broker")
    settings = DispatcherSettings(
        broker_namespace=new_namespace(),
        durability="transient",
        registry_path=str(tmp_path / "registry.sqlite3"),
        heartbeat_ttl=TTL,
        redis_url="",
        openai_api_key=None,
    )
    service = DispatcherService(settings)
    try:
        yield service
    finally:
        await service.stop()


async def test_the_warm_up_starts_when_the_control_consumer_consumes(
    service: DispatcherService,
) -> None:
    """Not when the service was built: `run()` retries `start()` while the broker is down, and
    a warm-up spent waiting for it would leave unknown models 404 before any heartbeat."""
    before_start = time.time()
    await service.start()
    assert service.registry.view(before_start + TTL).warming_up


async def test_the_warm_up_lasts_the_outage_and_one_ttl_after_the_reconnect(
    service: DispatcherService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control queue is exclusive: what agents announce while the connection is down never
    reaches this dispatcher, however long the outage and whether or not its agents expired."""
    await service.start()
    table = service.registry.table
    # aio-pika may reconnect within milliseconds: look at the table when the loss is handled.
    during_outage: list[bool] = []
    stop_listening = table.stop_listening

    def cut_off(now: float) -> None:
        stop_listening(now)
        during_outage.append(table.view(time.time() + 100 * TTL).warming_up)

    monkeypatch.setattr(table, "stop_listening", cut_off)
    before_loss = time.time()
    assert not service.registry.view(before_loss + TTL).warming_up
    close_connection(f"dispatcher-{service.process_id}/consume")
    deadline = time.monotonic() + 20
    while not (service.broker.is_consuming and service.registry.view(before_loss + TTL).warming_up):
        assert time.monotonic() < deadline, "no new warm-up after the reconnect"
        await asyncio.sleep(0.05)
    assert during_outage and all(during_outage)
    assert not service.registry.view(time.time() + TTL + 1).warming_up  # one TTL, no more
