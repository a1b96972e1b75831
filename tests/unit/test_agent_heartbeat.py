"""Registration and heartbeats, against an `httpx.MockTransport` standing in for the API."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import httpx
import orjson
import pytest

from services.agent.heartbeat import (
    AgentTokenRefusedError,
    Registrar,
    RegistrationRefusedError,
    next_backoff,
)
from shared.messages import AgentRegistration

REG = AgentRegistration(name="gpu1", endpoint="http://gpu1:5000", models=["local_a"])


class Api:
    def __init__(self, statuses: list[int | Exception]) -> None:
        # Answers to give, in order (an exception is raised, as a transport would); 200 once
        # they run out.
        self.statuses = statuses
        self.seen: list[tuple[str, str | None, dict[str, object]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(
            (request.url.path, request.headers.get("authorization"), orjson.loads(request.content))
        )
        status = self.statuses.pop(0) if self.statuses else 200
        if isinstance(status, Exception):
            raise status
        return httpx.Response(status, json={"status": "ok"})

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.seen]


def registrar(api: Api, attached: list[bool], load: float = 0.0) -> Registrar:
    client = httpx.AsyncClient(transport=httpx.MockTransport(api))
    return Registrar(
        client,
        router_url="http://api:8000/",
        token="tok1",
        registration=REG,
        interval=0.01,
        is_attached=lambda: attached[0],
        load=lambda: load,
        first_backoff=0.005,
        max_backoff=0.01,
    )


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [next_backoff(x, cap=10) for x in (0.5, 4, 8)] == [1, 8, 10]


async def test_registers_with_its_token_and_retries_until_accepted() -> None:
    api = Api([503, 429])
    r = registrar(api, [True])
    await asyncio.wait_for(r.register(), 1)
    assert r.registered.is_set()
    assert api.paths() == ["/register"] * 3
    _, auth, body = api.seen[-1]
    assert auth == "Bearer tok1"
    assert body == {"name": "gpu1", "endpoint": "http://gpu1:5000", "models": ["local_a"]}


async def test_waits_for_its_consumers_before_registering() -> None:
    api = Api([])
    attached = [False]
    r = registrar(api, attached)
    task = asyncio.create_task(r.register())
    await asyncio.sleep(0.05)
    assert api.seen == []
    attached[0] = True
    await asyncio.wait_for(task, 1)
    assert api.paths() == ["/register"]


async def test_heartbeats_carry_models_and_load_only_while_attached() -> None:
    api = Api([])
    attached = [True]
    r = registrar(api, attached, load=3)
    task = asyncio.create_task(r.run())
    try:
        await until(lambda: r.heartbeats_sent >= 2)
        assert api.seen[1][2] == {"name": "gpu1", "models": ["local_a"], "load": 3.0}
        attached[0] = False
        await asyncio.sleep(0.02)  # a heartbeat in flight may still land
        paused_at = r.heartbeats_sent
        await asyncio.sleep(0.05)
        assert r.heartbeats_sent == paused_at
        attached[0] = True
        await until(lambda: r.heartbeats_sent != paused_at)
    finally:
        task.cancel()
    assert api.paths()[0] == "/register"
    assert set(api.paths()[1:]) == {"/heartbeat"}


async def test_a_refused_heartbeat_is_reported_not_raised() -> None:
    api = Api([429])
    r = registrar(api, [True])
    assert await r.heartbeat() is False
    assert await r.heartbeat() is True


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_token_ends_registration_and_heartbeats(status: int) -> None:
    """No retry fixes a wrong token, and an agent the registry will not list must not go on
    taking jobs: the error ends the heartbeat task, and the agent with it."""
    r = registrar(Api([status]), [True])
    with pytest.raises(AgentTokenRefusedError):
        await asyncio.wait_for(r.register(), 1)
    assert not r.registered.is_set()
    with pytest.raises(AgentTokenRefusedError):
        await registrar(Api([status]), [True]).heartbeat()


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_a_refused_registration_ends_the_agent_too(status: int) -> None:
    """The same payload is refused again: retried for ever, the agent took its models' jobs
    while the registry never listed it (review 2026-11-29: a server listing 65 models)."""
    api = Api([status])
    r = registrar(api, [True])
    with pytest.raises(RegistrationRefusedError):
        await asyncio.wait_for(r.register(), 1)
    assert api.paths() == ["/register"]


@pytest.mark.parametrize("status", [404, 408, 429])
async def test_a_registration_the_api_may_take_later_is_retried(status: int) -> None:
    api = Api([status])
    r = registrar(api, [True])
    await asyncio.wait_for(r.register(), 1)
    assert api.paths() == ["/register"] * 2


def malformed_reply() -> Exception:
    """An aiohttp error the httpx-over-aiohttp transport does not turn into an httpx one."""
    return aiohttp.ClientPayloadError("Response payload is not completed")


async def test_registration_retries_after_any_error() -> None:
    api = Api([malformed_reply(), RuntimeError("surprise")])
    r = registrar(api, [True])
    await asyncio.wait_for(r.register(), 1)
    assert r.registered.is_set()
    assert api.paths() == ["/register"] * 3


async def test_heartbeats_go_on_after_any_error() -> None:
    api = Api([200, malformed_reply()])  # registration, then the first heartbeat fails
    r = registrar(api, [True])
    task = asyncio.create_task(r.run())
    try:
        await until(lambda: r.heartbeats_sent >= 2)
        assert not task.done()
    finally:
        task.cancel()
    assert api.paths()[:3] == ["/register", "/heartbeat", "/heartbeat"]
    assert await r.heartbeat() is True
    api.statuses = [malformed_reply()]
    assert await r.heartbeat() is False


async def test_a_slow_heartbeat_does_not_push_the_next_one_back() -> None:
    """Heartbeats start one interval apart: timed from the end of a slow one, the gap between
    two that arrive would be the interval plus its time (past the TTL with the defaults)."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def slow_first(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/heartbeat":
            starts.append(loop.time())
            if len(starts) == 1:
                await asyncio.sleep(0.45)
        return httpx.Response(200, json={"status": "ok"})

    r = Registrar(
        httpx.AsyncClient(transport=httpx.MockTransport(slow_first)),
        router_url="http://api:8000",
        token="tok1",
        registration=REG,
        interval=0.5,
        is_attached=lambda: True,
        load=lambda: 0.0,
    )
    task = asyncio.create_task(r.heartbeat_forever())
    try:
        await until(lambda: len(starts) >= 2, timeout=5)
    finally:
        task.cancel()
    # 0.5 s apart, not 0.95 (the margin is for a busy machine's scheduling).
    assert starts[1] - starts[0] < 0.8


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Let the loop run until `predicate()` holds (TimeoutError after `timeout`)."""
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.005)


async def test_a_stopping_agent_says_it_is_leaving_once_registered() -> None:
    api = Api([])
    r = registrar(api, [True])
    await r.leave()
    assert api.seen == []  # never registered: nobody routes to it
    await r.register()
    await r.leave()
    assert api.seen[-1] == ("/heartbeat", "Bearer tok1", {"name": "gpu1", "leaving": True})


@pytest.mark.parametrize("failure", [503, httpx.ConnectError("refused")])
async def test_a_leave_the_router_does_not_take_is_logged_not_raised(
    failure: int | Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """The TTL lets the agent go anyway; its stop goes on."""
    api = Api([])
    r = registrar(api, [True])
    caplog.set_level("INFO")
    await r.register()
    api.statuses = [failure]
    await r.leave()
    assert "could not tell the router this agent is leaving" in caplog.text
