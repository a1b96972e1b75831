"""`create_app(settings)`: the FastAPI application of the API service."""

from __future__ import annotations

import ipaddress
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route

from services.api.agent_auth import AgentCredentials, parse_token_pairs
from services.api.agents import AgentEndpoints
from services.api.bus import ApiBus
from services.api.client_auth import Client, ClientKeys, visible_models
from services.api.completions import CompletionsEndpoint
from services.api.fastpath import (
    ChatRoute,
    RouterApp,
    error_response,
    refusal_response,
    unexpected_response,
)
from services.api.openapi import (
    MODEL_LIST_SCHEMA,
    MODEL_REF,
    SSE_EVENT_SCHEMA,
    agent_body,
    build_openapi,
    error_responses,
    json_response,
    status_schema,
)
from services.api.settings import ApiSettings
from services.api.sse import ClientGoneError
from shared.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    RetrievedModelNotFoundError,
    RouterError,
    UnknownRouteError,
    error_body,
)
from shared.messages import AgentHeartbeat, AgentRegistration
from shared.topology import topology_for

log = logging.getLogger(__name__)

JSON = "application/json"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_client_keys(settings: ApiSettings) -> ClientKeys:
    """The configured client keys (ApiSettings has checked them, and that none is also an
    agent token); warns when there are none."""
    keys = ClientKeys.from_config(
        settings.client_keys.get_secret_value(), settings.client_keys_file
    )
    if keys.is_configured:
        log.info("client keys: %d configured; /v1/* needs one", len(keys))
    else:
        exposure = "" if is_loopback(settings.api_host) else " AND LISTENS BEYOND LOOPBACK"
        log.warning(
            "NO CLIENT KEYS (CLIENT_KEYS, CLIENT_KEYS_FILE): /v1/* IS OPEN to anyone who can "
            "reach %s:%d%s",
            settings.api_host,
            settings.api_port,
            exposure,
        )
    return keys


async def current_client(request: Request) -> Client:
    """The caller behind `/v1/*`: 401 before anything else is read when keys are configured."""
    keys: ClientKeys = request.app.state.client_keys
    return keys.authenticate(request.headers.get("authorization"))


CurrentClient = Annotated[Client, Depends(current_client)]


def create_app(settings: ApiSettings) -> RouterApp:
    bus = ApiBus(settings, topology_for(settings))
    agent_tokens = parse_token_pairs(settings.agent_tokens.get_secret_value())
    credentials = AgentCredentials(agent_tokens, settings.agent_token_secret.get_secret_value())
    if not credentials.is_configured:
        log.warning("no AGENT_TOKENS or AGENT_TOKEN_SECRET: agents cannot register")
    client_keys = load_client_keys(settings)
    completions = CompletionsEndpoint(settings, bus)
    agents = AgentEndpoints(bus, credentials)
    request_schema, request_components = completions.parser.json_schema()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await bus.start()
        try:
            yield
        finally:
            await bus.stop()

    # No redirect to the path with(out) its trailing slash: Starlette's would name an absolute
    # `http://` URL behind a TLS proxy, and OpenAI answers such a path 404 too.
    app = RouterApp(title="Router", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.state.bus = bus
    app.state.client_keys = client_keys
    install_error_handlers(app)
    # The hot route skips FastAPI's machinery (services/api/fastpath.py); the FastAPI route
    # below stays for the OpenAPI document and the 405 of other methods.
    app.fast_route = ChatRoute(completions, client_keys)
    origins = [
        origin.strip() for origin in settings.cors_allow_origins.split(",") if origin.strip()
    ]
    if origins:
        app.allow_origins(origins)

    @app.post(
        "/v1/chat/completions",
        summary="Create a chat completion (JSON or SSE stream)",
        responses={
            200: {
                "description": "A chat.completion, or an SSE stream of chat.completion.chunk",
                "content": {
                    JSON: {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": SSE_EVENT_SCHEMA},
                },
            },
            **error_responses(400, 401, 403, 404, 408, 413, 429, 500, 502, 503, 504),
        },
    )
    async def chat_completions(request: Request, client: CurrentClient) -> Response:
        return await completions(request, client.id, client.check_model)

    @app.get(
        "/v1/models",
        summary="List the models the router can serve now",
        responses={
            200: json_response("OpenAI's model list", MODEL_LIST_SCHEMA),
            **error_responses(401, 503),
        },
    )
    async def list_models(client: CurrentClient) -> Response:
        listing = await bus.ask_models(settings.models_timeout)
        return Response(visible_models(listing, client), media_type=JSON)

    @app.get(
        "/v1/models/{model:path}",
        summary="Retrieve one model",
        responses={
            200: json_response("One model", MODEL_REF),
            **error_responses(401, 404, 503),
        },
    )
    async def retrieve_model(model: str, client: CurrentClient) -> Response:
        if not model or not client.allows(model):  # `/v1/models/`: no model is named ""
            raise RetrievedModelNotFoundError(model)
        listing = orjson.loads(await bus.ask_models(settings.models_timeout, model))
        for entry in listing.get("data", []):
            if entry.get("id") == model:
                return Response(orjson.dumps(entry), media_type=JSON)
        raise RetrievedModelNotFoundError(model)

    agent_ok = json_response("Accepted and published", status_schema("ok"))

    @app.post(
        "/register",
        summary="Register an agent",
        responses={200: agent_ok, **error_responses(400, 401, 403, 408, 413, 503)},
    )
    async def register(request: Request) -> Response:
        return await agents.register(request)

    @app.post(
        "/heartbeat",
        summary="Agent heartbeat",
        responses={200: agent_ok, **error_responses(400, 401, 403, 408, 413, 503)},
    )
    async def heartbeat(request: Request) -> Response:
        return await agents.heartbeat(request)

    @app.get(
        "/health",
        summary="The process is up",
        responses={200: json_response("Up", status_schema("ok"))},
    )
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get(
        "/ready",
        summary="Connected to the broker and consuming replies",
        responses={200: json_response("Ready", status_schema("ready")), **error_responses(503)},
    )
    async def ready() -> Response:
        if bus.is_ready:
            return Response(b'{"status":"ready"}', media_type=JSON)
        body = error_body("Not connected to the broker.", "server_error", code="not_ready")
        return Response(body, status_code=503, media_type=JSON)

    # HEAD too, as load balancers and uptime monitors send it (not in the document: the same
    # answers as GET, without a body).
    for path, probe in (("/health", health), ("/ready", ready)):
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(
                app,
                bodies={
                    "/v1/chat/completions": request_schema,
                    "/register": agent_body(AgentRegistration),
                    "/heartbeat": agent_body(AgentHeartbeat),
                },
                components=request_components,
                client_keys_required=client_keys.is_configured,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path. Starlette's 405 names only the first
    route's, and the probes serve HEAD from a route of their own."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if (
            isinstance(route, Route)
            and route.methods
            and route.matches(request.scope)[0] != Match.NONE
        ):
            methods |= route.methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object; nothing else (no traceback) ever does."""

    async def on_router_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RouterError)  # a refused agent token on /heartbeat, say
        return refusal_response(exc, uuid.uuid4().hex, request.method, request.url.path)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        mapped: RouterError
        if exc.status_code == 405:
            headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
            headers["allow"] = ", ".join(allowed_methods(request))
            mapped = MethodNotAllowedError("Method not allowed for this route.", headers=headers)
        elif exc.status_code == 404:
            mapped = UnknownRouteError(request.method, request.url.path, headers=headers)
        else:
            kind = InvalidRequestError if exc.status_code < 500 else RouterError
            mapped = kind(str(exc.detail), headers=headers)
            mapped.status = exc.status_code
        return error_response(mapped)

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        return error_response(InvalidRequestError("Invalid request parameters."))

    async def on_client_gone(request: Request, _: Exception) -> Response:
        # Not a server error: nobody reads this answer, and uvicorn need not hear of it.
        log.info("client left before the answer on %s", request.url.path)
        return Response(status_code=499)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return unexpected_response(exc, request.url.path)

    app.add_exception_handler(RouterError, on_router_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ClientGoneError, on_client_gone)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(Exception, on_unexpected)
