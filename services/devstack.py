"""`router dev`: every service on local defaults, in the foreground, one log stream.

Starts the API (:8000), a dispatcher, and an agent. With no `VLLM_URL` configured the agent
fronts the shipped fake vLLM (:8100), so `local_*` models answer out of the box; with no
`OPENAI_API_KEY` the dispatcher is pointed at the shipped fake OpenAI (:8200). With no agent
credentials configured, a secret is generated for this run and the agent's token derived from
it. Processes run under honcho's manager: Ctrl-C stops them all.
"""

from __future__ import annotations

import os
import secrets
import sys

from honcho.manager import Manager

from services.api.agent_auth import derive_agent_token

DEV_AGENT = "dev-agent"


def _cmd(*args: str) -> str:
    return " ".join([sys.executable, "-m", "services.cli", *args])


def plan(environ: dict[str, str]) -> tuple[dict[str, str], list[tuple[str, str, dict[str, str]]]]:
    """(shared env, [(name, command, extra env)]) for the dev stack; pure, for tests."""
    env = dict(environ)
    notes: dict[str, str] = {}
    processes: list[tuple[str, str, dict[str, str]]] = []
    if not env.get("AGENT_TOKENS") and not env.get("AGENT_TOKEN_SECRET"):
        env["AGENT_TOKEN_SECRET"] = secrets.token_hex(16)
        notes["agent"] = (
            f"generated an agent token for `{DEV_AGENT}` (AGENT_TOKEN_SECRET, this run only)"
        )
    agent_token = env.get("AGENT_TOKEN") or derive_agent_token(env["AGENT_TOKEN_SECRET"], DEV_AGENT)
    processes.append(("api", _cmd("api"), {}))
    dispatcher_env: dict[str, str] = {}
    if not env.get("OPENAI_API_KEY"):
        processes.append(
            ("fake-openai", _cmd("fake-openai", "--port", "8200", "--api-key", "sk-dev-fake"), {})
        )
        dispatcher_env = {
            "OPENAI_API_KEY": "sk-dev-fake",
            "OPENAI_BASE_URL": "http://127.0.0.1:8200/v1",
        }
        notes["openai"] = "no OPENAI_API_KEY: gpt-* models go to the fake OpenAI on :8200"
    processes.append(("dispatcher", _cmd("dispatcher"), dispatcher_env))
    agent_env = {
        "AGENT_NAME": env.get("AGENT_NAME", DEV_AGENT),
        "AGENT_TOKEN": agent_token,
        "ROUTER_URL": env.get("ROUTER_URL", f"http://127.0.0.1:{env.get('API_PORT', '8000')}"),
    }
    if not env.get("VLLM_URL"):
        processes.append(
            ("fake-vllm", _cmd("fake-vllm", "--port", "8100", "--token-rate", "50"), {})
        )
        agent_env["VLLM_URL"] = "http://127.0.0.1:8100/v1"
        notes["vllm"] = "no VLLM_URL: the agent fronts the fake vLLM on :8100"
    processes.append(("agent", _cmd("agent"), agent_env))
    for note in notes.values():
        print(f"router dev: {note}", flush=True)
    return env, processes


def main(argv: list[str]) -> None:
    env, processes = plan(dict(os.environ))
    manager = Manager()
    for name, command, extra in processes:
        manager.add_process(name, command, env={**env, "PYTHONUNBUFFERED": "1", **extra})
    port = env.get("API_PORT", "8000")
    print(f"router dev: API on http://127.0.0.1:{port} (Ctrl-C stops everything)", flush=True)
    manager.loop()
    sys.exit(manager.returncode)
