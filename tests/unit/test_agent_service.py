"""The agent's lifecycle around its parts: what `run()` and `stop()` do when a part fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import pytest

from services.agent.heartbeat import AgentTokenRefusedError
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


async def test_a_refused_token_ends_serving_as_itself() -> None:
    """Not wrapped as a bug: `router agent` turns it into exit 1 without a traceback."""

    async def refused() -> None:
        raise AgentTokenRefusedError("/register answered 403", 403)

    service = AgentService(AgentSettings(agent_models="local_m=m"))
    service._heartbeats = asyncio.create_task(refused())
    stopping = asyncio.create_task(asyncio.Event().wait())
    try:
        with pytest.raises(AgentTokenRefusedError):
            await asyncio.wait_for(service.serve(stopping), 5)
        await service._stop_heartbeats()  # ended already, and reported: nothing raised again
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


class Steps:
    """Records the parts of stopping that ran, in order; `failing` ones raise."""

    def __init__(self, *failing: str) -> None:
        self.ran: list[str] = []
        self.failing = failing

    def step(self, name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            self.ran.append(name)
            if name in self.failing:
                raise RuntimeError(f"{name} broke")

        return run


async def test_stop_runs_every_step_even_when_one_fails(caplog: pytest.LogCaptureFixture) -> None:
    service = AgentService(AgentSettings(agent_models="local_m=m"))
    steps = Steps("container.stop")
    service._heartbeats = asyncio.create_task(heartbeats_that_die())
    await asyncio.sleep(0)
    service.container = SimpleNamespace(stop=steps.step("container.stop"))  # type: ignore[assignment]
    service.reply = SimpleNamespace(flush=steps.step("reply.flush"))  # type: ignore[assignment]
    close = service.broker.close

    async def close_broker() -> None:
        steps.ran.append("broker.close")
        await close()

    service.broker.close = close_broker  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(service.stop(), 5)
    assert steps.ran == ["container.stop", "reply.flush", "broker.close"]
    assert "stopping heartbeats failed" in caplog.text
    assert "stopping the container failed" in caplog.text
    assert service.router.is_closed


async def test_consuming_a_model_again_reuses_its_queue_rather_than_declaring_it_anew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The health watchdog stops and resumes consuming as the server fails and recovers. A
    queue declared anew each time was kept by aio-pika's channel, with its binding, and all
    of them were declared and bound again on every reconnect: 401 after 400 flaps."""
    service = AgentService(AgentSettings(agent_models="local_m=m"))
    service.handler = SimpleNamespace(on_job=None)  # type: ignore[assignment]
    channel = SimpleNamespace(is_closed=False)
    queue = SimpleNamespace(name="the declared queue")
    given: list[object] = []

    async def open_channel(prefetch: int) -> object:
        return channel

    async def consume(_: object, spec_or_queue: object, *__: object, **___: object) -> object:
        given.append(spec_or_queue)
        return queue

    monkeypatch.setattr(service.broker, "channel", open_channel)
    monkeypatch.setattr(service.broker, "consume", consume)
    try:
        for _ in range(3):
            await service._consume_model("local_m")
        channel.is_closed = True  # a new channel declares it again, on itself
        await service._consume_model("local_m")
    finally:
        await service.router.aclose()
    assert [type(g).__name__ for g in given] == [
        "QueueSpec",
        "SimpleNamespace",
        "SimpleNamespace",
        "QueueSpec",
    ]
    assert given[1] is queue and given[2] is queue
