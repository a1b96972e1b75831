"""The agent's lifecycle around its parts: what `run()` and `stop()` do when a part fails."""

from __future__ import annotations

import asyncio

import pytest

from services.agent.service import AgentService
from services.agent.settings import AgentSettings


async def heartbeats_that_die() -> None:
    raise RuntimeError("heartbeat loop died")


async def test_serving_ends_with_an_error_when_the_heartbeats_end() -> None:
    service = AgentService(AgentSettings(agent_models="local_m=m"))
    service._heartbeats = asyncio.create_task(heartbeats_that_die())
    stopping = asyncio.create_task(asyncio.Event().wait())
    try:
        with pytest.raises(RuntimeError, match="heartbeats ended") as caught:
            await asyncio.wait_for(service.serve(stopping), 5)
        assert str(caught.value.__cause__) == "heartbeat loop died"
    finally:
        stopping.cancel()
        await service.router.aclose()


async def test_serving_ends_quietly_when_told_to_stop() -> None:
    service = AgentService(AgentSettings(agent_models="local_m=m"))
    service._heartbeats = asyncio.create_task(asyncio.Event().wait())
    stop = asyncio.Event()
    stopping = asyncio.create_task(stop.wait())
    stop.set()
    try:
        await asyncio.wait_for(service.serve(stopping), 5)
        assert not service._heartbeats.done()
    finally:
        service._heartbeats.cancel()
        await service.router.aclose()
