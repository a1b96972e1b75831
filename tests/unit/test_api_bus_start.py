"""The API's bus and server around the broker: a broker that cannot be used is said again
while the API answers 503; a job the broker may still route is cancelled; a stopping API
refuses new jobs; uvicorn's error for a stream dropped on purpose is filtered."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from services.api import bus as bus_module
from services.api.bus import ApiBus
from services.api.server import DroppedStreamFilter, stopping_error
from services.api.settings import ApiSettings
from shared.amqp import Broker, broker_address
from shared.errors import BrokerUnavailableError, ServiceUnavailableError
from shared.messages import Envelope, Job, MessageType
from shared.topology import cancel_routing_key, topology_for


async def test_a_broker_still_down_is_said_again_now_and_then(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(bus_module, "RECONNECT_INTERVAL", 0.05)
    monkeypatch.setattr(bus_module, "STILL_DOWN_EVERY", 0.15)
    settings = ApiSettings(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/")

    async def refused(broker: Broker, timeout: float = 10.0) -> None:
        # The refusal Broker.connect gives, without aio-pika: a connection object that failed
        # to open is dropped unclosed by aio-pika, and its __del__ leaves a close coroutine
        # that a later test in this process would be blamed for.
        raise BrokerUnavailableError(
            f"cannot connect to the broker at {broker_address(settings.rabbitmq_url)}: "
            "AMQPConnectionError"
        )

    monkeypatch.setattr(Broker, "connect", refused)
    bus = ApiBus(settings, topology_for(settings))
    await bus.start()
    try:
        await asyncio.sleep(0.5)
    finally:
        await bus.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "services.api.bus"]
    assert said[0].startswith("broker not usable at start (cannot connect to the broker at ")
    reminders = [m for m in said[1:] if m.startswith("broker still not usable after ")]
    assert 2 <= len(reminders) <= 4, said
    assert all("127.0.0.1:1, vhost /" in m and "answering 503" in m for m in reminders)


async def test_a_job_whose_publish_timed_out_is_cancelled_behind_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker in a memory alarm holds the publish past PUBLISH_TIMEOUT and routes it once the
    alarm clears: the client got 503 and may retry, so the first copy must not run too."""
    settings = ApiSettings(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/")
    bus = ApiBus(settings, topology_for(settings))
    published: list[tuple[str, str]] = []

    async def blocked(env: Envelope, routing_key: str, **kwargs: object) -> None:
        published.append((env.type, routing_key))
        if env.type == MessageType.JOB:
            raise BrokerUnavailableError()

    monkeypatch.setattr(Broker, "is_consuming", property(lambda _: True))
    monkeypatch.setattr(bus._broker, "publish", blocked)
    job = Job(request_id="r1", model="local_m", reply_to="q", deadline=time.time() + 60, body=b"{}")
    with pytest.raises(BrokerUnavailableError):
        await bus.submit(job)
    await asyncio.gather(*bus._background)
    topology = bus.topology
    assert published == [
        (MessageType.JOB, topology.jobs_queue),
        (MessageType.CANCEL, cancel_routing_key("local_m")),
    ]


async def test_a_job_after_the_api_stopped_waiting_is_refused_and_never_published(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past DRAIN_TIMEOUT the API answers what still waits 503 `api_stopping`; a request whose
    body arrived only then got its job published, ran for nobody, and was cut off with a 500."""
    settings = ApiSettings(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/")
    bus = ApiBus(settings, topology_for(settings))
    published: list[str] = []

    async def publish(env: Envelope, routing_key: str, **kwargs: object) -> None:
        published.append(env.type)

    monkeypatch.setattr(Broker, "is_consuming", property(lambda _: True))
    monkeypatch.setattr(bus._broker, "publish", publish)
    assert bus.end_waiting(stopping_error) == 0
    job = Job(request_id="r1", model="local_m", reply_to="q", deadline=time.time() + 60, body=b"{}")
    with pytest.raises(ServiceUnavailableError) as info:
        await bus.submit(job)
    assert info.value.code == "api_stopping" and published == []
    with pytest.raises(ServiceUnavailableError) as again:
        await bus.submit(job)
    # A new error each time: one raised again and again gathers every raise's traceback.
    assert again.value is not info.value


def test_only_uvicorns_error_for_a_dropped_stream_is_filtered() -> None:
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, message, None, None)

    drop = DroppedStreamFilter()
    assert not drop.filter(record("ASGI callable returned without completing response."))
    assert drop.filter(record("ASGI callable returned without starting response."))
    assert drop.filter(record("Exception in ASGI application"))
