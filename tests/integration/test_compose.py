"""deploy/docker-compose.yml: validated without an engine, and run where one answers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.broker_acl import admin_grant, agent_grant, api_grant, dispatcher_grant
from shared.settings import BrokerSettings
from shared.topology import Topology

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
ENSURE_SERVICES = ROOT / "scripts" / "ensure-services.sh"


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


def test_compose_services_use_least_privilege_broker_users() -> None:
    """Each service has its own broker user in vhost `router`, and the committed definitions
    grant exactly what `router broker-acl` computes for them today (no drift)."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    users = {}
    for name in ("topology", "api", "dispatcher", "agent"):
        url = services[name]["environment"]["RABBITMQ_URL"]
        users[name] = url.split("//", 1)[1].split(":", 1)[0]
        assert url.endswith("@rabbitmq:5672/router")
    assert len(set(users.values())) == 4
    for name in ("api", "dispatcher", "agent"):
        assert services[name]["depends_on"]["topology"]["condition"] == (
            "service_completed_successfully"
        )
    definitions = json.loads((COMPOSE_FILE.parent / "rabbitmq" / "definitions.json").read_text())
    t = Topology(namespace="router")
    model = services["topology"]["command"][-1]
    expected = [
        admin_grant(users["topology"]),
        api_grant(users["api"], t),
        dispatcher_grant(users["dispatcher"], t),
        agent_grant(users["agent"], t, [model]),
    ]
    granted = {
        p["user"]: (p["configure"], p["write"], p["read"]) for p in definitions["permissions"]
    }
    assert granted == {
        g.user: (g.permission.configure, g.permission.write, g.permission.read) for g in expected
    }
    reply_users = services["api"]["environment"]["REPLY_USERS"]
    assert reply_users == f"{users['dispatcher']}=*,{users['agent']}={model}"


def test_ensure_services_starts_a_broker_the_local_defaults_can_use() -> None:
    """Without a local RabbitMQ, scripts/ensure-services.sh starts one from the compose file for
    `make dev` and `make test`, whose default RABBITMQ_URL is `guest` on vhost `/`. RabbitMQ
    seeds that user and vhost only on a node that imports no definitions at boot, so the
    service it starts must load none (the stack's own `rabbitmq` loads its users instead)."""
    assert BrokerSettings().rabbitmq_url == "amqp://guest:guest@127.0.0.1:5672/"
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    started = re.findall(r"\bup -d ([\w-]+)", ENSURE_SERVICES.read_text())
    brokers = [name for name in started if services[name]["image"].startswith("rabbitmq:")]
    assert len(brokers) == 1, started
    broker = services[brokers[0]]
    assert "127.0.0.1:5672:5672" in broker["ports"]
    for volume in broker.get("volumes", []):
        source = volume.split(":", 1)[0]
        assert "load_definitions" not in (COMPOSE_FILE.parent / source).read_text(), volume
    assert not any(
        "DEFAULT_USER" in key or "DEFAULT_VHOST" in key for key in broker.get("environment", {})
    )
