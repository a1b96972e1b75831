"""`router dev` (what `make dev` runs): the whole stack on local defaults answers through the
strict SDK, and Ctrl-C stops every service cleanly.

It runs as a user would start it, with only what a test must change: its own broker
namespace, ports and registry file, and no OPENAI_API_KEY or VLLM_URL, so the shipped fakes
stand in for OpenAI and vLLM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.openai import snapshot_of
from tests.integration.conftest import sdk_client
from tests.support.procs import ROOT, new_namespace, wait_for, wait_http

SERVICES = ("api", "dispatcher", "agent", "fake-vllm", "fake-openai")
OFFSETS = (0, 100, 200, 300)  # API_PORT and the ports `router dev` derives from it


def free_base_port() -> int:
    """An API_PORT whose derived ports are free too."""
    for base in range(21_000, 30_000, 7):
        try:
            for offset in OFFSETS:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range for router dev")


@pytest.fixture
def dev_stack(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_base_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"OPENAI_API_KEY", "VLLM_URL", "AGENT_TOKENS", "AGENT_TOKEN_SECRET"}
    }
    env.update(
        BROKER_NAMESPACE=new_namespace(),
        API_PORT=str(port),
        REGISTRY_PATH=str(tmp_path / "registry.sqlite3"),
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "dev"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process, port, log
    finally:
        # honcho starts each service in a session of its own: only honcho can stop them all,
        # so it gets Ctrl-C first, and SIGKILL only if it does not end in time.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def test_router_dev_serves_every_kind_of_model_and_stops_cleanly(
    dev_stack: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    process, port, log = dev_stack
    api = f"http://127.0.0.1:{port}"
    wait_http(f"{api}/health", timeout=60)
    with sdk_client(api) as client:
        wait_for(
            lambda: any(m.id.startswith("local") for m in client.models.list()),
            timeout=30,
            message="the dev agent's model never listed",
        )
        listed = [m.id for m in client.models.list()]
        local = next(m for m in listed if m.startswith("local"))
        assert "dummy" in listed
        for model in ("dummy", local, "gpt-4o-mini"):  # the dispatcher, an agent, a provider
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
            # A provider names the snapshot it answered with (`gpt-4o-mini-2024-07-18`).
            assert answer.model == snapshot_of(model) and answer.choices[0].message.content
            chunks = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text, f"{model}: an empty stream"

    process.send_signal(signal.SIGINT)  # Ctrl-C
    process.wait(30)
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    # Each service handled its SIGTERM and exited 0 (the API too: uvicorn no longer re-raises it).
    for name in SERVICES:
        assert f"{name} stopped (rc=0)" in output, f"{name} did not stop cleanly:\n{output[-3000:]}"
    for offset in OFFSETS:  # and nothing still listens on the stack's ports
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port + offset))
