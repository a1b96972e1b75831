"""An agent in-process on the real RabbitMQ, in front of an in-process fake vLLM and a stand-in
for the API's /register and /heartbeat: what its readiness and its lifecycle rely on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from fakes import FakeConfig, running
from fakes import vllm as fake_vllm
from services.agent.heartbeat import Registrar
from services.agent.service import AgentService, run
from services.agent.settings import AgentSettings
from shared.settings import Durability
from tests.conftest import require_services
from tests.support.procs import new_namespace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def accept(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@pytest.fixture
async def settings() -> AsyncIterator[AgentSettings]:
    """Settings for one agent in a broker namespace of its own, with its fake vLLM and API."""
    require_services()
    api = web.Application()
    api.add_routes([web.post("/register", accept), web.post("/heartbeat", accept)])
    vllm = fake_vllm.create_app(FakeConfig(models=["m"]))
    async with running(vllm) as vllm_url, running(api) as api_url:
        yield AgentSettings(
            rabbitmq_url=URL,
            broker_namespace=new_namespace(),
            durability=Durability.TRANSIENT,
            agent_name="t1",
            agent_models="local_m=m",
            vllm_url=vllm_url,
            router_url=api_url,
            agent_bind="127.0.0.1",
            agent_port=0,
            heartbeat_interval=0.05,
            drain_timeout=1,
        )


async def test_an_agent_whose_consumer_the_broker_dropped_is_not_attached(
    settings: AgentSettings,
) -> None:
    """The consumer is still in the agent's list, but gone from its channel (as after the
    broker cancelled it for a deleted queue): no heartbeats, not ready."""
    service = AgentService(settings)
    try:
        await service.start()
        assert service.is_attached()
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
    async def dies(_: Registrar) -> None:
        raise RuntimeError("heartbeat loop died")

    monkeypatch.setattr(Registrar, "heartbeat_forever", dies)
    stop = asyncio.Event()  # never set: only the dead heartbeats can end the run
    with pytest.raises(RuntimeError, match="heartbeats ended"):
        await asyncio.wait_for(run(settings, stop), 20)
