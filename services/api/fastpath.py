"""`POST /v1/chat/completions` served in front of FastAPI's machinery.

Every request of the hot route used to pay for FastAPI's telemetry check, its middleware stack,
route matching and dependency solving: about an eighth of the API's CPU, for one route whose
endpoint reads its own body. `RouterApp` answers that one (method, path) itself and hands every
other request, and the lifespan, to FastAPI unchanged. FastAPI keeps the route registered, so
the OpenAPI document still describes it, and other methods on the path still get its 405.

Behaviour is the FastAPI route's: the client key is checked before the body is read, errors
leave as OpenAI error objects (`error_response()`, which the app's exception handlers use
too), and a bug answers 500 naming only a request id. OpenTelemetry instrumentation
configured through FastAPI does not see this route.

Every answer names a request id in `x-request-id`, as OpenAI's do (its SDKs expose it as
`request_id`, and support asks for it): the hot route sets its own; every other route gets one
on its way out (`with_request_id`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.client_auth import ClientKeys
from services.api.completions import CompletionsEndpoint
from shared.errors import PermissionDeniedError, RouterError, to_openai_error
from shared.http_headers import ROUTER_ADDED, UPSTREAM_RELAYED

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
JSON = "application/json"
REQUEST_ID = b"x-request-id"
# What a page may read of an answer besides the CORS-safelisted headers: every header the
# router sets or relays (the SDKs read the retry hints, support asks for the request ids), with
# OpenAI's rate-limit names for the relayed `x-ratelimit-*` (CORS lists names, not prefixes).
EXPOSED_HEADERS = sorted(
    {"x-request-id", *UPSTREAM_RELAYED, *ROUTER_ADDED}
    | {
        f"x-ratelimit-{field}-{unit}"
        for field in ("limit", "remaining", "reset")
        for unit in ("requests", "tokens")
    }
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_cross_site_call(scope: Scope, allowed_origins: frozenset[str]) -> bool:
    """A browser's call from a page of an origin not allowed: refused before it runs.

    Without client keys, any web page could otherwise make the router run jobs: a `POST` sent
    as a "simple" request (`text/plain`, no `Authorization`) needs no preflight, and CORS only
    keeps the page from reading the answer. Browsers name the page's origin on every `POST`;
    SDKs, curl and agents send none. A page of the router's own origin is not cross-site: the
    browser says so (`Sec-Fetch-Site: same-origin`, which no page can set), or its origin
    names the `Host` the request came to (a proxy may rewrite that one, hence the first).
    """
    if scope["method"] in SAFE_METHODS or "*" in allowed_origins:
        return False
    origin = host = fetch_site = None
    for name, value in scope["headers"]:
        if name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"host":
            host = value.decode("latin-1")
        elif name == b"sec-fetch-site":
            fetch_site = value
    if origin is None or origin in allowed_origins or fetch_site == b"same-origin":
        return False
    return host is None or not _same_authority(origin, host)


def _same_authority(origin: str, host: str) -> bool:
    """Does the origin name the `Host` header's host and port? Case aside, and a port left
    out is the scheme's default (`https://a.example` is `a.example:443`; a `Host` without a
    port was reached on a default one, through whichever scheme)."""
    scheme, _, origin_authority = origin.lower().partition("://")
    origin_host, origin_port = _split_authority(origin_authority)
    host_host, host_port = _split_authority(host.lower())
    origin_port = origin_port or {"https": "443", "http": "80"}.get(scheme, "")
    if not host_port:
        return host_host == origin_host and origin_port in ("80", "443")
    return (host_host, host_port) == (origin_host, origin_port)


def _split_authority(authority: str) -> tuple[str, str]:
    if authority.startswith("[") and "]" in authority:  # IPv6: its own colons are no port
        address, _, rest = authority[1:].partition("]")
        return f"[{address}]", rest.removeprefix(":")
    host, _, port = authority.partition(":")
    return host, port


def error_response(exc: BaseException, request_id: str = "") -> Response:
    """An OpenAI error object for `exc`, as every handler of the app answers it."""
    status, body, headers = to_openai_error(exc, request_id=request_id)
    if request_id:
        headers["x-request-id"] = request_id
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def refusal_response(exc: RouterError, request_id: str, method: str, path: str) -> Response:
    """`error_response`, logged at INFO under the id the answer carries: the `x-request-id` a
    client quotes must lead somewhere. Successes write no line (the dispatcher names each job)."""
    log.info(
        "%s %s: request %s answered %d %s: %s",
        method,
        path,
        request_id,
        exc.status,
        exc.code,
        exc.message,
    )
    return error_response(exc, request_id)


def with_request_id(send: Send) -> Send:
    """`send`, adding a fresh `x-request-id` to a response that has none."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            if not any(name.lower() == REQUEST_ID for name, _ in headers):
                headers.append((REQUEST_ID, uuid.uuid4().hex.encode()))
                message = {**message, "headers": headers}
        await send(message)

    return sending


def unexpected_response(exc: BaseException, path: str) -> Response:
    """A bug: the client learns a request id and nothing else; the log has the traceback."""
    request_id = uuid.uuid4().hex
    log.error(
        "unhandled %s on %s (request id %s)", type(exc).__name__, path, request_id, exc_info=exc
    )
    return error_response(exc, request_id)


class ChatRoute:
    """The hot route as a plain ASGI callable: authenticate, complete, answer."""

    def __init__(self, completions: CompletionsEndpoint, client_keys: ClientKeys) -> None:
        self.completions = completions
        self.client_keys = client_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            client = self.client_keys.authenticate(request.headers.get("authorization"))
            response = await self.completions(request, client.id, client.check_model)
        except RouterError as e:
            # The endpoint names its requests; an error before it (a bad key) gets an id here.
            request_id = e.headers.get("x-request-id") or uuid.uuid4().hex
            response = refusal_response(e, request_id, "POST", CHAT_PATH)
        except Exception as e:
            response = unexpected_response(e, CHAT_PATH)
        await response(scope, receive, send)


class RouterApp(FastAPI):
    """FastAPI, except that `POST /v1/chat/completions` goes straight to `fast_route`.

    With `allow_origins()`, every HTTP request passes through Starlette's CORS middleware
    first, the hot route's included (FastAPI's own middleware stack never sees that one)."""

    fast_route: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None
    _cors: ASGIApp | None = None
    _origins: frozenset[str] = frozenset()

    def allow_origins(self, origins: list[str]) -> None:
        """Answer browsers' preflights and let pages of `origins` (`*`: any) call the API and
        read answers. Keys travel in the `Authorization` header, never in cookies: no
        credentials mode."""
        self._origins = frozenset(origins)
        self._cors = CORSMiddleware(
            self._route,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._route(scope, receive, send)
        elif is_cross_site_call(scope, self._origins):
            error = PermissionDeniedError(
                "Calls from web pages of another origin are refused; list the page's origin "
                "in CORS_ALLOW_ORIGINS to allow them.",
                code="origin_not_allowed",
            )
            method, path = scope["method"], scope["path"]
            await refusal_response(error, uuid.uuid4().hex, method, path)(scope, receive, send)
        elif self._cors is not None:
            await self._cors(scope, receive, send)
        else:
            await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.fast_route is not None
            and scope["type"] == "http"
            and scope["path"] == CHAT_PATH
            and scope["method"] == "POST"
        ):
            scope["app"] = self
            await self.fast_route(scope, receive, send)
            return
        if scope["type"] == "http":
            send = with_request_id(send)
        await super().__call__(scope, receive, send)
