"""An API whose broker cannot be used keeps saying so while it answers 503, not only once."""

from __future__ import annotations

import asyncio

import pytest

from services.api import bus as bus_module
from services.api.bus import ApiBus
from services.api.settings import ApiSettings
from shared.topology import topology_for
from tests.support.heap import collect_unheard


async def test_a_broker_still_down_is_said_again_now_and_then(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(bus_module, "RECONNECT_INTERVAL", 0.05)
    monkeypatch.setattr(bus_module, "STILL_DOWN_EVERY", 0.15)
    settings = ApiSettings(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/")
    bus = ApiBus(settings, topology_for(settings))
    await bus.start()
    try:
        await asyncio.sleep(0.5)
    finally:
        await bus.stop()
        # aio-pika drops a connection that failed to open without closing it; its __del__
        # schedules the close. Let that happen now, on this test's loop.
        collect_unheard()
        await asyncio.sleep(0.05)
    said = [r.getMessage() for r in caplog.records if r.name == "services.api.bus"]
    assert said[0].startswith("broker not usable at start (cannot connect to the broker at ")
    reminders = [m for m in said[1:] if m.startswith("broker still not usable after ")]
    assert 2 <= len(reminders) <= 4, said
    assert all("127.0.0.1:1, vhost /" in m and "answering 503" in m for m in reminders)
