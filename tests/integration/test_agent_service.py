"""An agent in-process on the real RabbitMQ, in front of an in-process fake vLLM, registering
with the real API (a process): what its readiness and its lifecycle rely on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aio_pika
import httpx
import pytest

from fakes import FakeConfig, running
from fakes import vllm as fake_vllm
from fakes.server import serve
from services.agent.heartbeat import Registrar
from services.agent.service import AgentService, run
from services.agent.settings import AgentSettings
from shared.settings import Durability
from shared.topology import Topology
from tests.conftest import require_services
from tests.support.procs import running_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

URL = "amqp://guest:guest@127.0.0.1:5672/"
TOKEN = "tok-t1"


@pytest.fixture
async def settings() -> AsyncIterator[AgentSettings]:
    """Settings for one agent in a broker namespace of its own, with its fake vLLM and the real
    API of that namespace, which knows the agent's token."""
    require_services()
    vllm = fake_vllm.create_app(FakeConfig(models=["m"]))
    env = {"DURABILITY": Durability.TRANSIENT.value, "AGENT_TOKENS": f"t1={TOKEN}"}
    with running_stack(env) as stack:
        api_url = stack.start_api()
        async with running(vllm) as vllm_url:
            yield AgentSettings(
                rabbitmq_url=URL,
                broker_namespace=stack.namespace,
                durability=Durability.TRANSIENT,
                agent_name="t1",
                agent_token=TOKEN,
                agent_models="local_m=m",
                vllm_url=vllm_url,
                router_url=api_url,
                agent_bind="127.0.0.1",
                agent_port=0,
                heartbeat_interval=0.05,
                drain_timeout=1,
            )


async def until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout}s"
        await asyncio.sleep(0.05)


async def start_heartbeating(service: AgentService) -> Registrar:
    """Start the agent; returns once it is ready and has heartbeated through the real API."""
    await service.start()
    registrar = service.registrar
    assert registrar is not None
    await until(
        lambda: service.is_ready() and registrar.heartbeats_sent > 0,
        timeout=10,
        what="registered and heartbeating",
    )
    return registrar


async def test_an_agent_whose_consumer_the_broker_dropped_is_not_attached(
    settings: AgentSettings,
) -> None:
    """The consumer is still in the agent's list, but gone from its channel (as after the
    broker cancelled it for a deleted queue): no heartbeats, not ready."""
    service = AgentService(settings)
    try:
        # Registered and heartbeating through the real API, so readiness is the consumers' alone.
        await start_heartbeating(service)
        queue, tag, _ = service.broker._consumers[-1]  # the model queue's consumer
        assert queue.name.endswith(".agent.local_m")
        # Straight on the aiormq channel, so aio-pika does not know and does not consume again.
        underlay = await queue.channel.get_underlay_channel()
        await underlay.basic_cancel(tag)
        assert not service.is_attached()
        assert not service.is_ready()
        assert service.status()["consuming"] is False
    finally:
        await service.stop()


async def test_an_agent_whose_heartbeats_end_stops_with_an_error(
    settings: AgentSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run()` raises, and the agent stops consuming, once its heartbeats end after a real
    registration. Only a refused token or a bug ends them (the loop outlives any other
    Exception: services/agent/heartbeat.py), so a patched loop stands in for that bug; the rest
    (broker, API, registration, stopping) is real. `serve()` alone is unit-tested
    in tests/unit/test_agent_service.py."""
    registered_when_it_died: list[bool] = []

    async def dies(registrar: Registrar) -> None:
        registered_when_it_died.append(registrar.registered.is_set())
        raise RuntimeError("heartbeat loop died")

    monkeypatch.setattr(Registrar, "heartbeat_forever", dies)
    stop = asyncio.Event()  # never set: only the dead heartbeats can end the run
    with pytest.raises(RuntimeError, match="heartbeats ended"):
        await asyncio.wait_for(run(settings, stop), 20)
    assert registered_when_it_died == [True]  # the real API accepted the registration
    assert await consumers_of(settings, "local_m") == 0


async def test_an_agent_takes_no_jobs_while_its_server_is_down(settings: AgentSettings) -> None:
    """Its server gone, the agent stops consuming its model's queue (healthy agents of the
    model take the jobs), its heartbeats pause and /ready says 503; all resume once the server
    answers again. The checks run every HEARTBEAT_INTERVAL (0.05 s here)."""
    runner, port = await serve(fake_vllm.create_app(FakeConfig(models=["m"])))
    service = AgentService(settings.model_copy(update={"vllm_url": f"http://127.0.0.1:{port}"}))
    try:
        registrar = await start_heartbeating(service)
        assert await consumers_of(settings, "local_m") == 1

        await runner.cleanup()  # the inference server dies
        await until(lambda: not service.is_attached(), timeout=5, what="detached")
        assert await consumers_of(settings, "local_m") == 0
        assert await ready_status(service) == 503
        sent = registrar.heartbeats_sent
        await asyncio.sleep(0.3)
        assert registrar.heartbeats_sent == sent  # paused: the registry lets the agent go

        runner, _ = await serve(fake_vllm.create_app(FakeConfig(models=["m"])), port=port)
        await until(service.is_attached, timeout=5, what="attached again")
        assert await consumers_of(settings, "local_m") == 1
        await until(lambda: registrar.heartbeats_sent > sent, timeout=5, what="heartbeating again")
        assert await ready_status(service) == 200
    finally:
        await service.stop()
        await runner.cleanup()


async def ready_status(service: AgentService) -> int:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{service.port}/ready")
        return response.status_code


async def consumers_of(settings: AgentSettings, model: str) -> int:
    topology = Topology(namespace=settings.broker_namespace, mode=settings.durability)
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.agent_queue(model), passive=True)
        return int(queue.declaration_result.consumer_count or 0)
    finally:
        await connection.close()
