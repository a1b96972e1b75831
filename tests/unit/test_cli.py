"""The `router` command's arguments: the services take none, and `--help` starts nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
import uvicorn.config
from pydantic_settings import BaseSettings

from services import admin, cli
from services.agent.settings import AgentSettings
from services.api.server import listening_sockets
from services.api.settings import ApiSettings
from services.dispatcher.settings import DispatcherSettings
from shared import runner
from shared.runner import StartupError, run_service
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


def refused_settings(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    settings: type[BaseSettings],
    env: dict[str, str],
) -> str:
    """What `router svc` prints when `settings` refuse `env`; it must exit 2."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        load_settings(settings, "svc")
    assert exit_.value.code == 2
    return capsys.readouterr().err


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
    err = refused_settings(monkeypatch, capsys, ApiSettings, env)
    assert err.splitlines() == ["router svc: invalid configuration", line]
    assert "sk-" not in err  # the secret is never echoed


@pytest.mark.parametrize(
    ("settings", "env", "line"),
    [
        (
            DispatcherSettings,
            {"RABBITMQ_URL": "guest:pw-canary@127.0.0.1:5672"},  # no scheme
            "  RABBITMQ_URL: must be a URL (amqp://, amqps://) with a host, such as "
            "amqp://user:password@host:5672/vhost",
        ),
        (
            AgentSettings,
            {"LOG_LEVEL": "verbose"},
            "  LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        (
            DispatcherSettings,
            {"REDIS_URL": "pw-canary@localhost:6379"},
            "  REDIS_URL: must be a URL (redis://, rediss://, unix://) with a host, such as "
            "redis://host:6379/0",
        ),
        (
            DispatcherSettings,
            {"PROVIDER_ROUTES": "claude/=anthropic"},
            "  PROVIDER_ROUTES: names providers this router has no code for: ['anthropic'] "
            "(openai)",
        ),
        (
            AgentSettings,
            {"VLLM_URL": "vllm-host:8000"},
            "  VLLM_URL: must be a URL (http://, https://) with a host, such as "
            "http://127.0.0.1:8000/v1",
        ),
        (
            AgentSettings,
            {"AGENT_MODELS": "local_a=x,local_a=y"},
            "  AGENT_MODELS: model 'local_a' is listed twice in AGENT_MODELS",
        ),
        (
            AgentSettings,
            {"AGENT_BACKEND": "vllm-docker"},
            "  VLLM_MODEL is required with AGENT_BACKEND=vllm-docker",
        ),
    ],
)
def test_a_setting_the_service_could_not_use_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    settings: type[BaseSettings],
    env: dict[str, str],
    line: str,
) -> None:
    """Each of these used to pass the settings and fail later: a traceback, or (a broker URL
    without its scheme) a service retrying for ever, deaf to SIGTERM, logging the password."""
    err = refused_settings(monkeypatch, capsys, settings, env)
    assert err.splitlines() == ["router svc: invalid configuration", line]
    assert "canary" not in err


def test_a_log_level_is_read_in_any_case() -> None:
    assert AgentSettings(log_level="debug").log_level == "DEBUG"


@pytest.mark.parametrize(("given", "level"), [("warn", "WARNING"), ("Fatal", "CRITICAL")])
def test_logging_aliases_are_read_as_the_names_uvicorn_knows(given: str, level: str) -> None:
    """`LOG_LEVEL=warn` passed the check (logging knows WARN) and crashed the API in uvicorn."""
    assert ApiSettings(log_level=given).log_level == level
    assert level.lower() in uvicorn.config.LOG_LEVELS  # what the API passes on


def test_a_startup_error_is_one_logged_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Not the collection and freeze a service does at start: in this process they would
    # collect (and blame on this test) whatever earlier tests left unreachable.
    monkeypatch.setattr(runner, "settle_heap", lambda: None)

    async def main(_: object) -> None:
        raise StartupError("REGISTRY_PATH /x cannot hold the registry: it is a directory")

    with pytest.raises(SystemExit) as exit_:
        run_service(main)
    assert exit_.value.code == 1
    assert [r.getMessage() for r in caplog.records] == [
        "cannot start: REGISTRY_PATH /x cannot hold the registry: it is a directory"
    ]


def run_command(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_registry_path_that_cannot_hold_a_file_is_one_line_and_exit_1(
    tmp_path: object,
) -> None:
    done = run_command(
        "dispatcher", REGISTRY_PATH=str(tmp_path), RABBITMQ_URL="amqp://guest:guest@127.0.0.1:1/"
    )
    assert done.returncode == 1, done.stderr
    assert f"cannot start: REGISTRY_PATH {tmp_path} cannot hold the registry" in done.stderr
    assert "Traceback" not in done.stderr


def test_topology_without_a_broker_is_one_line_naming_where_it_looked() -> None:
    done = run_command("topology", RABBITMQ_URL="amqp://guest:pw-canary@127.0.0.1:1/router")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "router topology: cannot connect to the broker at 127.0.0.1:1, vhost router: "
        "AMQPConnectionError"
    ]


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (admin.topology_main, ["--agent-model", "llama"]),
        (admin.broker_acl_main, ["--agent", "gpu1=local_a|llama"]),
    ],
)
def test_operator_commands_refuse_an_agent_model_no_agent_serves(
    capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], None], argv: list[str]
) -> None:
    """An agent serving `llama` consumes `agent.local_llama`: a queue or grant for
    `agent.llama` would never be used."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "'llama' is not a router model id of an agent (such as local_llama)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--agent", "gpu1=local_a", "--agent", "gpu1=local_b"],
        ["--dispatcher", "router", "--agent", "router=local_a"],
    ],
)
def test_broker_acl_refuses_a_user_named_twice(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """RabbitMQ keeps one permission set per user: the second grant silently replaced the
    first, and `gpu1` lost `local_a` (review 2026-11-29)."""
    with pytest.raises(SystemExit) as exit_:
        admin.broker_acl_main(argv)
    assert exit_.value.code == 2
    assert "a broker user may have one role and one --agent entry" in capsys.readouterr().err


def run_on_a_taken_port(
    command: str, variable: str
) -> tuple[int, subprocess.CompletedProcess[str]]:
    """`router command` with `variable` naming a port another socket listens on, and every
    other address a closed port: (the port, what the command did)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            variable: str(port),
            "API_HOST": "127.0.0.1",
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
    return port, done


@pytest.mark.parametrize(
    ("command", "variable"), [("dispatcher", "HEALTH_PORT"), ("agent", "AGENT_PORT")]
)
def test_a_health_port_in_use_is_one_line_and_exit_1(command: str, variable: str) -> None:
    """Not a traceback: the line names the address and the variable that chose it."""
    port, done = run_on_a_taken_port(command, variable)
    assert done.returncode == 1, done.stderr
    assert "cannot serve /health on " in done.stderr and f":{port}: " in done.stderr
    assert f"choose another {variable}" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_api_port_in_use_is_one_line_and_exit_1_before_anything_else() -> None:
    """uvicorn bound the port only after the API's startup: the API had tried the broker (and
    with one up, declared its reply queue) when it exited 3 with uvicorn's own error line."""
    port, done = run_on_a_taken_port("api", "API_PORT")
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()  # not even the warnings of the app it did not build
    assert line.endswith(
        f"cannot start: cannot serve the API on 127.0.0.1:{port}: Address already in use "
        "(choose another API_PORT)"
    )


def test_an_api_host_that_is_not_this_hosts_names_api_host() -> None:
    with pytest.raises(StartupError, match=r"on 192\.0\.2\.1:8000: .*\(choose another API_HOST\)"):
        listening_sockets("192.0.2.1", 8000)  # TEST-NET-1: never a local address


@pytest.mark.parametrize(
    ("argv", "said"), [(["nosuch"], "unknown command 'nosuch'"), ([], "a command is needed")]
)
def test_a_missing_or_unknown_command_is_said_with_the_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "router api | dispatcher | agent" in err and err.rstrip().endswith(f"router: {said}")
