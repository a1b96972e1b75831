"""The compose stack end to end with the official SDK; runs only where a Docker engine answers."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.test_compose import COMPOSE_FILE, compose_command

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
    subprocess.run([*base, "up", "-d", "--build"], check=True, timeout=900)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get("http://127.0.0.1:8000/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield "http://127.0.0.1:8000"
    finally:
        subprocess.run([*base, "down", "-v"], check=False, timeout=300)


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
