"""deploy/docker-compose.yml: validated without an engine, and run where one answers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.agent.settings import AgentSettings
from services.api.server import WRITE_GRACE
from services.api.settings import ApiSettings
from services.dispatcher.settings import DispatcherSettings
from shared.broker_acl import admin_grant, agent_grant, api_grant, dispatcher_grant
from shared.settings import BrokerSettings, Durability
from shared.topology import Topology
from tests.conftest import skip_or_fail

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


def compose_config(**env: str) -> dict[str, Any]:
    """The compose file as `docker compose config` resolves it with `env` set."""
    command = compose_command()
    if command is None:
        skip_or_fail("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        check=False,
        # The file's own defaults, unless the test sets them: not this shell's DURABILITY.
        env={**{k: v for k, v in os.environ.items() if k != "DURABILITY"}, **env},
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


ROUTER_SERVICES = ("topology", "api", "dispatcher", "agent")


def test_compose_file_is_valid() -> None:
    services = compose_config()["services"]
    assert {"rabbitmq", "redis", "api", "dispatcher", "agent"} <= set(services)
    assert "healthcheck" in services["rabbitmq"]
    assert services["api"]["build"]["dockerfile"].endswith("Dockerfile")


@pytest.mark.parametrize("mode", list(Durability))
def test_one_variable_switches_the_whole_stack_between_durable_and_quorum(
    mode: Durability,
) -> None:
    """`DURABILITY=quorum docker compose up` is the cluster set-up: every service, the topology
    and the broker users' grants must switch together, or the quorum half gets no jobs (or no
    permission). Unset, the stack is durable."""
    services = compose_config(**({} if mode is Durability.DURABLE else {"DURABILITY": mode}))[
        "services"
    ]
    for name in ROUTER_SERVICES:
        assert services[name]["environment"]["DURABILITY"] == mode.value, name
    mounted = [str(v) for v in services["rabbitmq"]["volumes"] if "router-definitions" in str(v)]
    assert len(mounted) == 1 and f"definitions-{mode.value}.json" in mounted[0], mounted


@pytest.mark.parametrize("mode", list(Durability))
def test_compose_services_use_least_privilege_broker_users(mode: Durability) -> None:
    """Each service has its own broker user in vhost `router`, and the committed definitions
    grant exactly what `router broker-acl` computes for them today (no drift), in each mode."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    users = {}
    for name in ROUTER_SERVICES:
        url = services[name]["environment"]["RABBITMQ_URL"]
        users[name] = url.split("//", 1)[1].split(":", 1)[0]
        assert url.endswith("@rabbitmq:5672/router")
    assert len(set(users.values())) == 4
    for name in ("api", "dispatcher", "agent"):
        assert services[name]["depends_on"]["topology"]["condition"] == (
            "service_completed_successfully"
        )
    definitions = json.loads(
        (COMPOSE_FILE.parent / "rabbitmq" / f"definitions-{mode.value}.json").read_text()
    )
    t = Topology(namespace="router", mode=mode)
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
    topics = {
        (p["user"], p["exchange"]): (p["write"], p["read"])
        for p in definitions["topic_permissions"]
    }
    assert topics == {
        (g.user, topic.exchange): (topic.write, topic.read) for g in expected for topic in g.topics
    }
    reply_users = services["api"]["environment"]["REPLY_USERS"]
    assert reply_users == f"{users['dispatcher']}=*,{users['agent']}={model}"


def test_services_get_time_to_drain_before_docker_kills_them() -> None:
    """Docker sends SIGKILL 10 s after SIGTERM unless told otherwise: it cut off the drain
    (DRAIN_TIMEOUT 20 s), and with it the API's 503s and cancels (review 2026-11-29)."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    needed = max(
        ApiSettings().drain_timeout + WRITE_GRACE,
        DispatcherSettings().drain_timeout,
        AgentSettings().drain_timeout,
    )
    for name in ("api", "dispatcher", "agent"):
        grace = services[name].get("stop_grace_period", "10s")
        assert re.fullmatch(r"\d+s", grace), grace
        assert int(grace[:-1]) >= needed, f"{name}: {grace}, drains for up to {needed:g} s"


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
