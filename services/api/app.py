"""`create_app(settings)`: the FastAPI application of the API service."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from services.api.agent_auth import AgentCredentials, parse_token_pairs
from services.api.agents import AgentEndpoints
from services.api.bus import ApiBus
from services.api.completions import CompletionsEndpoint
from services.api.settings import ApiSettings
from services.api.validation import openapi_request_schema
from shared.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    RouterError,
    error_body,
    to_openai_error,
)
from shared.topology import Topology

log = logging.getLogger(__name__)

JSON = "application/json"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"description": "OpenAI error", "content": {JSON: {"schema": ERROR_SCHEMA}}}
        for status in statuses
    }


def topology_for(settings: ApiSettings) -> Topology:
    return Topology(namespace=settings.broker_namespace, mode=settings.durability)


def create_app(settings: ApiSettings) -> FastAPI:
    bus = ApiBus(settings, topology_for(settings))
    credentials = AgentCredentials(
        parse_token_pairs(settings.agent_tokens), settings.agent_token_secret
    )
    if not credentials.is_configured:
        log.warning("no AGENT_TOKENS or AGENT_TOKEN_SECRET: agents cannot register")
    completions = CompletionsEndpoint(settings, bus)
    agents = AgentEndpoints(bus, credentials)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await bus.start()
        try:
            yield
        finally:
            await bus.stop()

    app = FastAPI(title="Router", version="0.1.0", lifespan=lifespan)
    app.state.bus = bus
    install_error_handlers(app)

    @app.post(
        "/v1/chat/completions",
        summary="Create a chat completion (JSON or SSE stream)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": openapi_request_schema()}},
            }
        },
        responses={
            200: {
                "description": "A chat.completion, or an SSE stream of chat.completion.chunk",
                "content": {JSON: {"schema": {"type": "object"}}, "text/event-stream": {}},
            },
            **error_responses(400, 404, 413, 429, 500, 502, 503, 504),
        },
    )
    async def chat_completions(request: Request) -> Response:
        return await completions(request)

    @app.get(
        "/v1/models",
        summary="List the models the router can serve now",
        responses=error_responses(503),
    )
    async def list_models() -> Response:
        return Response(await bus.ask_models(settings.models_timeout), media_type=JSON)

    @app.get(
        "/v1/models/{model:path}", summary="Retrieve one model", responses=error_responses(404, 503)
    )
    async def retrieve_model(model: str) -> Response:
        listing = orjson.loads(await bus.ask_models(settings.models_timeout))
        for entry in listing.get("data", []):
            if entry.get("id") == model:
                return Response(orjson.dumps(entry), media_type=JSON)
        raise ModelNotFoundError(model)

    @app.post(
        "/register", summary="Register an agent", responses=error_responses(400, 401, 403, 503)
    )
    async def register(request: Request) -> Response:
        return await agents.register(request)

    @app.post(
        "/heartbeat", summary="Agent heartbeat", responses=error_responses(400, 401, 403, 503)
    )
    async def heartbeat(request: Request) -> Response:
        return await agents.heartbeat(request)

    @app.get("/health", summary="The process is up")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get(
        "/ready",
        summary="Connected to the broker and consuming replies",
        responses=error_responses(503),
    )
    async def ready() -> Response:
        if bus.is_ready:
            return Response(b'{"status":"ready"}', media_type=JSON)
        body = error_body("Not connected to the broker.", "server_error", code="not_ready")
        return Response(body, status_code=503, media_type=JSON)

    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object; nothing else (no traceback) ever does."""

    def respond(exc: BaseException) -> Response:
        status, body, headers = to_openai_error(exc)
        return Response(body, status_code=status, media_type=JSON, headers=headers)

    async def on_router_error(_: Request, exc: Exception) -> Response:
        return respond(exc)

    async def on_http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        mapped: RouterError
        if exc.status_code == 405:
            mapped = MethodNotAllowedError("Method not allowed for this route.")
        elif exc.status_code == 404:
            mapped = NotFoundError("Unknown route.")
        else:
            mapped = RouterError(str(exc.detail))
            mapped.status = exc.status_code
        return respond(mapped)

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        return respond(InvalidRequestError("Invalid request parameters."))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return respond(exc)

    app.add_exception_handler(RouterError, on_router_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
