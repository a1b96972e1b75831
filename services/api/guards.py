"""Refusing request fields that could redirect the router's outbound traffic.

Some OpenAI-compatible proxies read per-request `api_base`, `api_key`, `extra_headers` and the
like from the body, and would send the request (and the operator's credentials) wherever the
client asked. The router never does: outbound calls go only to configured hosts with configured
keys. A body that carries such a field, at the top level or inside an `extra_body` object (at
any depth of `extra_body`), is refused with a 400 naming the field, rather than silently
stripped: a client that believes it chose an upstream learns at once that it did not, and the
raw body still travels unmodified.

Names match exactly, as the libraries that honour them read them (Python keyword arguments), so
the OpenAPI document can state the rule precisely: each of them is a `false` property.
"""

from __future__ import annotations

from typing import Any

from shared.errors import InvalidRequestError

REDIRECT_FIELDS = frozenset(
    {
        "api_base",
        "base_url",
        "api_key",
        "api_version",
        "api_type",
        "organization",
        "project",
        "extra_headers",
        "extra_query",
        "headers",
        "custom_llm_provider",
        "azure_ad_token",
        "azure_endpoint",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_region_name",
        "vertex_credentials",
        "vertex_project",
        "vertex_location",
        "user_config",
    }
)
EXTRA_BODY = "extra_body"
MAX_EXTRA_BODY_DEPTH = 16


def refuse_redirects(body: dict[str, Any]) -> None:
    """Raise InvalidRequestError (400 `unsupported_parameter`) naming the first redirect field.

    `extra_body`, when present, must be an object (or null); it is checked like the top level.
    """
    prefix = ""
    level: dict[str, Any] | None = body
    for _ in range(MAX_EXTRA_BODY_DEPTH + 1):
        if level is None:
            return
        for name in level:
            if name in REDIRECT_FIELDS:
                param = f"{prefix}{name}"
                raise InvalidRequestError(
                    f"Unsupported parameter: '{param}'. The router sends requests only to the "
                    "upstreams its operator configured, with their credentials.",
                    param=param,
                    code="unsupported_parameter",
                )
        nested = level.get(EXTRA_BODY)
        if nested is not None and not isinstance(nested, dict):
            raise InvalidRequestError(
                f"Invalid type for '{prefix}{EXTRA_BODY}': expected an object.",
                param=f"{prefix}{EXTRA_BODY}",
                code="invalid_type",
            )
        prefix += f"{EXTRA_BODY}."
        level = nested
    raise InvalidRequestError(
        f"'{EXTRA_BODY}' is nested too deeply.", param=EXTRA_BODY, code="invalid_value"
    )


def openapi_properties(extra_body_ref: str) -> dict[str, Any]:
    """JSON-schema properties that describe the refusal: each redirect field is `false`
    (must be absent) and `extra_body` is an object checked the same way."""
    properties: dict[str, Any] = dict.fromkeys(sorted(REDIRECT_FIELDS), False)
    properties[EXTRA_BODY] = {"anyOf": [{"$ref": extra_body_ref}, {"type": "null"}]}
    return properties


def extra_body_schema(extra_body_ref: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Passed through; may not carry fields that redirect traffic.",
        "properties": openapi_properties(extra_body_ref),
        "additionalProperties": True,
    }
