"""The vllm-docker backend: the container spec exactly, and its lifecycle over a stand-in for
the docker SDK client (`containers.run/get`, `container.reload/stop/remove/logs`)."""

from __future__ import annotations

from typing import Any

import docker.errors
import pytest
from docker.types import DeviceRequest

from services.agent.container import ContainerError, VllmContainer, container_spec, gpu_request

SPEC_ARGS: dict[str, Any] = {
    "agent_name": "gpu1",
    "image": "vllm/vllm-openai:v0.6.3",
    "model": "mistralai/Mistral-7B-Instruct-v0.2",
    "served_names": ["mistral-7b-instruct-q4"],
    "gpus": "all",
    "host_port": 8001,
    "hf_cache_dir": "/home/u/.cache/huggingface",
}


def test_container_spec_exactly() -> None:
    spec = container_spec(**SPEC_ARGS, hf_token="hf_x", extra_args="--max-model-len 8192")
    assert spec.run_kwargs() == {
        "image": "vllm/vllm-openai:v0.6.3",
        "command": [
            "--model",
            "mistralai/Mistral-7B-Instruct-v0.2",
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--served-model-name",
            "mistral-7b-instruct-q4",
            "--max-model-len",
            "8192",
        ],
        "name": "router-vllm-gpu1",
        "detach": True,
        "ports": {"8000/tcp": ("127.0.0.1", 8001)},
        "volumes": {
            "/home/u/.cache/huggingface": {"bind": "/root/.cache/huggingface", "mode": "rw"}
        },
        "environment": {"HF_TOKEN": "hf_x", "HUGGING_FACE_HUB_TOKEN": "hf_x"},
        "device_requests": [DeviceRequest(count=-1, capabilities=[["gpu"]])],
        "labels": {"router.agent": "gpu1"},
        "ipc_mode": "host",
    }


def test_container_spec_without_token_or_served_names() -> None:
    spec = container_spec(**{**SPEC_ARGS, "served_names": []}, name="custom")
    kwargs = spec.run_kwargs()
    assert kwargs["environment"] == {}
    assert "--served-model-name" not in kwargs["command"]
    assert kwargs["name"] == "custom"


def test_container_spec_needs_a_model() -> None:
    with pytest.raises(ValueError):
        container_spec(**{**SPEC_ARGS, "model": ""})


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ("all", DeviceRequest(count=-1, capabilities=[["gpu"]])),
        ("", DeviceRequest(count=-1, capabilities=[["gpu"]])),
        ("0, 2", DeviceRequest(device_ids=["0", "2"], capabilities=[["gpu"]])),
    ],
)
def test_gpu_request(gpus: str, expected: DeviceRequest) -> None:
    assert gpu_request(gpus) == expected


class StandInContainer:
    def __init__(self, statuses: list[str]) -> None:
        self.statuses = statuses
        self.status = "created"
        self.stopped_with: int | None = None
        self.removed = False
        self.missing = False

    def reload(self) -> None:
        if self.statuses:
            self.status = self.statuses.pop(0)

    def stop(self, *, timeout: int) -> None:
        if self.missing:
            raise docker.errors.NotFound("gone")
        self.stopped_with = timeout
        self.status = "exited"

    def remove(self, *, force: bool = False) -> None:
        self.removed = True

    def logs(self, *, tail: int) -> bytes:
        return b"CUDA out of memory\n"


class StandInContainers:
    def __init__(self, container: StandInContainer, leftover: StandInContainer | None) -> None:
        self.container = container
        self.leftover = leftover
        self.run_kwargs: dict[str, Any] | None = None

    def run(self, **kwargs: Any) -> StandInContainer:
        self.run_kwargs = kwargs
        return self.container

    def get(self, name: str) -> StandInContainer:
        if self.leftover is None:
            raise docker.errors.NotFound(f"no container {name}")
        return self.leftover


class StandInClient:
    def __init__(self, container: StandInContainer, leftover: StandInContainer | None = None):
        self.containers = StandInContainers(container, leftover)


class Probe:
    def __init__(self, healthy_after: int) -> None:
        self.calls = 0
        self.healthy_after = healthy_after

    async def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.healthy_after


def lifecycle(
    container: StandInContainer, probe: Probe, leftover: StandInContainer | None = None
) -> tuple[VllmContainer, StandInClient]:
    client = StandInClient(container, leftover)
    spec = container_spec(**SPEC_ARGS)
    return VllmContainer(client, spec, probe, poll_interval=0.001), client


async def test_start_replaces_a_leftover_and_waits_for_health() -> None:
    leftover = StandInContainer([])
    container = StandInContainer(["running"])
    probe = Probe(healthy_after=3)
    vllm, client = lifecycle(container, probe, leftover)
    await vllm.start()
    assert leftover.removed
    assert client.containers.run_kwargs == container_spec(**SPEC_ARGS).run_kwargs()
    await vllm.wait_ready(timeout=5)
    assert probe.calls == 4

    await vllm.stop(timeout=7)
    assert container.stopped_with == 7 and container.removed
    await vllm.stop()  # idempotent


async def test_a_container_that_exits_while_starting_fails_with_its_logs() -> None:
    vllm, _ = lifecycle(StandInContainer(["running", "exited"]), Probe(healthy_after=100))
    await vllm.start()
    with pytest.raises(ContainerError, match="CUDA out of memory"):
        await vllm.wait_ready(timeout=5)


async def test_health_wait_is_bounded() -> None:
    ticks = iter(range(100))
    client = StandInClient(StandInContainer(["running"]))
    vllm = VllmContainer(
        client,
        container_spec(**SPEC_ARGS),
        Probe(healthy_after=100),
        poll_interval=0,
        clock=lambda: float(next(ticks)),
    )
    await vllm.start()
    with pytest.raises(ContainerError, match="not healthy after 5"):
        await vllm.wait_ready(timeout=5)


async def test_stop_tolerates_a_container_already_gone() -> None:
    container = StandInContainer(["running"])
    vllm, _ = lifecycle(container, Probe(healthy_after=0))
    await vllm.start()
    container.missing = True
    await vllm.stop()
    assert not container.removed


async def test_run_failure_is_a_container_error() -> None:
    class Failing(StandInContainers):
        def run(self, **kwargs: Any) -> StandInContainer:
            raise docker.errors.APIError("could not select device driver")

    client = StandInClient(StandInContainer([]))
    client.containers = Failing(StandInContainer([]), None)
    vllm = VllmContainer(client, container_spec(**SPEC_ARGS), Probe(0))
    with pytest.raises(ContainerError, match="device driver"):
        await vllm.start()
