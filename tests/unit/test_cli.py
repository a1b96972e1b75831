"""The `router` command's arguments: the services take none, and `--help` starts nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from services import admin, cli
from services.agent.settings import AgentSettings
from services.api.settings import ApiSettings
from shared.settings import load_settings


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each command records that it ran instead of running."""
    ran: list[str] = []
    for name in cli.COMMANDS:
        monkeypatch.setitem(cli.COMMANDS, name, lambda argv, name=name: ran.append(name))
    return ran


@pytest.mark.parametrize("command", ["api", "dispatcher", "agent", "dev"])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_on_a_service_prints_usage_and_starts_nothing(
    started: list[str], capsys: pytest.CaptureFixture[str], command: str, flag: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, flag])
    assert exit_.value.code == 0 and started == []
    assert f"usage: router {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("main", "command", "says"),
    [
        (admin.topology_main, "topology", ["Declare the shared", "agent model's queue"]),
        (admin.broker_acl_main, "broker-acl", ["Print the permissions", "a user's password"]),
    ],
)
def test_an_operator_commands_help_is_its_own(
    capsys: pytest.CaptureFixture[str],
    main: Callable[[list[str]], None],
    command: str,
    says: list[str],
) -> None:
    """Not the module's docstring, which describes both commands: each its own text, and
    what each option is for."""
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and out.startswith(f"usage: router {command}")
    assert all(text in out for text in says)
    assert "Operator commands for a least-privilege broker" not in out


def test_an_argument_to_a_service_is_refused(
    started: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["agent", "--port", "1"])
    assert exit_.value.code == 2 and started == []
    assert "unexpected argument '--port'" in capsys.readouterr().err


def test_tools_still_get_their_arguments(started: list[str]) -> None:
    cli.main(["fake-vllm", "--help"])
    cli.main(["api"])
    assert started == ["fake-vllm", "api"]


def test_a_bad_setting_is_one_line_per_variable_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUTER_URL", "router-host:8000")
    monkeypatch.setenv("AGENT_TOKEN", "12345")  # valid: never echoed anyway
    monkeypatch.setenv("AGENT_CONCURRENCY", "many")
    with pytest.raises(SystemExit) as exit_:
        load_settings(AgentSettings, "agent")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "router agent: invalid configuration"
    assert "  ROUTER_URL: String should match pattern" in err
    assert "  AGENT_CONCURRENCY: Input should be a valid integer" in err
    assert "router-host" not in err and "many" not in err  # values are not repeated


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"CLIENT_KEYS": "t1:sk-t1"},
            "  CLIENT_KEYS entry 1 (id t1): the key must be 8-512 printable ASCII characters "
            "without spaces, ':' or ','",
        ),
        (
            {"AGENT_TOKENS": "gpu1"},
            "  AGENT_TOKENS must be comma-separated name=token pairs",
        ),
        (
            {"AGENT_TOKENS": "gpu1=sk-shared-123", "CLIENT_KEYS": "t1:sk-shared-123"},
            "  a client key is also an agent token: give each its own",
        ),
    ],
)
def test_malformed_credentials_are_a_bad_setting_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    line: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        load_settings(ApiSettings, "api")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["router api: invalid configuration", line]
    assert "sk-" not in err  # the secret is never echoed


@pytest.mark.parametrize(
    ("command", "variable"), [("dispatcher", "HEALTH_PORT"), ("agent", "AGENT_PORT")]
)
def test_a_health_port_in_use_is_one_line_and_exit_1(command: str, variable: str) -> None:
    """Not a traceback: the line names the address and the variable that chose it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            variable: str(port),
            "AGENT_HOST": "127.0.0.1",
            "VLLM_URL": "http://127.0.0.1:1/v1",
            "ROUTER_URL": "http://127.0.0.1:1",
            "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1/",
        }
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert "cannot serve /health on " in done.stderr and f":{port}: " in done.stderr
    assert f"choose another {variable}" in done.stderr
    assert "Traceback" not in done.stderr
