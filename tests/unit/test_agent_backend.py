"""The inference server's URL forms, its model list and health, the client's error mapping,
and the docker spec from settings (the server is an in-process loopback one)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fakes.core import FakeConfig
from fakes.vllm import create_app as create_fake_vllm
from services.agent.backend import (
    UpstreamBrokenError,
    UpstreamUnavailableError,
    VllmClient,
    server_root,
)
from services.agent.bodies import normalise_error
from services.agent.service import AgentService, docker_spec, vllm_url
from services.agent.settings import AgentSettings, Backend
from shared.errors import AnswerTooLargeError
from tests.support.upstream import UpstreamServer, answer, closed_port_url, drop, sse


@pytest.mark.parametrize(
    "url",
    ["http://gpu1:8000/v1", "http://gpu1:8000/v1/", "http://gpu1:8000", " http://gpu1:8000/ "],
)
def test_server_root_accepts_the_url_with_or_without_v1(url: str) -> None:
    assert server_root(url) == "http://gpu1:8000"


def test_server_root_refuses_other_schemes() -> None:
    with pytest.raises(ValueError):
        server_root("gpu1:8000")


def test_the_router_url_must_be_an_http_url_too() -> None:
    # Without a scheme every registration failed, retried for ever.
    with pytest.raises(ValueError, match="router_url"):
        AgentSettings(router_url="router-host:8000")
    assert AgentSettings(router_url="https://router-host").router_url == "https://router-host"


async def test_many_running_streams_leave_room_for_more_calls_and_the_health_check() -> None:
    """An agent serving several models runs AGENT_CONCURRENCY calls for each: 10 models' 8
    here, past the 64 connections its pool once had, and its server still looks healthy."""
    release = asyncio.Event()

    async def route(request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: {}\n\n")
        await release.wait()
        return response

    server = await UpstreamServer(route).start()
    # A generous connect timeout: under a loaded machine (the whole suite) 1 s was once too short.
    settings = AgentSettings(vllm_url=server.url, agent_concurrency=8, upstream_connect_timeout=5)
    vllm = AgentService(settings).upstream  # as the agent builds it
    streams = contextlib.AsyncExitStack()
    try:
        async with asyncio.timeout(10):
            for _ in range(80):
                await streams.enter_async_context(vllm.stream(b"{}"))
            assert await vllm.is_healthy()
    finally:
        release.set()
        await streams.aclose()
        await vllm.aclose()
        await server.close()


async def test_served_models_and_health() -> None:
    async def route(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "m1"}]})
        if request.path == "/health":
            return web.Response()
        return web.Response(status=404)

    server = await UpstreamServer(route).start()
    vllm = VllmClient(server.url)
    try:
        assert await vllm.served_models() == ["m1"]
        assert await vllm.is_healthy()
    finally:
        await vllm.aclose()
        await server.close()


@pytest.mark.parametrize(("models_status", "healthy"), [(200, True), (503, False)])
async def test_a_server_without_a_health_route_is_judged_by_its_model_list(
    models_status: int, healthy: bool
) -> None:
    async def route(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": []}, status=models_status)
        return web.Response(status=404)  # no /health: not vLLM

    server = await UpstreamServer(route).start()
    vllm = VllmClient(server.url)
    try:
        assert await vllm.is_healthy() is healthy
    finally:
        await vllm.aclose()
        await server.close()


async def test_a_failing_health_route_is_not_overruled_by_the_model_list() -> None:
    async def route(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": []})
        return web.Response(status=500)  # vLLM's engine is dead; its API still lists models

    server = await UpstreamServer(route).start()
    vllm = VllmClient(server.url)
    try:
        assert not await vllm.is_healthy()
    finally:
        await vllm.aclose()
        await server.close()


async def assert_unavailable(vllm: VllmClient) -> None:
    """Both kinds of call fail as UpstreamUnavailableError (the job goes back to the queue)."""
    with pytest.raises(UpstreamUnavailableError):
        await vllm.complete(b"{}")
    with pytest.raises(UpstreamUnavailableError):
        async with vllm.stream(b"{}"):
            pass


async def test_unreachable_server() -> None:
    vllm = VllmClient(closed_port_url())
    try:
        assert not await vllm.is_healthy()
        with pytest.raises(UpstreamUnavailableError):
            await vllm.served_models()
        await assert_unavailable(vllm)
    finally:
        await vllm.aclose()


async def test_an_answer_keeps_its_status_and_body() -> None:
    server = await UpstreamServer(answer(400, b'{"message":"too long"}')).start()
    vllm = VllmClient(server.url)
    try:
        reply = await vllm.complete(b"{}")
        assert (reply.status, orjson.loads(reply.body)) == (400, {"message": "too long"})
        async with vllm.stream(b"{}") as response:
            assert (response.status, await response.read()) == (400, b'{"message":"too long"}')
    finally:
        await vllm.aclose()
        await server.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_answer_past_the_limit_is_refused(chunked: bool) -> None:
    """With a `content-length` (vLLM sends one) or chunked; one at the limit is read whole."""

    async def route(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "application/json"})
        if chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = 4096 * 64
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(64):
                await response.write(b"x" * 4096)
        return response

    server = await UpstreamServer(route).start()
    vllm = VllmClient(server.url)
    try:
        with pytest.raises(AnswerTooLargeError):
            await vllm.complete(b"{}", max_bytes=10_000)
        reply = await vllm.complete(b"{}", max_bytes=4096 * 64)
        assert len(reply.body) == 4096 * 64
    finally:
        await vllm.aclose()
        await server.close()


async def test_a_connection_dropped_before_the_answer_is_unavailable() -> None:
    server = await UpstreamServer(drop).start()
    vllm = VllmClient(server.url)
    try:
        await assert_unavailable(vllm)
    finally:
        await vllm.aclose()
        await server.close()


async def test_a_stream_broken_off_mid_body_is_broken() -> None:
    server = await UpstreamServer(sse(b"data: {}\n\n", fail=True)).start()
    vllm = VllmClient(server.url)
    try:
        async with vllm.stream(b"{}") as response:
            assert response.status == 200
            with pytest.raises(UpstreamBrokenError):
                async for _ in response.chunks():
                    pass
    finally:
        await vllm.aclose()
        await server.close()


async def test_leaving_a_stream_early_closes_the_connection() -> None:
    closed = asyncio.Event()
    server = await UpstreamServer(sse(b"data: {}\n\n", hang=closed)).start()
    vllm = VllmClient(server.url)
    try:
        async with vllm.stream(b"{}") as response:
            async for _ in response.chunks():
                break
        await asyncio.wait_for(closed.wait(), 2)
    finally:
        await vllm.aclose()
        await server.close()


async def test_cancelling_a_completion_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def route(_: web.Request) -> web.StreamResponse:
        try:
            await asyncio.Event().wait()
        finally:
            closed.set()
        return web.Response()

    server = await UpstreamServer(route).start()
    vllm = VllmClient(server.url)
    try:
        call = asyncio.create_task(vllm.complete(b"{}"))
        await asyncio.sleep(0.05)
        call.cancel()
        await asyncio.wait_for(closed.wait(), 2)
    finally:
        await vllm.aclose()
        await server.close()


def test_vllm_url_defaults_follow_the_backend() -> None:
    assert vllm_url(AgentSettings()) == "http://127.0.0.1:8000/v1"
    docker = AgentSettings(
        agent_backend=Backend.VLLM_DOCKER, vllm_model="org/model", vllm_host_port=8011
    )
    assert vllm_url(docker) == "http://127.0.0.1:8011/v1"
    assert vllm_url(AgentSettings(vllm_url="http://x:1")) == "http://x:1"


def test_docker_spec_from_settings() -> None:
    settings = AgentSettings(
        agent_name="gpu7",
        agent_backend=Backend.VLLM_DOCKER,
        vllm_model="org/model",
        vllm_gpus="1",
        hf_cache_dir="/models/hf",
    )
    kwargs = docker_spec(settings, ["model-q4", "model-q4"]).create_kwargs()
    assert kwargs["name"] == "router-vllm-gpu7"
    assert kwargs["command"][-2:] == ["--served-model-name", "model-q4"]
    assert kwargs["volumes"] == {"/models/hf": {"bind": "/root/.cache/huggingface", "mode": "rw"}}
    assert kwargs["device_requests"][0]["DeviceIDs"] == ["1"]


# --- a server started with --api-key (VLLM_API_KEY) --------------------------------------------


@contextlib.asynccontextmanager
async def fake_vllm_with_key(key: str) -> AsyncIterator[str]:
    """The project's fake vLLM, in process, wanting `key` on its /v1 routes as vLLM does."""
    server = TestServer(create_fake_vllm(FakeConfig(models=["m"], api_key=key)))
    await server.start_server()
    try:
        yield str(server.make_url("/v1"))
    finally:
        await server.close()


async def test_an_agent_with_the_servers_key_is_served() -> None:
    async with fake_vllm_with_key("sk-vllm") as url:
        settings = AgentSettings(vllm_url=url, vllm_api_key="sk-vllm")
        vllm = AgentService(settings).upstream  # as the agent builds it
        try:
            assert await vllm.served_models() == ["m"]
            answer = await vllm.complete(
                b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            )
            assert answer.status == 200
            assert await vllm.is_healthy()
        finally:
            await vllm.aclose()


async def test_a_key_the_server_refuses_is_named_as_the_agents_own() -> None:
    async with fake_vllm_with_key("sk-vllm") as url:
        vllm = AgentService(AgentSettings(vllm_url=url, vllm_api_key="sk-wrong")).upstream
        try:
            with pytest.raises(UpstreamUnavailableError, match="VLLM_API_KEY"):
                await vllm.served_models()
            answer = await vllm.complete(
                b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            )
        finally:
            await vllm.aclose()
    # The client's key is not at fault: not a 401, which an SDK reports as the user's bad key.
    failure = normalise_error(answer.status, answer.body)
    assert failure.status == 502
    assert orjson.loads(failure.body)["error"]["code"] == "upstream_auth_failed"


def test_a_vllm_docker_server_gets_the_key_in_its_environment() -> None:
    settings = AgentSettings(
        agent_backend=Backend.VLLM_DOCKER, vllm_model="org/model", vllm_api_key="sk-vllm"
    )
    kwargs = docker_spec(settings, []).create_kwargs()
    assert kwargs["environment"] == {"VLLM_API_KEY": "sk-vllm"}
    assert "sk-vllm" not in kwargs["command"]  # an argument would show in `ps`
