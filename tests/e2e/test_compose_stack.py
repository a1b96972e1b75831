"""The compose stack end to end with the official SDK; runs only where a Docker engine answers."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.test_compose import COMPOSE_FILE, compose_command
from tests.support.procs import free_port

pytestmark = pytest.mark.e2e


def engine_answers() -> bool:
    try:
        return (
            subprocess.run(
                ["docker", "info"], capture_output=True, check=False, timeout=10
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def compose_stack() -> Iterator[str]:
    command = compose_command()
    if command is None or not engine_answers():
        pytest.skip(
            "no Docker engine answers here (`docker info` fails): the compose stack cannot run"
        )
    base = [*command, "-f", str(COMPOSE_FILE), "-p", "router-e2e"]
    # Ports of their own: `make test` has just made sure a RabbitMQ and a Redis hold the
    # defaults (5672, 6379), and a `make dev` may hold 8000.
    ports = {
        name: str(free_port())
        for name in (
            "API_HOST_PORT",
            "RABBITMQ_HOST_PORT",
            "RABBITMQ_MANAGEMENT_HOST_PORT",
            "REDIS_HOST_PORT",
        )
    }
    env = {**os.environ, **ports}
    url = f"http://127.0.0.1:{ports['API_HOST_PORT']}"
    subprocess.run([*base, "up", "-d", "--build"], check=True, timeout=900, env=env)
    try:
        deadline = time.monotonic() + 180
        while not _ready(url):
            assert time.monotonic() < deadline, "the compose stack was not ready within 180 s"
            time.sleep(2)
        yield url
    finally:
        subprocess.run([*base, "down", "-v"], check=False, timeout=300, env=env)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(1200)
def test_dummy_and_local_model_through_compose(compose_stack: str) -> None:
    client = openai.OpenAI(
        base_url=f"{compose_stack}/v1",
        api_key="sk-e2e",
        max_retries=0,
        _strict_response_validation=True,
    )
    completion = client.chat.completions.create(
        model="dummy", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == "Hello world"
    deadline = time.monotonic() + 60
    while "local_mistral-7b-instruct" not in [m.id for m in client.models.list()]:
        assert time.monotonic() < deadline, "the compose agent never registered"
        time.sleep(1)
    local = client.chat.completions.create(
        model="local_mistral-7b-instruct", messages=[{"role": "user", "content": "hi"}]
    )
    assert local.choices[0].message.content
