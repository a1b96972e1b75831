"""deploy/docker-compose.yml: validated without an engine, and run where one answers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "deploy" / "docker-compose.yml"


def compose_command() -> list[str] | None:
    """`docker compose` (the plugin) or Debian's `docker-compose` 1.29: both validate offline."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_is_valid() -> None:
    command = compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed (.ci/run installs it)"
        )
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert {"rabbitmq", "redis", "api", "dispatcher", "agent"} <= set(services)
    assert "healthcheck" in services["rabbitmq"]
    assert services["api"]["build"]["dockerfile"].endswith("Dockerfile")
    assert services["dispatcher-quorum"]["environment"]["DURABILITY"] == "quorum"
