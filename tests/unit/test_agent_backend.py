"""The inference server's URL forms, its model list and health, and the docker spec from
settings (no sockets: `httpx.MockTransport`)."""

from __future__ import annotations

import httpx
import pytest

from services.agent.backend import UpstreamUnavailableError, VllmClient, server_root
from services.agent.service import docker_spec, vllm_url
from services.agent.settings import AgentSettings, Backend


@pytest.mark.parametrize(
    "url",
    ["http://gpu1:8000/v1", "http://gpu1:8000/v1/", "http://gpu1:8000", " http://gpu1:8000/ "],
)
def test_server_root_accepts_the_url_with_or_without_v1(url: str) -> None:
    assert server_root(url) == "http://gpu1:8000"


def test_server_root_refuses_other_schemes() -> None:
    with pytest.raises(ValueError):
        server_root("gpu1:8000")


def client(handler: object) -> VllmClient:
    return VllmClient("http://vllm:8000/v1", transport=httpx.MockTransport(handler))  # type: ignore[arg-type]


async def test_served_models_and_health() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m1"}]})
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(404)

    vllm = client(handler)
    assert await vllm.served_models() == ["m1"]
    assert await vllm.is_healthy()
    await vllm.aclose()


async def test_unreachable_server() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    vllm = client(handler)
    assert not await vllm.is_healthy()
    with pytest.raises(UpstreamUnavailableError):
        await vllm.served_models()
    with pytest.raises(UpstreamUnavailableError):
        await vllm.complete(b"{}")


def test_vllm_url_defaults_follow_the_backend() -> None:
    assert vllm_url(AgentSettings()) == "http://127.0.0.1:8000/v1"
    docker = AgentSettings(agent_backend=Backend.VLLM_DOCKER, vllm_host_port=8011)
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
    kwargs = docker_spec(settings, ["model-q4", "model-q4"]).run_kwargs()
    assert kwargs["name"] == "router-vllm-gpu7"
    assert kwargs["command"][-2:] == ["--served-model-name", "model-q4"]
    assert kwargs["volumes"] == {"/models/hf": {"bind": "/root/.cache/huggingface", "mode": "rw"}}
    assert kwargs["device_requests"][0]["DeviceIDs"] == ["1"]
