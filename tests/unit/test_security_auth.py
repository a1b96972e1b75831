"""Client API keys: parsing, authentication, model limits, and the routes' use of them.

The route tests run the real app in-process (no broker: every check here answers before a job
would be published).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from services.api.app import create_app
from services.api.client_auth import (
    ANONYMOUS,
    Client,
    ClientKeyConfigError,
    ClientKeys,
    load_entries,
    parse_entry,
    visible_models,
)
from services.api.settings import ApiSettings
from shared.errors import AuthenticationError, PermissionDeniedError, QueueFullError
from shared.messages import Job

ALICE = "sk-alice-0123456789"
BOB = "sk-bob-0123456789"
KEYS = f"alice:{ALICE}, bob:{BOB}:dummy|local_m"
MESSAGES = [{"role": "user", "content": "hi"}]


def keys(text: str = KEYS) -> ClientKeys:
    return ClientKeys.from_config(text)


# --- parsing -----------------------------------------------------------------------------------


def test_entries_parse_with_and_without_models() -> None:
    assert parse_entry("alice:sk-0123456789", "x") == (Client("alice"), "sk-0123456789")
    client, key = parse_entry("bob:sk-0123456789:a|local_b:7b|c", "x")
    assert key == "sk-0123456789"
    assert client == Client("bob", frozenset({"a", "local_b:7b", "c"}))


@pytest.mark.parametrize(
    "text",
    [
        "alice",  # no key
        "alice:",  # empty key
        ":sk-0123456789",  # no id
        "al ice:sk-0123456789",  # id charset
        "alice:short",  # key under 8 characters
        "alice:sk-0123456789:a||b",  # empty model name
        "alice:sk-0123456789:",  # an empty model list is not "every model"
        "alice:sk-0123456789: ",
        "alice:sk-01234 56789",  # space inside the key
    ],
)
def test_malformed_entries_are_refused_without_echoing_the_key(text: str) -> None:
    with pytest.raises(ClientKeyConfigError) as info:
        keys(text)
    assert "0123456789" not in str(info.value)
    assert "short" not in str(info.value)


def test_the_same_key_twice_is_refused() -> None:
    with pytest.raises(ClientKeyConfigError):
        keys(f"a:{ALICE},b:{ALICE}")


def test_file_entries_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# tenants\n\ncarol:{ALICE}\n  dave:{BOB}:dummy  \n")
    entries = load_entries("", str(path))
    assert [client.id for client, _ in entries] == ["carol", "dave"]
    both = ClientKeys.from_config("erin:sk-erin-0123456789", str(path))
    assert len(both) == 3


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ClientKeyConfigError):
        ClientKeys.from_config("", str(tmp_path / "missing"))


# --- authentication ----------------------------------------------------------------------------


def test_open_router_makes_everyone_anonymous() -> None:
    open_keys = ClientKeys()
    assert not open_keys.is_configured
    for header in (None, "", "Bearer anything", "Basic xyz"):
        client = open_keys.authenticate(header)
        assert client.id == ANONYMOUS and client.allows("any-model")


@pytest.mark.parametrize(
    ("header", "tenant"),
    [(f"Bearer {ALICE}", "alice"), (f"bearer   {BOB} ", "bob"), (f"BEARER {ALICE}", "alice")],
)
def test_a_known_key_names_its_tenant(header: str, tenant: str) -> None:
    assert keys().authenticate(header).id == tenant


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        (None, True),
        ("", True),
        ("Bearer", True),
        ("Bearer   ", True),
        (f"Basic {ALICE}", True),
        (ALICE, True),
        ("Bearer sk-alice-012345678", False),  # one character short
        (f"Bearer {ALICE}x", False),
        (f"Bearer {ALICE.upper()}", False),
    ],
)
def test_anything_else_is_401(header: str | None, missing: bool) -> None:
    with pytest.raises(AuthenticationError) as info:
        keys().authenticate(header)
    error = info.value
    assert (error.status, error.type, error.code) == (
        401,
        "invalid_request_error",
        "invalid_api_key",
    )
    assert ("didn't provide" in error.message) is missing
    assert ALICE not in error.message and "sk-" not in error.message


def test_model_limits() -> None:
    bob = keys().authenticate(f"Bearer {BOB}")
    assert bob.allows("dummy") and bob.allows("local_m") and not bob.allows("gpt-4o")
    bob.check_model("dummy")
    with pytest.raises(PermissionDeniedError) as info:
        bob.check_model("gpt-4o")
    assert (info.value.status, info.value.code, info.value.param) == (
        403,
        "model_not_allowed",
        "model",
    )


def test_agent_tokens_must_not_be_client_keys() -> None:
    assert keys().shares_a_key_with(["tok-a", ALICE])
    assert not keys().shares_a_key_with(["tok-a", "tok-b"])


def test_only_digests_are_kept() -> None:
    held = keys()
    assert ALICE not in repr(vars(held))
    assert all(len(digest) == 32 for digest in held._keys)


def test_model_list_is_cut_to_the_key() -> None:
    listing = orjson.dumps(
        {
            "object": "list",
            "data": [{"id": m, "object": "model"} for m in ("dummy", "local_m", "gpt-4o")],
        }
    )
    assert visible_models(listing, Client("alice")) is listing
    cut = orjson.loads(visible_models(listing, Client("bob", frozenset({"dummy", "local_m"}))))
    assert [m["id"] for m in cut["data"]] == ["dummy", "local_m"]
    assert cut["object"] == "list"


# --- the routes --------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        ApiSettings(
            client_keys=KEYS,
            agent_tokens="agent1=tok-agent1-0123",
            rabbitmq_url="amqp://u:p@127.0.0.1:1/",
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client


def chat(model: str = "dummy") -> dict[str, object]:
    return {"model": model, "messages": MESSAGES}


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/dummy")],
)
@pytest.mark.parametrize(
    "headers", [{}, {"authorization": "Bearer sk-nope-0123456789"}, {"authorization": "tok"}]
)
async def test_v1_routes_need_a_client_key(
    http: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = await http.request(method, path, json=chat(), headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert "sk-nope" not in response.text


async def test_an_agent_token_is_not_a_client_key(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions", json=chat(), headers={"authorization": "Bearer tok-agent1-0123"}
    )
    assert response.status_code == 401


async def test_a_client_key_is_not_an_agent_token(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/register",
        json={"name": "agent1", "models": ["local_m"]},
        headers={"authorization": f"Bearer {ALICE}"},
    )
    assert response.status_code == 403


async def test_a_model_outside_the_key_is_403_before_any_job(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions", json=chat("gpt-4o"), headers={"authorization": f"Bearer {BOB}"}
    )
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_allowed", "model")
    assert response.headers["x-request-id"]


async def test_retrieving_a_model_outside_the_key_is_404(http: httpx.AsyncClient) -> None:
    """Worded as OpenAI's `GET /v1/models/{id}` words a model it does not have (not as its
    chat endpoint does)."""
    response = await http.get("/v1/models/gpt-4o", headers={"authorization": f"Bearer {BOB}"})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model 'gpt-4o' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


async def test_an_allowed_request_gets_past_auth(http: httpx.AsyncClient) -> None:
    # No broker in a unit test: getting as far as publishing proves the key was accepted.
    response = await http.post(
        "/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {ALICE}"}
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "broker_unavailable"


async def test_openapi_declares_the_security_schemes(http: httpx.AsyncClient) -> None:
    document = (await http.get("/openapi.json")).json()
    assert set(document["components"]["securitySchemes"]) == {"clientKey", "agentToken"}
    chat_op = document["paths"]["/v1/chat/completions"]["post"]
    assert chat_op["security"] == [{"clientKey": []}]
    assert document["paths"]["/register"]["post"]["security"] == [{"agentToken": []}]
    assert "security" not in document["paths"]["/health"]["get"]


def test_open_mode_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    create_app(ApiSettings(api_host="0.0.0.0"))
    warning = [r for r in caplog.records if "OPEN" in r.getMessage()]
    assert warning and warning[0].levelname == "WARNING"
    assert "BEYOND LOOPBACK" in warning[0].getMessage()


def test_a_key_shared_with_an_agent_refuses_to_start() -> None:
    with pytest.raises(ValueError):
        create_app(ApiSettings(client_keys=f"alice:{ALICE}", agent_tokens=f"agent1={ALICE}"))


async def test_the_tenant_is_the_key_id_never_the_body() -> None:
    app = create_app(ApiSettings(client_keys=KEYS))
    submitted: list[Job] = []

    async def submit(job: Job) -> None:
        submitted.append(job)
        raise QueueFullError()

    app.state.bus.submit = submit
    body = {**chat(), "tenant": "bob", "user": "bob"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.post(
            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {ALICE}"}
        )
    assert response.status_code == 503
    assert [job.tenant for job in submitted] == ["alice"]
    assert submitted[0].body == orjson.dumps(body)  # the raw bytes, untouched
