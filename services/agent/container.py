"""The `vllm-docker` backend: the agent runs `vllm/vllm-openai` itself.

`container_spec()` is the whole container, as plain data (unit-tested exactly).
`VllmContainer` is its lifecycle over a docker SDK client passed in (`docker.from_env()` in
production, a stand-in in tests): remove a leftover of ours of the same name, create and start,
wait for the server's health within a bound, stop and remove. The SDK blocks, so each call runs
in a thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shlex
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import docker.errors
from docker.types import DeviceRequest

from shared.runner import StartupError

log = logging.getLogger(__name__)

CONTAINER_PORT = 8000
CONTAINER_HF_CACHE = "/root/.cache/huggingface"
AGENT_LABEL = "router.agent"


class ContainerError(StartupError):
    """The inference server's container failed to start, exited, or never became healthy."""


# Docker's own backoff between restarts (it doubles, from 100 ms) keeps a crash loop cheap.
RESTART_ON_FAILURE: dict[str, Any] = {"Name": "on-failure"}


@dataclass(frozen=True)
class ContainerSpec:
    """Everything `client.containers.create()` is given."""

    image: str
    name: str
    command: list[str]
    ports: dict[str, tuple[str, int]]
    volumes: dict[str, dict[str, str]]
    environment: dict[str, str]
    device_requests: list[DeviceRequest]
    labels: dict[str, str] = field(default_factory=dict)
    ipc_mode: str = "host"  # PyTorch shares tensors between processes through /dev/shm

    def create_kwargs(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "command": list(self.command),
            "name": self.name,
            "detach": True,  # what `run(detach=True)` gives `create()`: no attached streams
            "ports": dict(self.ports),
            "volumes": dict(self.volumes),
            "environment": dict(self.environment),
            "device_requests": list(self.device_requests),
            "labels": dict(self.labels),
            "ipc_mode": self.ipc_mode,
        }


def gpu_request(gpus: str) -> DeviceRequest:
    """`all` (or empty) -> every GPU; `0,1` -> those device ids."""
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or ids == ["all"]:
        return DeviceRequest(count=-1, capabilities=[["gpu"]])
    return DeviceRequest(device_ids=ids, capabilities=[["gpu"]])


def container_spec(
    *,
    agent_name: str,
    image: str,
    model: str,
    served_names: list[str],
    gpus: str,
    host_port: int,
    hf_cache_dir: str,
    hf_token: str = "",
    api_key: str = "",
    extra_args: str = "",
    name: str = "",
    bind_host: str = "127.0.0.1",
) -> ContainerSpec:
    """The vLLM container for one agent. `hf_cache_dir` is an absolute host path.

    The server listens on 8000 inside, published on `bind_host:host_port` (loopback: only this
    agent talks to it). `served_names` become `--served-model-name` (vLLM then answers to any
    of them); empty keeps the model id as its name. Raises ValueError without a model.
    """
    if not model:
        raise ValueError("VLLM_MODEL is required with AGENT_BACKEND=vllm-docker")
    command = ["--model", model, "--host", "0.0.0.0", "--port", str(CONTAINER_PORT)]
    if served_names:
        command += ["--served-model-name", *served_names]
    command += shlex.split(extra_args)
    environment = {}
    if hf_token:
        # Both names: older huggingface_hub releases read only the second.
        environment = {"HF_TOKEN": hf_token, "HUGGING_FACE_HUB_TOKEN": hf_token}
    if api_key:
        environment["VLLM_API_KEY"] = api_key  # an environment variable stays out of `ps`
    return ContainerSpec(
        image=image,
        name=name or f"router-vllm-{agent_name}",
        command=command,
        ports={f"{CONTAINER_PORT}/tcp": (bind_host, host_port)},
        volumes={hf_cache_dir: {"bind": CONTAINER_HF_CACHE, "mode": "rw"}},
        environment=environment,
        device_requests=[gpu_request(gpus)],
        labels={AGENT_LABEL: agent_name},
    )


class Container(Protocol):
    status: str

    @property
    def labels(self) -> dict[str, str]: ...

    def start(self) -> None: ...
    def reload(self) -> None: ...
    def update(self, *, restart_policy: dict[str, Any]) -> object: ...
    def stop(self, *, timeout: int) -> None: ...
    def remove(self, *, force: bool = ...) -> None: ...
    def logs(self, *, tail: int) -> bytes: ...


class Containers(Protocol):
    def create(self, **kwargs: Any) -> Container: ...
    def get(self, name: str) -> Container: ...


class Images(Protocol):
    def pull(self, repository: str) -> object: ...


class DockerClient(Protocol):
    @property
    def containers(self) -> Containers: ...

    @property
    def images(self) -> Images: ...


Probe = Callable[[], Awaitable[bool]]


async def abandoned_on_cancel(call: Callable[[], object], name: str) -> None:
    """`call()` in a daemon thread of its own, `name`; a cancel stops waiting for it and leaves
    it running. Not `asyncio.to_thread`: the loop's executor, and the interpreter at exit, wait
    for its threads, so an agent stopped during a multi-GB image pull logged "stopped" and
    lived on until the pull ended."""
    done: concurrent.futures.Future[object] = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():  # cancelled before it began
            return
        try:  # running, the future is no longer cancelled with the awaiting task
            done.set_result(call())
        except BaseException as e:
            done.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    await asyncio.wrap_future(done)


class VllmContainer:
    def __init__(
        self,
        client: DockerClient,
        spec: ContainerSpec,
        probe: Probe,
        *,
        poll_interval: float = 2.0,
        settle_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.spec = spec
        self._probe = probe
        self._poll_interval = poll_interval
        self._settle_timeout = settle_timeout
        self._clock = clock
        self.container: Container | None = None

    async def start(self) -> None:
        """Create and start the container, replacing a leftover of ours. Raises ContainerError.

        Two steps, not docker-py's `run()`, so the container is known as soon as it exists: one
        whose start fails (no GPU driver, port in use) or is cancelled (SIGTERM while pulling or
        starting) is removed, instead of outliving the agent.
        """
        await self._remove_leftover()
        try:
            await self._create()
            assert self.container is not None
            await self._settled(self.container.start)
        except BaseException as e:
            await self._remove_created()
            if isinstance(e, docker.errors.DockerException):
                raise ContainerError(f"cannot start {self.spec.image}: {e}") from e
            raise
        log.info("started container %s (%s)", self.spec.name, self.spec.image)

    async def _create(self) -> None:
        """Create the container (`self.container`), pulling its image first if it is missing."""
        try:
            await self._settled(self._create_in_thread)
        except docker.errors.ImageNotFound:
            log.info("pulling %s", self.spec.image)
            # Not settled: a pull left running after a cancel creates no container.
            await abandoned_on_cancel(
                lambda: self._client.images.pull(self.spec.image), f"pull {self.spec.image}"
            )
            await self._settled(self._create_in_thread)

    def _create_in_thread(self) -> None:
        # Remembered here, in the worker thread: a cancelled start() learns of it even though
        # it no longer awaits the result.
        self.container = self._client.containers.create(**self.spec.create_kwargs())

    async def _settled(self, call: Callable[[], None]) -> None:
        """`call()` in a thread. A thread cannot be cancelled: on cancel, wait for it (up to
        `settle_timeout`) before the cancel goes on, so that what it did is known and undone."""
        work = asyncio.ensure_future(asyncio.to_thread(call))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            _, pending = await asyncio.wait({work}, timeout=self._settle_timeout)
            if pending:
                log.error(
                    "docker still busy after %.0fs: container %s may be left behind "
                    "(the next start removes it)",
                    self._settle_timeout,
                    self.spec.name,
                )
            raise

    async def _remove_created(self) -> None:
        container, self.container = self.container, None
        if container is not None and await self._force_remove(container):
            log.info("removed container %s, which did not start", self.spec.name)

    async def _force_remove(self, container: Container) -> bool:
        """Remove `container` by force; True once it is gone (already gone counts). A failure
        is logged, not raised: the agent must go on stopping, and the next start removes a
        container left behind as a leftover."""
        try:
            await asyncio.to_thread(container.remove, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException:
            log.error("could not remove container %s", self.spec.name, exc_info=True)
            return False
        return True

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the probe says healthy; raises ContainerError if the container exits or
        `timeout` passes first."""
        assert self.container is not None, "start() first"
        deadline = self._clock() + timeout
        while True:
            await asyncio.to_thread(self.container.reload)
            status = self.container.status
            if status in ("exited", "dead"):
                tail = await asyncio.to_thread(self.container.logs, tail=20)
                raise ContainerError(
                    f"container {self.spec.name} {status} while starting:\n"
                    + tail.decode(errors="replace")
                )
            if await self._probe():
                log.info("container %s is healthy", self.spec.name)
                await self._restart_after_a_crash()
                return
            if self._clock() >= deadline:
                raise ContainerError(f"container {self.spec.name} not healthy after {timeout}s")
            await asyncio.sleep(self._poll_interval)

    async def _restart_after_a_crash(self) -> None:
        """From now on Docker restarts the server if it exits with an error (a CUDA out of
        memory, an NCCL failure): nothing else would, and the agent, detached by its watchdog,
        would wait for ever. Not from creation: a server that fails while starting is
        reported with its logs (`wait_ready`), not restarted in a loop. `stop()` still ends it.
        """
        assert self.container is not None
        try:
            await asyncio.to_thread(self.container.update, restart_policy=RESTART_ON_FAILURE)
        except docker.errors.DockerException:
            log.warning(
                "could not set container %s to restart after a crash: if it exits, restart "
                "the agent",
                self.spec.name,
                exc_info=True,
            )

    async def stop(self, timeout: int = 30) -> None:
        """Stop and remove the container; a container already gone is fine, and one that cannot
        be removed is logged, not raised."""
        container, self.container = self.container, None
        if container is None:
            return
        try:
            await asyncio.to_thread(container.stop, timeout=timeout)
        except docker.errors.NotFound:
            return
        except docker.errors.DockerException:
            log.warning("stopping %s failed; removing it by force", self.spec.name, exc_info=True)
        if await self._force_remove(container):
            log.info("stopped and removed container %s", self.spec.name)

    async def _remove_leftover(self) -> None:
        """Remove a container of this name left by an earlier run, but only if its label says
        it is this agent's: VLLM_CONTAINER_NAME may name a container that is not ours."""
        try:
            leftover = await asyncio.to_thread(self._client.containers.get, self.spec.name)
            owner = leftover.labels.get(AGENT_LABEL)
            if owner != self.spec.labels.get(AGENT_LABEL):
                raise ContainerError(
                    f"a container named {self.spec.name} exists and is not this agent's "
                    f"(label {AGENT_LABEL}={owner!r}); remove it or set VLLM_CONTAINER_NAME"
                )
            log.warning("removing leftover container %s", self.spec.name)
            await asyncio.to_thread(leftover.remove, force=True)
        except docker.errors.NotFound:
            return
        except docker.errors.DockerException as e:
            raise ContainerError(f"cannot remove leftover {self.spec.name}: {e}") from e
