"""What the router makes of an upstream's answer: plain functions over status, body, headers.

- `relay_headers`: the response headers a client may use (rate limits, retry hints).
- `check_response`: a 2xx becomes a `ProviderResponse`; a retryable status a
  `RetryableFailure`; anything else the error the client gets (`upstream_error`).
- `transport_failure`: a connection error or timeout as a `RetryableFailure`.
- `stream_error`, `broken_stream`: how a stream that has begun fails.
- `rewrite_model`: the body as the router read it, `model` set to the upstream's name.

No message built here quotes the upstream's key, URL or an exception's text: `scrub` removes
the key from any upstream body before it is relayed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from services.dispatcher.providers.base import ProviderResponse
from services.dispatcher.providers.retry import (
    RetryableFailure,
    parse_retry_after,
    should_retry,
)
from shared.errors import (
    GatewayTimeoutError,
    RouterError,
    UpstreamError,
    UpstreamHTTPError,
    error_body,
)
from shared.http_headers import SHOULD_RETRY as H_SHOULD_RETRY
from shared.http_headers import UPSTREAM_REQUEST_ID as H_UPSTREAM_REQUEST_ID
from shared.http_headers import upstream_hints
from shared.request_bodies import dump_request, load_request

# Client errors that the same request will meet again: the SDKs must not retry them.
_FINAL_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 415, 422})
REDACTED = b"[redacted]"


def relay_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Rate-limit and retry headers, lower-cased; the upstream's request id renamed.

    The upstream's `x-request-id` travels as `x-upstream-request-id`: `x-request-id` is the
    router's own.
    """
    selected = upstream_hints(headers)
    for name, value in headers.items():
        if name.lower() == "x-request-id":
            selected[H_UPSTREAM_REQUEST_ID] = value
    return selected


def scrub(body: bytes, secret: str) -> bytes:
    """`body` with every occurrence of `secret` replaced (an upstream may echo a key)."""
    if not secret:
        return body
    return body.replace(secret.encode(), REDACTED)


def openai_error_body(body: bytes, *, default_type: str) -> bytes | None:
    """`body` rebuilt as a whole OpenAI error object if it is one (an `error` object with a
    string `message`), else None.

    The upstream's `type`, `param` and `code` are kept where they have the right JSON type
    (`code` may be a number, as some compatible servers send it); the others get defaults
    (`default_type`, null), so a client always sees all four fields. Compact because an
    error may end up in a single SSE `data:` line.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    type_ = error.get("type")
    param = error.get("param")
    code = error.get("code")
    return error_body(
        error["message"],
        type_ if isinstance(type_, str) else default_type,
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str | int) and not isinstance(code, bool) else None,
    )


def error_message(body: bytes) -> str:
    """The `error.message` of an OpenAI error body ("" if there is none)."""
    data: Any = orjson.loads(body)
    return str(data["error"]["message"])


def upstream_error(
    status: int, body: bytes, headers: Mapping[str, str], *, provider: str, secret: str = ""
) -> RouterError:
    """The error a client gets for an upstream's non-2xx answer that is not retried (again).

    - 401: the router's own credential is wrong; the client sees a 502 naming no key.
    - other 4xx: relayed with status, OpenAI error (every field there) and rate-limit
      headers; `x-should-retry: false` where the same request cannot succeed.
    - 504 and 408: 504; anything else (other 5xx, a 3xx: no redirect is followed): 502.
      Both keep the relayed headers: `retry-after` and `retry-after-ms`, so a client waits
      as long as the upstream asked, the rate limits, and the upstream's request id, which
      its support asks for about a failure.
    """
    relayed = relay_headers(headers)
    if status == 401:
        return UpstreamError(
            f"The provider `{provider}` rejected the router's credentials.",
            code="upstream_auth_failed",
            headers={**relayed, H_SHOULD_RETRY: "false"},
        )
    if status in (408, 504):
        return GatewayTimeoutError(
            f"The provider `{provider}` did not answer in time.", headers=relayed
        )
    if status >= 500 or status < 400:
        return UpstreamError(f"The provider `{provider}` failed (HTTP {status}).", headers=relayed)
    if status in _FINAL_STATUSES:
        relayed.setdefault(H_SHOULD_RETRY, "false")
    type_ = "rate_limit_error" if status == 429 else "invalid_request_error"
    clean = openai_error_body(scrub(body, secret), default_type=type_)
    if clean is None:
        message = f"The provider `{provider}` refused the request (HTTP {status})."
        clean = error_body(message, type_, code=str(status))
    return UpstreamHTTPError(status, clean, message=error_message(clean), headers=relayed)


def raise_for_status(
    status: int, body: bytes, headers: Mapping[str, str], *, provider: str, secret: str = ""
) -> None:
    """Nothing for a 2xx; else raises.

    RetryableFailure for 5xx and 408: the upstream's retry-after sets the wait before the
    next try, and its `error` (the `upstream_error`, which relays that retry-after) is what
    the client gets once retries are spent. The `upstream_error` for other statuses.
    """
    if 200 <= status < 300:
        return
    error = upstream_error(status, body, headers, provider=provider, secret=secret)
    lowered = _lowered(headers)
    if should_retry(status, lowered):
        raise RetryableFailure(error, retry_after=parse_retry_after(lowered))
    raise error


def check_response(
    status: int, body: bytes, headers: Mapping[str, str], *, provider: str, secret: str = ""
) -> ProviderResponse:
    """A 2xx answer as a ProviderResponse (relayed as 200); raises as `raise_for_status`.

    A 2xx whose body is not a JSON object is an UpstreamError. One that is an error object,
    not an answer (an `error`, no `choices`: how some OpenAI-compatible servers fail), is that
    error, relayed as a 502 as a stream's error event is: as a 200, the SDKs fail to read it.
    """
    raise_for_status(status, body, headers, provider=provider, secret=secret)
    # Parsed whole, not sniffed: a cut or garbled body relayed as a 200 fails in the client's
    # JSON parser, outside the SDK's error handling and retries.
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    relayed = relay_headers(headers)
    if not isinstance(answer, dict):
        raise UpstreamError(
            f"The provider `{provider}` sent an answer that is not JSON.", headers=relayed
        )
    if answer.get("error") is not None and answer.get("choices") is None:
        fallback = f"The provider `{provider}` answered with an error."
        raise relayed_error(body, fallback, secret=secret, headers=relayed)
    return ProviderResponse(body=body, headers=relayed)


def transport_failure(exc: Exception, *, provider: str) -> RetryableFailure:
    """A connection error or timeout before any output, or an answer that is not valid HTTP,
    as a retryable failure (502 or 504)."""
    if is_timeout(exc):
        error: RouterError = GatewayTimeoutError(
            f"The provider `{provider}` did not answer in time."
        )
    elif not isinstance(exc, httpx.TransportError):
        error = UpstreamError(f"The provider `{provider}` sent an answer that is not valid HTTP.")
    else:
        error = UpstreamError(
            f"Could not reach the provider `{provider}`.", code="upstream_unreachable"
        )
    return RetryableFailure(error)


def stream_error(data: bytes, *, provider: str, secret: str = "") -> RouterError:
    """The error event an upstream ended a stream with (its `data`), as the error the client
    gets in its place (`relayed_error`)."""
    fallback = f"The provider `{provider}` ended the stream with an error."
    return relayed_error(data, fallback, secret=secret)


def relayed_error(
    data: bytes, fallback: str, *, secret: str = "", headers: dict[str, str] | None = None
) -> RouterError:
    """An upstream's error object in place of an answer, as the client's 502: an OpenAI error
    is relayed (scrubbed, with all four fields), anything else is the router's own `fallback`."""
    clean = openai_error_body(scrub(data, secret), default_type="server_error")
    if clean is None:
        return UpstreamError(fallback, headers=headers)
    return UpstreamHTTPError(502, clean, message=error_message(clean), headers=headers)


def broken_stream(exc: Exception, *, provider: str) -> RouterError:
    """A stream that failed after its first event (too late to retry)."""
    if is_timeout(exc):
        return GatewayTimeoutError(f"The provider `{provider}` stopped sending output in time.")
    return UpstreamError(f"The stream from the provider `{provider}` was interrupted.")


def is_timeout(exc: Exception) -> bool:
    """A real timeout: httpx-aiohttp maps some lost connections to `ConnectTimeout` too, so
    only a timeout with a timeout (or nothing) underneath counts."""
    cause = exc.__cause__
    return isinstance(exc, httpx.TimeoutException) and (
        cause is None or isinstance(cause, TimeoutError)
    )


def rewrite_model(body: bytes, model: str, upstream_model: str) -> bytes:
    """The body with `model` set to `upstream_model`, written again even when the name is the
    same: a body with a key twice (`{"model":"gpt-4o","model":"gpt-4o-mini"}`) was checked
    against a client key's models by its last copy, as orjson reads it, and an upstream that
    reads the first would have served another model (review 2026-11-29). Written again, it
    says what the router read (integers past 64 bits included: see `shared.request_bodies`).
    Costs a few microseconds for a chat body, once per provider call.

    Only `model` changes: every other field (tools, n, response_format, stream_options,
    unknown ones) is kept, in order.
    """
    data = load_request(body)
    data["model"] = upstream_model
    return dump_request(data)


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
