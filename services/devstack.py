"""`router dev`: every service on local defaults, in the foreground, one log stream.

Starts the API (`API_PORT`, 8000), a dispatcher, and an agent. With no `VLLM_URL` configured
the agent fronts the shipped fake vLLM (`API_PORT` + 100), so `local_*` models answer out of the
box; with no `OPENAI_API_KEY` the dispatcher is pointed at the shipped fake OpenAI (`API_PORT` +
200). The agent's `/health` is on `AGENT_PORT`, else `API_PORT` + 300: every port follows
`API_PORT`, so a second stack (with its own `BROKER_NAMESPACE` and `REGISTRY_PATH`) needs only
another `API_PORT`; a port already in use stops it before anything starts, with one line naming
the port and the variable to change, and so does a port out of range or two servers of the
stack on one port. The agent
(`AGENT_NAME`, default `dev-agent`) uses `AGENT_TOKEN`, else its own entry in `AGENT_TOKENS`,
else the token derived from `AGENT_TOKEN_SECRET`; with no agent credentials configured, a
secret is generated for this run. Processes run under honcho's manager: Ctrl-C stops them all.
"""

from __future__ import annotations

import os
import secrets
import sys

from honcho.manager import Manager

from services.api.agent_auth import derive_agent_token, parse_token_pairs
from shared.runner import MAX_PORT, listen

DEV_AGENT = "dev-agent"
Processes = list[tuple[str, str, dict[str, str]]]  # (name, command, extra env) of each
# The dev stack's ports follow API_PORT: the fakes', and the agent's /health unless AGENT_PORT.
VLLM_OFFSET, OPENAI_OFFSET, AGENT_OFFSET = 100, 200, 300


def _cmd(*args: str) -> str:
    # honcho runs each command through `sh -c`: `exec` lets the service itself get Ctrl-C's
    # SIGTERM and stop gracefully, instead of the shell dying of it first.
    return " ".join(["exec", sys.executable, "-m", "services.cli", *args])


def _agent_token(env: dict[str, str], name: str, notes: dict[str, str]) -> str:
    """The token the dev agent `name` presents. Where the API has no agent credentials, gives
    it some in `env` that accept this token. Raises ValueError, saying what to set, when the
    configured credentials hold no token for `name`."""
    token = env.get("AGENT_TOKEN", "")
    tokens = parse_token_pairs(env.get("AGENT_TOKENS", ""))
    secret = env.get("AGENT_TOKEN_SECRET", "")
    if not tokens and not secret:
        if token:
            env["AGENT_TOKENS"] = f"{name}={token}"
            return token
        env["AGENT_TOKEN_SECRET"] = secret = secrets.token_hex(16)
        notes["agent"] = (
            f"generated an agent token for `{name}` (AGENT_TOKEN_SECRET, this run only)"
        )
    if token:
        return token
    if name in tokens:
        return tokens[name]
    if secret:
        return derive_agent_token(secret, name)
    raise ValueError(
        f"AGENT_TOKENS has no token for agent `{name}`: add `{name}=<token>` to it, set "
        "AGENT_NAME to a name it has, or set AGENT_TOKEN"
    )


def plan(environ: dict[str, str]) -> tuple[dict[str, str], list[tuple[str, str, dict[str, str]]]]:
    """(shared env, [(name, command, extra env)]) for the dev stack; pure, for tests.

    Raises ValueError on agent credentials it cannot use (see `_agent_token`)."""
    env = dict(environ)
    api_port = _port(env, "API_PORT", 8000)
    env["API_PORT"] = str(api_port)  # every other port follows it
    # honcho kills what still runs 5 s after Ctrl-C: drain inside that, so the API answers
    # its waiting requests 503 and cancels their jobs instead of being killed with them.
    env.setdefault("DRAIN_TIMEOUT", "3")
    vllm_port, openai_port = api_port + VLLM_OFFSET, api_port + OPENAI_OFFSET
    notes: dict[str, str] = {}
    processes: list[tuple[str, str, dict[str, str]]] = []
    agent_name = env.get("AGENT_NAME") or DEV_AGENT
    agent_token = _agent_token(env, agent_name, notes)
    processes.append(("api", _cmd("api"), {}))
    dispatcher_env: dict[str, str] = {}
    if not env.get("OPENAI_API_KEY"):
        processes.append(
            (
                "fake-openai",
                _cmd("fake-openai", "--port", str(openai_port), "--api-key", "sk-dev-fake"),
                {},
            )
        )
        dispatcher_env = {
            "OPENAI_API_KEY": "sk-dev-fake",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{openai_port}/v1",
        }
        notes["openai"] = (
            "no OPENAI_API_KEY: every model routed to OpenAI (by default any name but dummy and "
            f"local*) goes to the fake OpenAI on :{openai_port}"
        )
    processes.append(("dispatcher", _cmd("dispatcher"), dispatcher_env))
    agent_env = {
        "AGENT_NAME": agent_name,
        "AGENT_TOKEN": agent_token,
        "ROUTER_URL": env.get("ROUTER_URL", f"http://127.0.0.1:{api_port}"),
        "AGENT_PORT": str(_port(env, "AGENT_PORT", api_port + AGENT_OFFSET, lowest=0)),
    }
    if not env.get("VLLM_URL"):
        processes.append(
            ("fake-vllm", _cmd("fake-vllm", "--port", str(vllm_port), "--token-rate", "50"), {})
        )
        agent_env["VLLM_URL"] = f"http://127.0.0.1:{vllm_port}/v1"
        notes["vllm"] = f"no VLLM_URL: the agent fronts the fake vLLM on :{vllm_port}"
    processes.append(("agent", _cmd("agent"), agent_env))
    check_ports(env, processes)
    for note in notes.values():
        print(f"router dev: {note}", flush=True)
    return env, processes


def servers(env: dict[str, str], processes: Processes) -> list[tuple[str, str, int, str]]:
    """(process, host, port, where the port comes from) of each server the planned stack
    starts, with the addresses each binds by default."""
    api_port = int(env["API_PORT"])
    offsets = {"fake-vllm": VLLM_OFFSET, "fake-openai": OPENAI_OFFSET}
    found = []
    for name, _, extra in processes:
        if name == "api":
            found.append((name, env.get("API_HOST", "127.0.0.1"), api_port, "API_PORT"))
        elif name in offsets:
            found.append(
                (name, "127.0.0.1", api_port + offsets[name], f"API_PORT + {offsets[name]}")
            )
        elif name == "agent":
            origin = "AGENT_PORT" if env.get("AGENT_PORT") else f"API_PORT + {AGENT_OFFSET}"
            found.append((name, env.get("AGENT_BIND", "0.0.0.0"), int(extra["AGENT_PORT"]), origin))
    return found


def _port(env: dict[str, str], variable: str, default: int, *, lowest: int = 1) -> int:
    """`variable`'s port, else `default` (checked with the ports that follow API_PORT);
    ValueError naming it when it is set to something else than a port."""
    text = env.get(variable)
    if not text:
        return default
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not lowest <= port <= MAX_PORT:
        raise ValueError(f"{variable}: {text!r} is not a port ({lowest}-{MAX_PORT})")
    return port


def check_ports(env: dict[str, str], processes: Processes) -> None:
    """Raises ValueError, naming the variable to change, when a port that follows API_PORT is
    past 65535 (the OS would wrap it: 65600 is port 64) or two servers of the stack would
    listen on one port (each checked alone, both looked free)."""
    found = servers(env, processes)
    api_port = int(env["API_PORT"])
    following = [port for _, _, port, origin in found if origin.startswith("API_PORT")]
    if max(following) > MAX_PORT:
        highest = MAX_PORT - (max(following) - api_port)
        raise ValueError(
            f"API_PORT: {api_port} puts the dev stack's ports past {MAX_PORT} (they follow it "
            f"up to + {max(following) - api_port}): choose an API_PORT of at most {highest}"
        )
    taken: dict[int, tuple[str, str]] = {}
    for name, _, port, origin in found:
        if port in taken:  # the explicit AGENT_PORT comes last: it is the one to change
            other, other_origin = taken[port]
            setting = origin.split()[0]
            raise ValueError(
                f"{setting}: {name} ({origin}) and {other} ({other_origin}) would both listen "
                f"on port {port}: choose another {setting}"
            )
        if port:  # 0: a free port picked at start
            taken[port] = (name, origin)


def busy_port(env: dict[str, str], processes: Processes) -> str | None:
    """What keeps the planned stack from starting (a port in use), or None. Checked before
    anything starts: honcho stops every process once one exits, and the fakes died of a port
    in use with a traceback."""
    for name, host, port, origin in servers(env, processes):
        try:
            sockets = listen(host, port)
        except OSError as e:
            setting = origin.split()[0]  # the variable to change: API_PORT or AGENT_PORT
            follows = ": every port of the dev stack follows it" if setting == "API_PORT" else ""
            return (
                f"cannot start {name} on {host}:{port} ({origin}): {e.strerror or e} "
                f"(choose another {setting}{follows})"
            )
        for sock in sockets:
            sock.close()
    return None


def main(argv: list[str]) -> None:
    try:
        env, processes = plan(dict(os.environ))
    except ValueError as e:
        print(f"router dev: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    busy = busy_port(env, processes)
    if busy is not None:
        print(f"router dev: {busy}", file=sys.stderr, flush=True)
        sys.exit(1)
    manager = Manager()
    for name, command, extra in processes:
        manager.add_process(name, command, env={**env, "PYTHONUNBUFFERED": "1", **extra})
    print(
        f"router dev: API on http://127.0.0.1:{env['API_PORT']} (Ctrl-C stops everything)",
        flush=True,
    )
    manager.loop()
    sys.exit(manager.returncode)
