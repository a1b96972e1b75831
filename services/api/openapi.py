"""The API's OpenAPI document: every route, the bodies it validates, its answers and errors.

FastAPI builds the skeleton from the routes; this module supplies what the routes cannot say
themselves (they read raw bodies): request schemas, response schemas, the OpenAI error object
for every error status, and the two bearer schemes (client keys on `/v1/*` when configured,
agent tokens on `/register` and `/heartbeat`). The document is what the fuzz tests hold the
API to, so it states the rules the API enforces, no more and no fewer.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from shared.messages import AgentHeartbeat, AgentRegistration

JSON = "application/json"
SCHEMA_REF = "#/components/schemas/{model}"
CLIENT_SCHEME = "clientKey"
AGENT_SCHEME = "agentToken"

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

MODEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}

ERROR_REF = {"$ref": SCHEMA_REF.format(model="Error")}
MODEL_REF = {"$ref": SCHEMA_REF.format(model="Model")}

MODEL_LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL_REF}},
}


# OpenAPI 3.1 reads a text/event-stream `schema` as the schema of each event.
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A chat.completion.chunk, an OpenAI error object, or `[DONE]`.",
        }
    },
}


def status_schema(value: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": value}},
    }


def json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAI error object for each status, and for any other (`default`)."""
    responses: dict[int | str, dict[str, Any]] = {
        status: json_response("OpenAI error", ERROR_REF) for status in statuses
    }
    responses["default"] = json_response("OpenAI error (any other status)", ERROR_REF)
    return responses


def agent_body(model: type[AgentRegistration] | type[AgentHeartbeat]) -> dict[str, Any]:
    return model.model_json_schema(ref_template=SCHEMA_REF)


def bearer_scheme(description: str) -> dict[str, Any]:
    return {"type": "http", "scheme": "bearer", "description": description}


def build_openapi(
    app: FastAPI,
    *,
    bodies: dict[str, dict[str, Any]],
    components: dict[str, Any],
    client_keys_required: bool,
) -> dict[str, Any]:
    """The finished document: request bodies (`bodies`, by path, for routes that read their own
    JSON), component schemas, security, and no FastAPI 422 leftovers.

    Schemas are put in after FastAPI built the rest: its OpenAPI model would turn integer bounds
    into floats, and a fuzzer reading `maximum: 9.2e18` tests a bound the API does not have.
    """
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # the API never answers 422
        schemas.pop(name, None)
    schemas.update(components)
    schemas["Error"] = ERROR_SCHEMA
    schemas["Model"] = MODEL_SCHEMA
    document["components"]["securitySchemes"] = {
        CLIENT_SCHEME: bearer_scheme("A client API key (`CLIENT_KEYS`)."),
        AGENT_SCHEME: bearer_scheme("The agent's token (`AGENT_TOKENS`, `AGENT_TOKEN_SECRET`)."),
    }
    for path, operations in document["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if path in bodies:
                schema = bodies[path]
                operation["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
            if path.startswith("/v1/") and client_keys_required:
                operation["security"] = [{CLIENT_SCHEME: []}]
            elif path in ("/register", "/heartbeat"):
                operation["security"] = [{AGENT_SCHEME: []}]
    return document
