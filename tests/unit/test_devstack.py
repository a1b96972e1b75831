"""`router dev`'s plan: which processes run, an agent token the API will accept, and a port in
use found before anything starts."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest

from fakes.cli import build_parser
from services import devstack
from services.api.agent_auth import AgentCredentials, derive_agent_token, parse_token_pairs
from services.devstack import DEV_AGENT, plan
from shared.runner import listen


def agent_env(environ: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the shared env, the agent's extra env) of the dev stack planned from `environ`."""
    env, processes = plan(environ)
    extras = {name: extra for name, _, extra in processes}
    return env, extras["agent"]


def assert_api_accepts(env: dict[str, str], agent: dict[str, str]) -> None:
    """The API, configured from the shared env, accepts the agent's name and token."""
    credentials = AgentCredentials(
        parse_token_pairs(env.get("AGENT_TOKENS", "")), env.get("AGENT_TOKEN_SECRET", "")
    )
    credentials.check(agent["AGENT_NAME"], f"Bearer {agent['AGENT_TOKEN']}")


def test_no_agent_credentials_generates_a_secret_for_this_run() -> None:
    env, agent = agent_env({})
    assert env["AGENT_TOKEN_SECRET"]
    assert agent["AGENT_NAME"] == DEV_AGENT
    assert agent["AGENT_TOKEN"] == derive_agent_token(env["AGENT_TOKEN_SECRET"], DEV_AGENT)
    assert_api_accepts(env, agent)


def test_agent_tokens_alone_gives_the_agent_its_entry() -> None:
    env, agent = agent_env({"AGENT_TOKENS": "other=xyz, dev-agent=abc"})
    assert agent["AGENT_TOKEN"] == "abc"
    assert "AGENT_TOKEN_SECRET" not in env
    assert_api_accepts(env, agent)


def test_agent_tokens_for_a_named_agent() -> None:
    env, agent = agent_env({"AGENT_TOKENS": "gpu1=abc", "AGENT_NAME": "gpu1"})
    assert (agent["AGENT_NAME"], agent["AGENT_TOKEN"]) == ("gpu1", "abc")
    assert_api_accepts(env, agent)


def test_a_secret_derives_the_token_of_the_agents_own_name() -> None:
    env, agent = agent_env({"AGENT_TOKEN_SECRET": "s3cret", "AGENT_NAME": "gpu1"})
    assert agent["AGENT_TOKEN"] == derive_agent_token("s3cret", "gpu1")
    assert_api_accepts(env, agent)


def test_agent_token_alone_is_accepted_by_the_api() -> None:
    env, agent = agent_env({"AGENT_TOKEN": "mine"})
    assert agent["AGENT_TOKEN"] == "mine"
    assert "AGENT_TOKEN_SECRET" not in env
    assert_api_accepts(env, agent)


def test_agent_tokens_without_the_agents_entry_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="AGENT_TOKENS has no token for agent `dev-agent`"):
        plan({"AGENT_TOKENS": "gpu1=abc"})


def test_malformed_agent_tokens_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="name=token pairs"):
        plan({"AGENT_TOKENS": "dev-agent"})


def test_fakes_stand_in_for_unset_upstreams() -> None:
    _, processes = plan({})
    assert [name for name, _, _ in processes] == [
        "api",
        "fake-openai",
        "dispatcher",
        "fake-vllm",
        "agent",
    ]
    _, processes = plan({"OPENAI_API_KEY": "sk-real", "VLLM_URL": "http://gpu:8000/v1"})
    assert [name for name, _, _ in processes] == ["api", "dispatcher", "agent"]


def test_every_port_follows_the_api_port() -> None:
    """A second dev stack on one machine needs only another API_PORT (and its own namespace)."""
    for api_port, expected in (({}, 8000), ({"API_PORT": "18000"}, 18000)):
        _, processes = plan(api_port)
        commands = {name: command for name, command, _ in processes}
        extras = {name: extra for name, _, extra in processes}
        assert commands["fake-vllm"].split("--port ")[1].startswith(f"{expected + 100} ")
        assert commands["fake-openai"].split("--port ")[1].startswith(f"{expected + 200} ")
        assert extras["agent"]["VLLM_URL"] == f"http://127.0.0.1:{expected + 100}/v1"
        assert extras["dispatcher"]["OPENAI_BASE_URL"] == f"http://127.0.0.1:{expected + 200}/v1"
        assert extras["agent"]["ROUTER_URL"] == f"http://127.0.0.1:{expected}"
        assert extras["agent"]["AGENT_PORT"] == str(expected + 300)
    assert agent_env({"AGENT_PORT": "5001"})[1]["AGENT_PORT"] == "5001"


def no_manager() -> None:
    raise AssertionError("router dev started its processes")


@contextlib.contextmanager
def a_dev_port_taken(offset: int) -> Iterator[int]:
    """An API_PORT whose dev stack's ports are free but the one at `offset` from it, which
    another socket listens on for the block."""
    for base in range(23_000, 30_000, 11):
        held: list[socket.socket] = []
        try:
            for other in (0, 100, 200, 300):
                held += listen("127.0.0.1", base + other)
        except OSError:
            for sock in held:
                sock.close()
            continue
        for sock in held:
            if sock.getsockname()[1] != base + offset:
                sock.close()
        try:
            yield base
        finally:
            for sock in held:
                sock.close()
        return
    raise RuntimeError("no free port range for a dev stack")


@pytest.mark.parametrize(
    ("offset", "env", "said"),
    [
        (100, {}, "fake-vllm on 127.0.0.1:{port} (API_PORT + 100)"),
        (200, {}, "fake-openai on 127.0.0.1:{port} (API_PORT + 200)"),
        (300, {"AGENT_PORT": "{port}"}, "agent on 0.0.0.0:{port} (AGENT_PORT)"),
    ],
)
def test_a_port_in_use_is_one_line_naming_it_and_nothing_starts(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    offset: int,
    env: dict[str, str],
    said: str,
) -> None:
    """The fake vLLM and fake OpenAI died of a port in use with an OSError traceback, and
    honcho then stopped every other process: the port is now checked before anything starts."""
    for name in ("OPENAI_API_KEY", "VLLM_URL", "AGENT_PORT", "AGENT_BIND", "API_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(devstack, "Manager", no_manager)
    with a_dev_port_taken(offset) as base:
        port = base + offset
        monkeypatch.setenv("API_PORT", str(base))
        for name, value in env.items():
            monkeypatch.setenv(name, value.format(port=port))
        with pytest.raises(SystemExit) as exit_:
            devstack.main([])
    assert exit_.value.code == 1
    setting = "AGENT_PORT" if env else "API_PORT: every port of the dev stack follows it"
    assert capsys.readouterr().err.splitlines() == [
        f"router dev: cannot start {said.format(port=port)}: Address already in use "
        f"(choose another {setting})"
    ]


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"API_PORT": "abc"}, "API_PORT: 'abc' is not a port (1-65535)"),
        ({"API_PORT": "70000"}, "API_PORT: '70000' is not a port (1-65535)"),
        ({"AGENT_PORT": "-1"}, "AGENT_PORT: '-1' is not a port (0-65535)"),
        (
            {"API_PORT": "65500"},
            "API_PORT: 65500 puts the dev stack's ports past 65535 (they follow it up to "
            "+ 300): choose an API_PORT of at most 65235",
        ),
        (
            {"API_PORT": "19411", "AGENT_PORT": "19511"},
            "AGENT_PORT: agent (AGENT_PORT) and fake-vllm (API_PORT + 100) would both listen "
            "on port 19511: choose another AGENT_PORT",
        ),
    ],
)
def test_a_port_the_stack_cannot_use_is_one_line_naming_it_and_nothing_starts(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    said: str,
) -> None:
    """API_PORT=abc was int()'s message, not naming the variable; API_PORT=65500 passed while
    the fakes listened on 65600 % 65536 = 64; an AGENT_PORT on the fake vLLM's port passed the
    check, which bound each port alone. Each is now one line before anything starts."""
    for name in ("OPENAI_API_KEY", "VLLM_URL", "AGENT_PORT", "API_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(devstack, "Manager", no_manager)
    monkeypatch.setattr(devstack, "listen", lambda *_: pytest.fail("a port was bound"))
    with pytest.raises(SystemExit) as exit_:
        devstack.main([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"router dev: {said}"]


def test_the_highest_api_port_whose_stack_fits_is_taken() -> None:
    env, processes = plan({"API_PORT": "65235"})
    assert max(port for *_, port, _ in devstack.servers(env, processes)) == 65535


def test_listen_refuses_a_port_out_of_range_instead_of_wrapping_it() -> None:
    with pytest.raises(ValueError, match="port 65600 is not in 0-65535"):
        listen("127.0.0.1", 65600)


@pytest.mark.parametrize("port", ["65600", "-1", "x"])
def test_a_fakes_port_out_of_range_is_refused(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser("fake", port=8100, models="m")
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--port", port])
    assert exit_.value.code == 2
    assert f"argument --port: {port!r} is not a port (0-65535" in capsys.readouterr().err
    assert parser.parse_args(["--port", "0"]).port == 0  # any free port, as before
