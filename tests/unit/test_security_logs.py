"""Secrets never reach a log line, and internal errors tell the client nothing but an id."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
from collections.abc import Iterator

import httpx
import pytest

from services.agent.settings import AgentSettings
from services.api.app import create_app
from services.api.settings import ApiSettings
from services.dispatcher.settings import DispatcherSettings
from shared.amqp import Broker
from shared.errors import BrokerUnavailableError, to_openai_error
from shared.logs import REDACTED, SecretRedactor, configure_logging, one_line, secret_values
from tests.support.procs import free_port

SECRET = "canary-Zq81xT0pLm"


def redact(text: str, *secrets: str) -> str:
    return SecretRedactor(secrets).redact(text)


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        (f"key is {SECRET}!", SECRET),
        (f"amqp://router:{SECRET}@rabbit:5672/", SECRET),
        ("redis://:hunter2hunter2@cache:6379/0", "hunter2hunter2"),
        ("https://user:pa55word@example.com/x", "pa55word"),
        ("authorization: Bearer tok-abcdef123", "tok-abcdef123"),
        ("headers={'Authorization': 'bearer xyz987654'}", "xyz987654"),
        ("using sk-proj-AbCdEf0123456789 now", "AbCdEf0123456789"),
    ],
)
def test_redactor(text: str, gone: str) -> None:
    out = redact(text, SECRET)
    assert gone not in out
    assert REDACTED in out


def test_longest_secret_first_so_no_part_survives() -> None:
    assert redact("abcdefgh-tail", "abcd", "abcdefgh-tail") == REDACTED


def test_short_values_are_not_treated_as_secrets() -> None:
    assert redact("a b c", "a", "") == "a b c"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("DEBUG", "test", secrets=[SECRET])
    for handler in root.handlers:
        handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_configured_handlers_redact_messages_args_and_tracebacks(captured: io.StringIO) -> None:
    log = logging.getLogger("some.library")
    log.debug("connecting to %s", f"amqp://u:{SECRET}@h/")
    log.info("token " + SECRET)
    try:
        raise RuntimeError(f"failed with {SECRET}")
    except RuntimeError:
        log.exception("boom %s", "x")
    logging.getLogger("uvicorn.error").warning("Bearer %s", SECRET)
    output = captured.getvalue()
    assert SECRET not in output
    assert output.count(REDACTED) >= 4
    assert "RuntimeError" in output  # the traceback is kept, only the secret is gone


FORGED = "\n2026-11-29 07:50:00,000 ERROR dispatcher services.dispatcher.cache: FORGED LINE"


def test_a_client_string_cannot_write_a_log_line_of_its_own(captured: io.StringIO) -> None:
    model = f"gpt-4o-mini{FORGED}\r\x00\x1b[31m{SECRET}"
    logging.getLogger("services.dispatcher.handler").info("job %s model=%s", "abc", model)
    output = captured.getvalue()
    assert output.count("\n") == 1, output  # one record, one line
    assert "model=gpt-4o-mini\\n2026-11-29 07:50:00,000 ERROR" in output
    assert "FORGED LINE\\r\\x00\\x1b[31m***" in output  # escaped, and still redacted
    assert SECRET not in output


def test_control_characters_are_escaped_and_text_is_kept() -> None:
    assert one_line("a\tb\x7fc\x85d\u2028e") == "a\\tb\\x7fc\\x85d\\u2028e"
    text = "résumé 中文 ✓ C:\\path [x]"
    assert one_line(text) is text


def test_a_traceback_keeps_its_lines(captured: io.StringIO) -> None:
    try:
        raise RuntimeError(f"failed with {SECRET}")
    except RuntimeError:
        logging.getLogger("some.library").exception("boom\n%s", "forged")
    lines = captured.getvalue().splitlines()
    assert lines[0].endswith("boom\\nforged")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == f"RuntimeError: failed with {REDACTED}"


def test_broker_client_loggers_stay_at_warning(captured: io.StringIO) -> None:
    for name in ("aio_pika", "aiormq"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING


async def refused_connection_error() -> str:
    port = free_port()  # nothing listens on it: the connection is refused
    broker = Broker(f"amqp://guest:guest@127.0.0.1:{port}/", name="test", publish_timeout=1)
    try:
        await broker.connect(timeout=2)
    except BrokerUnavailableError as e:
        return str(e)
    raise AssertionError("connected to a port nothing listens on")


async def test_a_refused_broker_connection_is_one_line_not_an_extra_error(
    captured: io.StringIO,
) -> None:
    assert "cannot connect to the broker at 127.0.0.1:" in await refused_connection_error()
    # aio-pika's failed connection closes itself when it is collected, in a task on the running
    # loop: let its callbacks finish and collect it while this test's loop runs, not in a later
    # test that has none (a close never awaited fails that test).
    await asyncio.sleep(0.01)
    gc.collect()
    await asyncio.sleep(0.01)
    output = captured.getvalue()
    assert "error when creating transport" not in output  # the caller reports it, once
    assert " ERROR " not in output
    logging.getLogger("aiormq.connection").warning("other news")
    assert "other news" in captured.getvalue()  # only that one repeated line is dropped


def test_secret_values_of_every_service() -> None:
    api = ApiSettings(
        rabbitmq_url="amqp://router:rabbitpw1@h:5672/",
        agent_token_secret="agentsecret1",
        client_keys="a:clientkey1",
    )
    assert {"rabbitpw1", "agentsecret1", "a:clientkey1"} <= set(secret_values(api))
    dispatcher = DispatcherSettings(
        rabbitmq_url="amqp://router:rabbitpw2@h:5672/",
        redis_url="redis://:redispw2@h:6379/0",
        openai_api_key="sk-openai-key2",
    )
    assert {"rabbitpw2", "redispw2", "sk-openai-key2"} <= set(secret_values(dispatcher))
    agent = AgentSettings(agent_token="agenttok3", hf_token="hftok3")
    assert {"agenttok3", "hftok3"} <= set(secret_values(agent))


def test_settings_reprs_hide_credentials() -> None:
    settings = ApiSettings(client_keys="a:clientkey1", agent_tokens="x=agenttok1")
    assert "clientkey1" not in repr(settings) and "agenttok1" not in repr(settings)


def test_an_unknown_error_is_a_bare_500_with_the_request_id() -> None:
    status, body, _ = to_openai_error(RuntimeError(f"db at {SECRET}"), request_id="abc123")
    assert status == 500
    assert SECRET not in body.decode()
    assert b"abc123" in body


async def test_a_bug_in_a_route_answers_500_with_only_a_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(ApiSettings())

    async def broken(_: float) -> bytes:
        raise RuntimeError(f"internal detail {SECRET} /srv/secret/path")

    app.state.bus.ask_models = broken
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.get("/v1/models")
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    error = response.json()["error"]
    assert error == {
        "message": f"The server had an error processing your request (request id {request_id}).",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert any(request_id in record.getMessage() for record in caplog.records)


async def test_a_bug_in_completions_keeps_its_request_id() -> None:
    app = create_app(ApiSettings())

    async def broken(_: object) -> None:
        raise KeyError(SECRET)

    app.state.bus.submit = broken
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "dummy", "messages": [{"role": "user", "content": "x"}]},
        )
    assert response.status_code == 500
    assert SECRET not in response.text
    assert response.headers["x-request-id"] in response.json()["error"]["message"]
