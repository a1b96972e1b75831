"""Fuzzing the API against its own OpenAPI document, and unicode round trips through the stack.

- Schemathesis generates requests for every operation of the API's document (positive cases
  that fit it, negative cases that do not) and checks each answer: no 5xx, every status and
  body as documented, every negative case a 4xx. `/v1/*` runs against an API with a dispatcher;
  `/register` and `/heartbeat` against an API whose namespace has no dispatcher, so thousands of
  random registrations declare no agent queues. The only test-side change to the document is
  `model` pinned to `dummy` (other models route to providers this stack does not have).
- Hypothesis sends arbitrary unicode message contents through API, dispatcher, an agent and a
  fake vLLM that echoes them, and checks they come back identical: 1,000 one per request and
  10,000 more as content parts, 100 per request, here (the whole stack
  answers about a hundred requests a second on a loaded test machine), 10,000 through the same
  steps in-process in tests/unit/test_security_roundtrip.py.

`FUZZ_EXAMPLES` (default 1000) is the number of cases per operation that takes input, half
positive and half negative. An operation without parameters or body (`/health`, `/ready`,
`/v1/models`) is one request whatever hypothesis draws: it gets `PARAMLESS_EXAMPLES`, and its
negative cases can only drop or spoil the key, where it has one.
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import ignored_auth

from services.api.agent_auth import derive_agent_token
from tests.conftest import require_services
from tests.support.procs import LOG_DIR, Stack, free_port, running_stack, wait_for, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
PARAMLESS_EXAMPLES = 100
CLIENT_KEY = "sk-fuzz-0123456789abcdef"
AGENT_SECRET = "fuzz-agent-secret-0123456789"
ECHO_TOKEN = "tok-echo-0123456789"
FUZZ_ENV = {"LOG_LEVEL": "WARNING", "REQUEST_TIMEOUT": "10", "TTFT_TIMEOUT": "10"}
# What counts as rejecting a negative case: schemathesis's own list, less 5xx (never an answer
# here), plus 413. To break `maxItems` it can grow `messages` past MAX_BODY_BYTES (12 MiB), and
# such a body is refused by its size before it is parsed, with the 413 every body route documents.
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


def fuzz_config(**settings: Any) -> SchemathesisConfig:
    checks = {"checks": {"negative_data_rejection": {"expected-statuses": REJECTED}}}
    return SchemathesisConfig.from_dict({**settings, **checks})


@pytest.fixture(scope="module")
def fuzz_summary() -> Iterator[dict[str, dict[str, Any]]]:
    """The case counts of each operation fuzzed here, left where a human can read them once the
    module is done (var/test-logs/fuzz-summary.json)."""
    summary: dict[str, dict[str, Any]] = {}
    yield summary
    if summary:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        (LOG_DIR / "fuzz-summary.json").write_bytes(
            orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
        )


@pytest.fixture(scope="module")
def v1_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_services()
    env = {**FUZZ_ENV, "CLIENT_KEYS": f"fuzz:{CLIENT_KEY}"}
    with running_stack(env) as stack:
        stack.start_dispatcher(tmp_path_factory.mktemp("fuzz"))
        yield stack.start_api()


@pytest.fixture(scope="module")
def agent_api() -> Iterator[str]:
    require_services()
    with running_stack({**FUZZ_ENV, "AGENT_TOKEN_SECRET": AGENT_SECRET}) as stack:
        yield stack.start_api()


def document(api: str) -> dict[str, Any]:
    """The API's own document; for fuzzing, `model` is pinned to the one that answers fast."""
    doc = copy.deepcopy(httpx.get(f"{api}/openapi.json", timeout=5).json())
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    chat["requestBody"]["content"]["application/json"]["schema"]["properties"]["model"] = {
        "const": "dummy"
    }
    return doc


class AgentToken:
    """The token of the agent the generated body names (any token when it names none)."""

    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        body = case.body
        name = body.get("name") if isinstance(body, dict) else None
        return derive_agent_token(AGENT_SECRET, name if isinstance(name, str) else "")

    def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def fuzz(
    schema: schemathesis.BaseSchema,
    path: str,
    method: str,
    base_url: str,
    credential: str,
    *,
    recorded: dict[str, dict[str, Any]],
) -> None:
    """Run the cases of one operation (half each mode), assert on every answer and that each
    mode sent some, and record the counts in `recorded`.

    Negative cases of an operation with a body carry `credential`, so that they break the body
    rather than mostly the key; keys are tested by schemathesis's auth check, which probes every
    2xx positive case again without its key and with a wrong one.
    """
    operation = schema[path][method]
    takes_input = bool(operation.definition.raw.get("parameters")) or bool(operation.body)
    examples = EXAMPLES if takes_input else PARAMLESS_EXAMPLES
    secured = "security" in operation.definition.raw
    modes = [GenerationMode.POSITIVE]
    if takes_input or secured:  # else no request can be made that breaks the document
        modes.append(GenerationMode.NEGATIVE)
    session = requests.Session()
    # Only a body gives negative cases something to break besides the key.
    fixed = {"Authorization": f"Bearer {credential}"} if operation.body else None
    summary = {
        mode.value: fuzz_mode(
            operation.as_strategy(
                generation_mode=mode, headers=fixed if mode.is_negative else None
            ),
            mode,
            base_url,
            session,
            examples // len(modes),
        )
        for mode in modes
    }
    recorded[f"{method} {path}"] = summary
    print(f"\nfuzz {method} {path}: {summary}")
    sent = {mode: counts["cases"] for mode, counts in summary.items()}
    assert sent and all(sent.values()), f"{method} {path}: cases sent {sent}"


def fuzz_mode(
    cases: st.SearchStrategy[schemathesis.Case],
    mode: GenerationMode,
    base_url: str,
    session: requests.Session,
    examples: int,
) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    negative = mode is GenerationMode.NEGATIVE
    # The auth check sends each 2xx case twice more (no key, a wrong key); like schemathesis's
    # own runner, one confirmation per operation is enough.
    excluded: list[Any] = []
    calls = [0.0]  # seconds spent waiting on the API (the rest is generating cases)

    @given(case=cases)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        sent = time.monotonic()
        response = case.call_and_validate(
            base_url=base_url, session=session, timeout=15, excluded_checks=excluded
        )
        calls[0] += time.monotonic() - sent
        statuses[response.status_code] += 1
        if 200 <= response.status_code < 300 and not excluded:
            excluded.append(ignored_auth)
        assert response.status_code < 500, response.text
        if negative:
            assert 400 <= response.status_code < 500, (case.body, response.text)

    started = time.monotonic()
    run()
    return {
        "cases": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "seconds": round(time.monotonic() - started, 1),
        "in_calls": round(calls[0], 1),
    }


V1_OPERATIONS = [
    ("/v1/chat/completions", "POST"),
    ("/v1/models", "GET"),
    ("/v1/models/{model}", "GET"),
    ("/health", "GET"),
    ("/ready", "GET"),
]


@pytest.mark.parametrize(("path", "method"), V1_OPERATIONS)
def test_fuzz_client_routes(
    v1_api: str, fuzz_summary: dict[str, dict[str, Any]], path: str, method: str
) -> None:
    config = fuzz_config(auth={"openapi": {"clientKey": {"bearer": CLIENT_KEY}}})
    schema = schemathesis.openapi.from_dict(document(v1_api), config=config)
    fuzz(schema, path, method, v1_api, CLIENT_KEY, recorded=fuzz_summary)


@pytest.mark.parametrize(("path", "method"), [("/register", "POST"), ("/heartbeat", "POST")])
def test_fuzz_agent_routes(
    agent_api: str, fuzz_summary: dict[str, dict[str, Any]], path: str, method: str
) -> None:
    schema = schemathesis.openapi.from_dict(document(agent_api), config=fuzz_config())
    schema.auth(refresh_interval=None)(AgentToken)
    token = derive_agent_token(AGENT_SECRET, "fuzz-agent")
    fuzz(schema, path, method, agent_api, token, recorded=fuzz_summary)


def test_document_covers_every_route(v1_api: str) -> None:
    doc = httpx.get(f"{v1_api}/openapi.json", timeout=5).json()
    operations = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    assert operations == {*V1_OPERATIONS, ("/register", "POST"), ("/heartbeat", "POST")}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "default" in op["responses"] or path in ("/health",), path
            assert "422" not in op["responses"]


# --- unicode round trips through the whole stack -----------------------------------------------

ROUND_TRIPS = 1_000
BATCH = 100
ECHO_MODEL = "local_echo"


@pytest.fixture(scope="module")
def echo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """API, dispatcher, an agent and a fake vLLM that answers with the prompt it was sent."""
    require_services()
    env = {**FUZZ_ENV, "AGENT_TOKENS": f"echo={ECHO_TOKEN}", "HEARTBEAT_TTL": "30"}
    with running_stack(env) as stack:
        stack.start_dispatcher(tmp_path_factory.mktemp("echo"))
        api = stack.start_api()
        fake = start_fake(stack)
        port = free_port()
        stack.start(
            "agent-echo",
            ["agent"],
            AGENT_NAME="echo",
            AGENT_TOKEN=ECHO_TOKEN,
            ROUTER_URL=api,
            VLLM_URL=f"{fake}/v1",
            AGENT_MODELS="echo",
            AGENT_CONCURRENCY="64",
            AGENT_PORT=str(port),
            AGENT_HOST="127.0.0.1",
            HEARTBEAT_INTERVAL="1",
        )
        wait_http(f"http://127.0.0.1:{port}/ready")
        wait_for(lambda: ECHO_MODEL in models(api), timeout=10, message="echo model not listed")
        yield api


def start_fake(stack: Stack) -> str:
    port = free_port()
    service = stack.start(
        "fake-vllm", ["fake-vllm", "--port", str(port), "--models", "echo", "--echo"]
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", service=service)
    return url


def models(api: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{api}/v1/models", timeout=5).json()["data"]]


def round_trip(http: httpx.Client, content: str | list[dict[str, str]], stream: bool) -> str:
    body = orjson.dumps(
        {"model": ECHO_MODEL, "messages": [{"role": "user", "content": content}], "stream": stream}
    )
    headers = {"content-type": "application/json"}
    if not stream:
        response = http.post("/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])
    with http.stream("POST", "/v1/chat/completions", content=body, headers=headers) as response:
        assert response.status_code == 200, response.read()
        raw = response.read()
    events = [e[len(b"data: ") :] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", raw[-200:]
    deltas = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    return "".join(d for d in deltas if d)


def test_unicode_contents_come_back_identical(echo_stack: str) -> None:
    sent = 0
    limits = httpx.Limits(max_connections=BATCH)
    with (
        httpx.Client(base_url=echo_stack, timeout=30, limits=limits) as http,
        ThreadPoolExecutor(max_workers=32) as pool,
    ):

        @given(contents=st.lists(st.text(), min_size=BATCH, max_size=BATCH))
        @settings(
            max_examples=ROUND_TRIPS // BATCH,
            deadline=None,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        def check(contents: list[str]) -> None:
            nonlocal sent
            streams = [i % 10 == 0 for i in range(len(contents))]  # one in ten streams
            answers = list(
                pool.map(lambda a: round_trip(http, *a), zip(contents, streams, strict=True))
            )
            for content, answer in zip(contents, answers, strict=True):
                assert answer.encode() == content.encode()
            sent += len(contents)

        started = time.monotonic()
        check()
    print(f"\nround trips: {sent} in {time.monotonic() - started:.1f}s")
    assert sent >= ROUND_TRIPS


PARTS_EXAMPLES = 10_000
PARTS_PER_REQUEST = 100


def test_ten_thousand_unicode_contents_round_trip_as_content_parts(echo_stack: str) -> None:
    """10,000 more examples through the whole stack, 100 per request as OpenAI content parts
    (`[{"type": "text", "text": ...}]`): each travels as its own JSON string to the fake vLLM,
    which answers with their concatenation; it must come back byte-identical."""
    sent = 0
    with (
        httpx.Client(base_url=echo_stack, timeout=30) as http,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):

        @given(
            batches=st.lists(
                st.lists(st.text(), min_size=PARTS_PER_REQUEST, max_size=PARTS_PER_REQUEST),
                min_size=10,
                max_size=10,
            )
        )
        @settings(
            max_examples=PARTS_EXAMPLES // (10 * PARTS_PER_REQUEST),
            deadline=None,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        def check(batches: list[list[str]]) -> None:
            nonlocal sent
            requests = [
                ([{"type": "text", "text": text} for text in texts], i % 2 == 0)
                for i, texts in enumerate(batches)
            ]
            answers = list(pool.map(lambda a: round_trip(http, *a), requests))
            for texts, answer in zip(batches, answers, strict=True):
                assert answer.encode() == "".join(texts).encode()
            sent += sum(len(texts) for texts in batches)

        started = time.monotonic()
        check()
    print(f"\ncontent parts round trips: {sent} in {time.monotonic() - started:.1f}s")
    assert sent >= PARTS_EXAMPLES
