"""The hot route served in front of FastAPI (services/api/fastpath.py) behaves as the FastAPI
route did: OpenAI error bodies, the body limit, 405 for other methods, 500 naming only a
request id, and the route still in the OpenAPI document. (Auth: test_security_auth.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.api.app import create_app
from services.api.settings import ApiSettings

NO_BROKER = "amqp://u:p@127.0.0.1:1/"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER, max_body_bytes=1024))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client


async def test_other_methods_still_get_405(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/chat/completions")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_a_validation_error_names_its_param_and_request(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json={"model": "dummy", "messages": []})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("messages", "empty_array")
    assert response.headers["x-request-id"]


async def test_a_body_over_the_limit_is_413(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", content=b"x" * 2048)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_a_bug_before_the_endpoint_answers_500_with_only_a_request_id() -> None:
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER))

    def broken(_: str | None) -> None:
        raise RuntimeError("internal detail")

    app.state.client_keys.authenticate = broken
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.post("/v1/chat/completions", json={})
    assert response.status_code == 500
    assert "internal detail" not in response.text
    assert response.headers["x-request-id"] in response.json()["error"]["message"]


async def test_the_route_is_still_in_the_openapi_document(http: httpx.AsyncClient) -> None:
    document = (await http.get("/openapi.json")).json()
    operation = document["paths"]["/v1/chat/completions"]["post"]
    assert "requestBody" in operation and "400" in operation["responses"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health"),
        ("GET", "/v1/chat/completions"),  # 405
        ("GET", "/no/such/route"),  # 404
        ("GET", "/openapi.json"),
    ],
)
async def test_every_answer_names_a_request_id(
    http: httpx.AsyncClient, method: str, path: str
) -> None:
    first = await http.request(method, path)
    second = await http.request(method, path)
    assert len(first.headers.get_list("x-request-id")) == 1
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_a_refused_key_names_a_request_id() -> None:
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER, client_keys="alice:sk-alice-0123456789"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        chat = await client.post("/v1/chat/completions", json={"model": "dummy"})
        models = await client.get("/v1/models")
    assert chat.status_code == models.status_code == 401
    assert chat.headers["x-request-id"] and models.headers["x-request-id"]


# --- CORS (CORS_ALLOW_ORIGINS) -------------------------------------------------------------------

PAGE = "https://chat.example"


async def cors_client(origins: str) -> httpx.AsyncClient:
    app = create_app(ApiSettings(rabbitmq_url=NO_BROKER, cors_allow_origins=origins))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://api")


async def test_without_allowed_origins_answers_carry_no_cors_headers(
    http: httpx.AsyncClient,
) -> None:
    response = await http.get("/v1/models", headers={"origin": PAGE})
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("origins", ["", "https://other.example"])
@pytest.mark.parametrize(
    "request_kwargs",
    [
        # What a page may send without a preflight: a "simple" request.
        {
            "content": b'{"model": "dummy", "messages": []}',
            "headers": {"content-type": "text/plain"},
        },
        {"json": {"model": "dummy", "messages": []}},
    ],
)
async def test_a_page_of_an_origin_not_allowed_cannot_make_the_router_run_a_job(
    origins: str, request_kwargs: dict[str, Any]
) -> None:
    # Without client keys, a page of any site a user opened could make an open router run
    # jobs: CORS only keeps the page from reading the answer (review 2026-11-29).
    async with await cors_client(origins) as http:
        kwargs = dict(request_kwargs)
        headers = {
            "origin": "https://evil.example",
            "sec-fetch-site": "cross-site",
            **kwargs.pop("headers", {}),
        }
        response = await http.post("/v1/chat/completions", headers=headers, **kwargs)
        assert response.status_code == 403
        error = response.json()["error"]
        assert error["code"] == "origin_not_allowed" and "CORS_ALLOW_ORIGINS" in error["message"]
        assert response.headers["x-request-id"]
        assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(
    ("origin", "host", "fetch_site"),
    [
        (None, "api", None),  # an SDK, curl or an agent: no origin
        ("http://api", "api", None),  # a page of the router's own host (its /docs)
        ("https://router.example:8443", "router.example:8443", None),  # the same behind TLS
        ("https://Router.example", "router.example:443", None),  # a default port written out
        ("https://router.example", "router.example", None),  # or left out
        ("http://[::1]:8000", "[::1]:8000", None),
        # A proxy that rewrote Host (nginx's default): the browser's own word counts.
        ("https://router.example", "127.0.0.1:8000", "same-origin"),
    ],
)
async def test_calls_that_are_not_cross_site_reach_the_route(
    origin: str | None, host: str, fetch_site: str | None
) -> None:
    async with await cors_client("") as http:
        headers = {"host": host, **({"origin": origin} if origin else {})}
        if fetch_site:
            headers["sec-fetch-site"] = fetch_site
        response = await http.post(
            "/v1/chat/completions", json={"model": "dummy", "messages": []}, headers=headers
        )
    assert response.status_code == 400  # the route's own answer
    assert response.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("origins", [PAGE, f"https://other.example, {PAGE}", "*"])
async def test_an_allowed_page_may_call_the_hot_route_and_read_its_answer(origins: str) -> None:
    async with await cors_client(origins) as http:
        preflight = await http.options(
            "/v1/chat/completions",
            headers={
                "origin": PAGE,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type, x-stainless-os",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] in (PAGE, "*")
        assert "POST" in preflight.headers["access-control-allow-methods"]
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "x-stainless-os" in allowed

        answer = await http.post(
            "/v1/chat/completions",
            json={"model": "dummy", "messages": []},
            headers={"origin": PAGE},
        )
        assert answer.status_code == 400  # the route's own answer, with CORS headers on it
        assert answer.headers["access-control-allow-origin"] in (PAGE, "*")
        exposed = {
            name.strip() for name in answer.headers["access-control-expose-headers"].split(",")
        }
        assert {"x-request-id", "retry-after-ms", "x-upstream-request-id"} <= exposed
        listing = await http.get("/v1/models", headers={"origin": PAGE})
        assert listing.headers["access-control-allow-origin"] in (PAGE, "*")


async def test_a_page_of_another_origin_is_refused_its_preflight() -> None:
    async with await cors_client(PAGE) as http:
        preflight = await http.options(
            "/v1/chat/completions",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert preflight.status_code == 400
        assert "access-control-allow-origin" not in preflight.headers
