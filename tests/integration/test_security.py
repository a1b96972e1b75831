"""The API edge against hostile clients, and secrets kept out of logs, answers and SQLite.

Real processes on the real broker: client keys end to end, a 100 MB chunked upload measured in
the API's resident memory, hostile bodies over HTTP, and a whole stack (API, dispatcher, agent,
fake vLLM, fake OpenAI) at DEBUG with a canary value for every credential, exercised on its
success and error paths, then searched for those canaries.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from tests.conftest import require_services, skip_or_fail
from tests.integration.conftest import STACK_ENV, sdk_client
from tests.support.procs import Service, Stack, free_port, running_stack, wait_for, wait_http

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]
FULL_KEY = "sk-sec-full-0123456789"
DUMMY_KEY = "sk-sec-dummy-0123456789"
CLIENT_KEYS = f"full:{FULL_KEY},dummy-only:{DUMMY_KEY}:dummy"


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_name} for {pid}")


def api_service(stack: Stack) -> Service:
    return next(s for s in stack.services if s.name == "api")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_services()
    with running_stack({**STACK_ENV, "CLIENT_KEYS": CLIENT_KEYS}) as stack:
        stack.start_dispatcher(tmp_path_factory.mktemp("keyed"))
        stack.start_api()
        yield stack


@pytest.fixture
def api(keyed: Stack) -> str:
    return f"http://127.0.0.1:{keyed.api_ports[0]}"


def post(api: str, content: bytes, key: str | None = FULL_KEY) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(f"{api}/v1/chat/completions", content=content, headers=headers, timeout=10)


# --- client keys -------------------------------------------------------------------------------


def test_sdk_with_a_key_gets_an_answer(api: str) -> None:
    with sdk_client(api, api_key=FULL_KEY) as client:
        completion = client.chat.completions.create(model="dummy", messages=MESSAGES)  # type: ignore[arg-type]
        assert completion.choices[0].message.content == "Hello world"
        assert "dummy" in [m.id for m in client.models.list()]


@pytest.mark.parametrize("key", ["sk-wrong-0123456789", "", FULL_KEY + "x"])
def test_sdk_without_a_valid_key_is_401(api: str, key: str) -> None:
    with sdk_client(api, api_key=key or "unset") as client:
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="dummy", messages=MESSAGES)  # type: ignore[arg-type]
        assert info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_a_key_limited_to_models(api: str) -> None:
    with sdk_client(api, api_key=DUMMY_KEY) as client:
        assert client.chat.completions.create(model="dummy", messages=MESSAGES).choices  # type: ignore[arg-type]
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert info.value.code == "model_not_allowed"
        assert [m.id for m in client.models.list()] == ["dummy"]
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-4o")


# --- hostile bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b'{"model": "dummy", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
        (b'{"model": "dummy", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', None),
        (b'{"model": "dummy", "messages": [{"role": "user", "content": "x"}], "\\udfff": 1}', None),
        (b'{"model": "dummy\xff", "messages": [{"role": "user", "content": "x"}]}', None),
        (
            orjson.dumps({"model": "dummy", "messages": MESSAGES, "api_base": "http://evil"}),
            "api_base",
        ),
        (
            orjson.dumps({"model": "dummy", "messages": MESSAGES, "extra_body": {"base_url": "x"}}),
            "extra_body.base_url",
        ),
        (
            orjson.dumps({"model": "dummy", "messages": MESSAGES, "extra_headers": {}}),
            "extra_headers",
        ),
        (orjson.dumps({"model": "dummy", "messages": MESSAGES * 2049}), "messages"),
        (orjson.dumps({"model": "dummy", "messages": MESSAGES, "max_tokens": 10**7}), "max_tokens"),
        (orjson.dumps({"model": "dummy", "messages": MESSAGES, "n": 129}), "n"),
        (orjson.dumps({"model": "dummy", "messages": MESSAGES, "n": "2"}), "n"),
    ],
)
def test_hostile_bodies_are_400_never_500(api: str, content: bytes, param: str | None) -> None:
    response = post(api, content)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert response.headers["x-request-id"]


def test_a_redirect_field_is_refused_without_echoing_its_value(api: str) -> None:
    body = orjson.dumps({"model": "dummy", "messages": MESSAGES, "api_key": "sk-echo-me-123456"})
    response = post(api, body)
    assert response.status_code == 400
    assert "sk-echo-me" not in response.text


def test_unauthenticated_bodies_are_never_read(api: str) -> None:
    """A 401 comes before the body: no key, no parsing (and no 400 that reveals validation)."""
    response = post(api, b"{not json", key=None)
    assert response.status_code == 401


def _upload_chunked(port: int, total: int, pid: int) -> tuple[int, int, int]:
    """Send `total` bytes of chunked body; return (status, bytes sent, peak RSS KiB seen)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: api\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {FULL_KEY}\r\n".encode()
        + b"transfer-encoding: chunked\r\n\r\n"
    )
    answered = threading.Event()
    response = bytearray()

    def read() -> None:
        try:
            while b"\r\n\r\n" not in response:
                data = sock.recv(65536)
                if not data:
                    break
                response.extend(data)
        except OSError:
            pass
        answered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    piece = b"x" * 65536
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    sent, peak = 0, 0
    try:
        head = b'{"model": "dummy", "messages": [{"role": "user", "content": "'
        sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
        while sent < total and not answered.is_set():
            sock.sendall(frame)
            sent += len(piece)
            if sent % (4 * 1024 * 1024) < len(piece):
                peak = max(peak, rss_kib(pid))
    except OSError:
        pass  # the server closed the connection after answering: what it should do
    answered.wait(10)
    peak = max(peak, rss_kib(pid))
    sock.close()
    status = int(bytes(response).split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0
    return status, sent, peak


def test_a_100mb_chunked_body_is_413_with_flat_memory(keyed: Stack, api: str) -> None:
    service = api_service(keyed)
    for _ in range(20):  # warm up: imports, pools, caches
        post(api, orjson.dumps({"model": "dummy", "messages": MESSAGES}))
    before = rss_kib(service.pid)
    status, sent, peak = _upload_chunked(keyed.api_ports[0], 100 * 1024 * 1024, service.pid)
    after = rss_kib(service.pid)
    growth_mib = (max(peak, after) - before) / 1024
    print(f"\n100 MB chunked upload: status {status}, {sent / 2**20:.1f} MiB sent before the")
    print(f"server stopped reading; API RSS {before / 1024:.1f} MiB -> peak {peak / 1024:.1f} MiB")
    assert status == 413
    assert growth_mib < 50, f"RSS grew by {growth_mib:.1f} MiB"
    assert post(api, orjson.dumps({"model": "dummy", "messages": MESSAGES})).status_code == 200


# --- canary secrets ----------------------------------------------------------------------------


@dataclass
class Canaries:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def value(self, kind: str) -> str:
        return f"{kind}CANARY{self.tag}"

    @property
    def rabbit_user(self) -> str:
        return f"router-canary-{self.tag}"

    @property
    def redis_user(self) -> str:
        return f"router-canary-{self.tag}"

    def all(self) -> dict[str, str]:
        kinds = ("client", "agent", "agentsecret", "openai", "rabbit", "redis")
        kinds += ("rabbitwrong", "rediswrong")  # refused passwords, for the failure paths
        return {kind: self.value(kind) for kind in kinds}


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def canaries() -> Iterator[Canaries]:
    """A RabbitMQ user and a Redis ACL user with canary passwords, removed afterwards."""
    require_services()
    c = Canaries()
    if shutil.which("rabbitmqctl") is None:
        skip_or_fail("rabbitmqctl is not available to create a broker user")
    try:
        rabbitmqctl("add_user", c.rabbit_user, c.value("rabbit"))
        rabbitmqctl("set_permissions", "-p", "/", c.rabbit_user, ".*", ".*", ".*")
    except (OSError, subprocess.SubprocessError) as e:
        skip_or_fail(f"rabbitmqctl could not create a broker user: {type(e).__name__}")
    admin = redis.Redis(host="127.0.0.1", port=6379)
    try:
        admin.acl_setuser(
            c.redis_user,
            enabled=True,
            passwords=[f"+{c.value('redis')}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all"],
        )
    except redis.RedisError as e:
        subprocess.run(["rabbitmqctl", "delete_user", c.rabbit_user], check=False, timeout=60)
        skip_or_fail(f"Redis refused an ACL user: {type(e).__name__}")
    try:
        yield c
    finally:
        with contextlib.suppress(redis.RedisError):
            admin.acl_deluser(c.redis_user)
        admin.close()
        subprocess.run(
            ["rabbitmqctl", "delete_user", c.rabbit_user],
            check=False,
            capture_output=True,
            timeout=60,
        )


AGENT_NAME = "canary-agent"


@dataclass
class CanaryStack:
    api: str
    openai: str
    registry: Path


def start_canary_stack(stack: Stack, secret: dict[str, str], user: str, tmp: Path) -> CanaryStack:
    """Fake OpenAI (wanting the canary key), fake vLLM (echo), dispatcher, API, agent."""
    openai_port, vllm_port = free_port(), free_port()
    fakes = [
        (
            stack.start(
                "fake-openai",
                ["fake-openai", "--port", str(openai_port), "--api-key", secret["openai"]],
            ),
            openai_port,
        ),
        (
            stack.start(
                "fake-vllm", ["fake-vllm", "--port", str(vllm_port), "--models", "m", "--echo"]
            ),
            vllm_port,
        ),
    ]
    for service, port in fakes:
        wait_http(f"http://127.0.0.1:{port}/_fake/stats", service=service)
    dispatcher = stack.start_dispatcher(tmp, OPENAI_BASE_URL=f"http://127.0.0.1:{openai_port}/v1")
    api = stack.start_api()
    agent_port = free_port()
    stack.start(
        "agent",
        ["agent"],
        AGENT_NAME=AGENT_NAME,
        AGENT_TOKEN=secret["agent"],
        ROUTER_URL=api,
        VLLM_URL=f"http://127.0.0.1:{vllm_port}/v1",
        AGENT_MODELS="m",
        AGENT_PORT=str(agent_port),
        AGENT_HOST="127.0.0.1",
        HEARTBEAT_INTERVAL="0.5",
    )
    wait_http(f"http://127.0.0.1:{agent_port}/ready")
    listing = f"{api}/v1/models"
    auth = {"authorization": f"Bearer {secret['client']}"}
    wait_for(
        lambda: "local_m" in httpx.get(listing, headers=auth, timeout=5).text,
        timeout=10,
        message="the agent's model is not listed",
    )
    # Failure paths of credentials themselves: a dispatcher whose Redis password is refused
    # (it runs, bypassing the cache) and an API whose broker password is refused (not ready).
    health_port = free_port()
    second = stack.start_dispatcher(
        tmp,
        REDIS_URL=f"redis://{user}:{secret['rediswrong']}@127.0.0.1:6379/0",
        OPENAI_BASE_URL=f"http://127.0.0.1:{openai_port}/v1",
        HEALTH_PORT=str(health_port),
    )
    wait_http(f"http://127.0.0.1:{health_port}/ready", service=second)
    time.sleep(1.0)  # two agent heartbeats: the new dispatcher knows `local_m` too
    port = free_port()
    stack.start(
        "api-refused",
        ["api"],
        API_PORT=str(port),
        RABBITMQ_URL=f"amqp://{user}:{secret['rabbitwrong']}@127.0.0.1:5672/",
    )
    wait_http(f"http://127.0.0.1:{port}/health")
    assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 503
    return CanaryStack(
        api, f"http://127.0.0.1:{openai_port}", Path(dispatcher.env["REGISTRY_PATH"])
    )


def exercise(target: CanaryStack, secret: dict[str, str]) -> list[httpx.Response]:
    """Success paths first (8 answers of 200), then every kind of refusal and failure."""
    answers: list[httpx.Response] = []

    def call(method: str, path: str, key: str | None = secret["client"], **kw: Any) -> None:
        headers = {"authorization": f"Bearer {key}"} if key is not None else {}
        answers.append(httpx.request(method, target.api + path, headers=headers, timeout=20, **kw))

    def chat(model: str, key: str | None = secret["client"], **body: Any) -> None:
        payload = {"model": model, "messages": MESSAGES, **body}
        call("POST", "/v1/chat/completions", key, json=payload)

    for model in ("dummy", "local_m", "gpt-4o-mini"):  # the dispatcher, an agent, a provider
        chat(model)
        chat(model, stream=True, stream_options={"include_usage": True})
    chat("dummy", temperature=0)
    chat("dummy", temperature=0)  # a cache hit
    call("GET", "/v1/models")
    call("GET", "/v1/models/dummy")
    chat("dummy", key=None)
    chat("dummy", key=secret["agent"])  # an agent token is not a client key
    chat("dummy", key=secret["agentsecret"])
    chat("gpt-4o-mini", key=DUMMY_KEY)  # outside the key's models
    chat("gpt-nope")  # the provider's own 404
    chat("dummy", api_key=secret["openai"], api_base="http://evil.example")
    chat("dummy", extra_body={"api_key": secret["client"]})
    call("POST", "/v1/chat/completions", content=b'{"model": "dummy", "messages": "\\ud800"}')
    call("GET", "/v1/models/no-such-model")
    call("POST", "/register", json={"name": AGENT_NAME, "models": ["local_m"]})  # a client key
    call("POST", "/heartbeat", key=secret["agent"], json={"name": "someone-else"})
    call("POST", "/heartbeat", key=secret["agentsecret"], json={"name": AGENT_NAME})
    call("POST", "/heartbeat", key=secret["agent"], json={"name": AGENT_NAME, "load": 0.5})
    script = [{"status": 500}, {"status": 500}, {"status": 401}]
    httpx.post(f"{target.openai}/_fake/script", json=script, timeout=5)
    chat("gpt-4o-mini", seed=1)  # upstream 500, retried, 500 again
    chat("gpt-4o-mini", seed=2)  # upstream 401
    return answers


def canary_hits(
    secret: dict[str, str], logs: dict[str, str], answers: str, stores: dict[str, bytes]
) -> list[str]:
    hits = []
    for kind, value in secret.items():
        hits += [f"{kind} in the {name} log" for name, text in logs.items() if value in text]
        hits += [f"{kind} in an answer"] if value in answers else []
        hits += [f"{kind} in {name}" for name, data in stores.items() if value.encode() in data]
    return hits


def test_no_secret_reaches_a_log_an_answer_or_sqlite(canaries: Canaries, tmp_path: Path) -> None:
    secret = canaries.all()
    env = {
        **STACK_ENV,
        "LOG_LEVEL": "DEBUG",
        "RABBITMQ_URL": f"amqp://{canaries.rabbit_user}:{secret['rabbit']}@127.0.0.1:5672/",
        "REDIS_URL": f"redis://{canaries.redis_user}:{secret['redis']}@127.0.0.1:6379/0",
        "CLIENT_KEYS": f"canary:{secret['client']},limited:{DUMMY_KEY}:dummy",
        "AGENT_TOKENS": f"{AGENT_NAME}={secret['agent']}",
        "AGENT_TOKEN_SECRET": secret["agentsecret"],
        "OPENAI_API_KEY": secret["openai"],
        "PROVIDER_MAX_RETRIES": "1",
        "PROVIDER_BACKOFF_BASE": "0.05",
    }
    with running_stack(env) as stack:
        target = start_canary_stack(stack, secret, canaries.rabbit_user, tmp_path)
        answers = exercise(target, secret)
        time.sleep(1.0)  # let heartbeats and the cache writer land
        stack.stop()  # flushes every log and the SQLite WAL
        logs = {s.log_path.name: s.log() for s in stack.services if not s.name.startswith("fake")}

    statuses = [r.status_code for r in answers]
    assert statuses[:8] == [200] * 8, [(r.status_code, r.text[:200]) for r in answers[:8]]
    assert {400, 401, 403, 404} <= set(statuses), statuses
    chat_errors = [  # a 401 comes before a request exists; every later answer names it
        r
        for r in answers
        if r.status_code not in (200, 401) and r.request.url.path == "/v1/chat/completions"
    ]
    assert chat_errors and all(r.headers.get("x-request-id") for r in chat_errors)
    assert any("client keys: 2 configured" in log for log in logs.values())
    debug_lines = {name: log.count(" DEBUG ") for name, log in logs.items()}
    assert all(debug_lines.values()), f"not all at DEBUG: {debug_lines}"
    answer_text = "\n".join(f"{r.status_code} {dict(r.headers)} {r.text}" for r in answers)
    registry = target.registry
    stores = {path.name: path.read_bytes() for path in registry.parent.glob(registry.name + "*")}
    assert stores, "the dispatcher wrote no SQLite file"
    assert AGENT_NAME.encode() in b"".join(stores.values())  # the registry did record the agent
    assert not canary_hits(secret, logs, answer_text, stores)
    print(
        f"\ncanaries: {len(secret)} secrets; {len(logs)} logs "
        f"({sum(len(t) for t in logs.values())} chars), {len(answers)} answers and "
        f"{len(stores)} SQLite files searched: no hit (DEBUG lines: {debug_lines})"
    )
