"""The vllm-docker backend: the container spec exactly, and its lifecycle over a stand-in for
the docker SDK client (`containers.create/get`, `images.pull`,
`container.start/reload/stop/remove/logs`)."""

from __future__ import annotations

import asyncio
import logging
import threading
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
    assert spec.create_kwargs() == {
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
    kwargs = spec.create_kwargs()
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
    def __init__(self, statuses: list[str], labels: dict[str, str] | None = None) -> None:
        self.statuses = statuses
        self.labels = {"router.agent": "gpu1"} if labels is None else labels
        self.status = "created"
        self.started = False
        self.stopped_with: int | None = None
        self.removed = False
        self.missing = False
        self.start_error: Exception | None = None
        self.remove_error: Exception | None = None
        self.restart_policy: dict[str, Any] | None = None
        self.update_error: Exception | None = None

    def start(self) -> None:
        if self.start_error is not None:
            raise self.start_error
        self.started = True

    def reload(self) -> None:
        if self.statuses:
            self.status = self.statuses.pop(0)

    def update(self, *, restart_policy: dict[str, Any]) -> None:
        if self.update_error is not None:
            raise self.update_error
        self.restart_policy = restart_policy

    def stop(self, *, timeout: int) -> None:
        if self.missing:
            raise docker.errors.NotFound("gone")
        self.stopped_with = timeout
        self.status = "exited"

    def remove(self, *, force: bool = False) -> None:
        if self.remove_error is not None:
            raise self.remove_error
        self.removed = True

    def logs(self, *, tail: int) -> bytes:
        return b"CUDA out of memory\n"


class StandInContainers:
    def __init__(self, container: StandInContainer, leftover: StandInContainer | None) -> None:
        self.container = container
        self.leftover = leftover
        self.create_kwargs: dict[str, Any] | None = None
        self.image_missing = False

    def create(self, **kwargs: Any) -> StandInContainer:
        if self.image_missing:
            raise docker.errors.ImageNotFound(f"no such image: {kwargs['image']}")
        self.create_kwargs = kwargs
        return self.container

    def get(self, name: str) -> StandInContainer:
        if self.leftover is None:
            raise docker.errors.NotFound(f"no container {name}")
        return self.leftover


class StandInImages:
    def __init__(self, containers: StandInContainers) -> None:
        self.containers = containers
        self.pulled: list[str] = []

    def pull(self, repository: str) -> None:
        self.pulled.append(repository)
        self.containers.image_missing = False


class StandInClient:
    def __init__(self, container: StandInContainer, leftover: StandInContainer | None = None):
        self.containers = StandInContainers(container, leftover)
        self.images = StandInImages(self.containers)


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
    assert client.containers.create_kwargs == container_spec(**SPEC_ARGS).create_kwargs()
    assert container.started
    await vllm.wait_ready(timeout=5)
    assert probe.calls == 4

    await vllm.stop(timeout=7)
    assert container.stopped_with == 7 and container.removed
    await vllm.stop()  # idempotent


async def test_a_container_that_exits_while_starting_fails_with_its_logs() -> None:
    container = StandInContainer(["running", "exited"])
    vllm, _ = lifecycle(container, Probe(healthy_after=100))
    await vllm.start()
    with pytest.raises(ContainerError, match="CUDA out of memory"):
        await vllm.wait_ready(timeout=5)
    assert container.restart_policy is None  # reported, not restarted in a loop


async def test_a_server_that_crashes_once_serving_is_restarted_by_docker() -> None:
    """Nothing watched the container after start-up: a vLLM that exited (CUDA out of memory)
    stayed down, and its agent, detached by the watchdog, waited for ever (review
    2026-11-29). Once healthy, the container restarts when it exits with an error."""
    container = StandInContainer(["running"])
    vllm, client = lifecycle(container, Probe(healthy_after=0))
    await vllm.start()
    assert "restart_policy" not in (client.containers.create_kwargs or {})
    await vllm.wait_ready(timeout=5)
    assert container.restart_policy == {"Name": "on-failure"}


async def test_a_container_that_cannot_be_set_to_restart_still_serves() -> None:
    container = StandInContainer(["running"])
    container.update_error = docker.errors.APIError("update refused")
    vllm, _ = lifecycle(container, Probe(healthy_after=0))
    await vllm.start()
    await vllm.wait_ready(timeout=5)  # logged, not raised


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


async def test_create_failure_is_a_container_error() -> None:
    class Failing(StandInContainers):
        def create(self, **kwargs: Any) -> StandInContainer:
            raise docker.errors.APIError("could not select device driver")

    client = StandInClient(StandInContainer([]))
    client.containers = Failing(StandInContainer([]), None)
    vllm = VllmContainer(client, container_spec(**SPEC_ARGS), Probe(0))
    with pytest.raises(ContainerError, match="device driver"):
        await vllm.start()


async def test_a_missing_image_is_pulled_then_created() -> None:
    container = StandInContainer([])
    vllm, client = lifecycle(container, Probe(0))
    client.containers.image_missing = True
    await vllm.start()
    assert client.images.pulled == ["vllm/vllm-openai:v0.6.3"]
    assert container.started and vllm.container is container


async def test_a_container_that_fails_to_start_is_removed() -> None:
    container = StandInContainer([])
    container.start_error = docker.errors.APIError("could not select device driver")
    vllm, _ = lifecycle(container, Probe(0))
    with pytest.raises(ContainerError, match="device driver"):
        await vllm.start()
    assert container.removed and vllm.container is None


class Blocking:
    """A docker call that blocks its worker thread until released, as a pull, a create or a
    start does for seconds to minutes."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        assert self.release.wait(5), "never released"
        self.finished.set()

    async def cancel_inside(self, task: asyncio.Task[None]) -> None:
        """Cancel `task` while the call is blocked, then let the call finish."""
        assert await asyncio.to_thread(self.entered.wait, 5), "the call never started"
        task.cancel()
        for _ in range(20):  # the task takes the cancel, and goes as far as it can, while
            await asyncio.sleep(0)  # the thread is still blocked
        self.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(self.finished.wait, 5)


async def test_cancelled_while_creating_removes_the_container_the_thread_created() -> None:
    container = StandInContainer([])
    vllm, client = lifecycle(container, Probe(0))
    blocking = Blocking()
    create = client.containers.create

    def slow_create(**kwargs: Any) -> StandInContainer:
        blocking()
        return create(**kwargs)

    client.containers.create = slow_create  # type: ignore[method-assign]
    await blocking.cancel_inside(asyncio.create_task(vllm.start()))
    assert container.removed and not container.started
    assert vllm.container is None
    await vllm.stop()  # what the agent's stop() does next: nothing left to stop


async def test_cancelled_while_starting_removes_the_container() -> None:
    container = StandInContainer([])
    vllm, _ = lifecycle(container, Probe(0))
    blocking = Blocking()
    container.start = blocking  # type: ignore[method-assign]
    await blocking.cancel_inside(asyncio.create_task(vllm.start()))
    assert container.removed and vllm.container is None


async def test_cancelled_while_pulling_creates_nothing() -> None:
    container = StandInContainer([])
    vllm, client = lifecycle(container, Probe(0))
    client.containers.image_missing = True
    blocking = Blocking()
    client.images.pull = lambda repository: blocking()  # type: ignore[method-assign]
    await blocking.cancel_inside(asyncio.create_task(vllm.start()))
    client.containers.image_missing = False
    for _ in range(10):
        await asyncio.sleep(0)  # a create that wrongly followed the pull would run now
    assert client.containers.create_kwargs is None and vllm.container is None


def test_a_stop_while_pulling_does_not_wait_for_the_pull() -> None:
    """The pull ran in the loop's executor, which `asyncio.run` waits for as it closes (and the
    interpreter at exit): an agent stopped during a multi-GB pull logged "stopped" and lived
    on until the pull ended (review: SIGTERM at 3 s, exit at 60.8 s). The cancelled pull is
    left to a daemon thread, which holds up neither."""
    pulling, release = threading.Event(), threading.Event()
    pullers: list[threading.Thread] = []

    def pull(repository: str) -> None:
        pullers.append(threading.current_thread())
        pulling.set()
        release.wait(30)  # set only once the test has its answer

    async def start_then_stop() -> None:
        vllm, client = lifecycle(StandInContainer([]), Probe(0))
        client.containers.image_missing = True
        client.images.pull = pull  # type: ignore[method-assign]
        starting = asyncio.create_task(vllm.start())
        assert await asyncio.to_thread(pulling.wait, 5), "the pull never started"
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(starting, 1)

    before = set(threading.enumerate())
    agent = threading.Thread(target=asyncio.run, args=(start_then_stop(),), daemon=True)
    agent.start()
    try:
        agent.join(5)
        assert not agent.is_alive(), "the stopped agent's loop waited for the pull"
        assert pullers and pullers[0].daemon and pullers[0].is_alive()
        left = [t for t in set(threading.enumerate()) - before if not t.daemon]
        assert left == [], "a thread the interpreter would wait for at exit"
    finally:
        release.set()


async def test_stop_logs_a_container_that_cannot_be_removed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    container = StandInContainer([])
    vllm, _ = lifecycle(container, Probe(0))
    await vllm.start()
    container.remove_error = docker.errors.APIError("409 Conflict: removal already in progress")
    with caplog.at_level(logging.ERROR):
        await vllm.stop()
    assert "could not remove container router-vllm-gpu1" in caplog.text
    assert vllm.container is None


async def test_a_leftover_that_is_not_ours_is_left_alone() -> None:
    stranger = StandInContainer([], labels={"com.example.app": "db"})
    vllm, client = lifecycle(StandInContainer([]), Probe(0), stranger)
    with pytest.raises(ContainerError, match="router-vllm-gpu1 exists and is not this agent's"):
        await vllm.start()
    assert not stranger.removed and client.containers.create_kwargs is None
    other_agent = StandInContainer([], labels={"router.agent": "gpu2"})
    vllm, _ = lifecycle(StandInContainer([]), Probe(0), other_agent)
    with pytest.raises(ContainerError, match="'gpu2'"):
        await vllm.start()
    assert not other_agent.removed
