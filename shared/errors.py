"""The router's error tree and its one mapping to OpenAI's error object.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` with the status
OpenAI would use, built by `to_openai_error()`. Anything that is not a `RouterError` becomes a
bare 500 that names only the request id: no traceback, path or upstream text leaves the router.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any

import orjson

from shared.http_headers import SHOULD_RETRY


class RouterError(Exception):
    """Base of every error the router answers a client with."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidRequestError(RouterError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(RouterError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(RouterError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFoundError(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    """A chat request's model, as OpenAI's chat endpoint words it (`param` null)."""

    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")


class RetrievedModelNotFoundError(NotFoundError):
    """`GET /v1/models/{id}` of a model the caller cannot see, as OpenAI's retrieve words it:
    another message than the chat endpoint's, and `param` "model"."""

    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist", param="model")


class UnknownRouteError(RouterError):
    """A method and path no route serves, as OpenAI words it (`code` null)."""

    status = 404
    type = "invalid_request_error"

    def __init__(self, method: str, path: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"Invalid URL ({method} {path})", headers=headers)


class MethodNotAllowedError(RouterError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeoutError(RouterError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLargeError(RouterError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(RouterError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(RouterError):
    """A backend failed in a way retries did not fix."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class AnswerTooLargeError(UpstreamError):
    """An answer (or one stream event) larger than a reply message may carry: the broker
    would refuse the message by closing the publishing channel, under every other reply on it.

    It says `x-should-retry: false`: the same request would most likely be as large again, and
    each of the OpenAI SDKs' two retries would pay for another whole generation upstream.
    """

    code = "answer_too_large"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={**(headers or {}), SHOULD_RETRY: "false"})

    @classmethod
    def past(
        cls, size: int, limit: int, *, headers: dict[str, str] | None = None
    ) -> AnswerTooLargeError:
        """An answer of `size` bytes (at least) against a limit of `limit`."""
        return cls(
            f"The answer is larger than the router carries ({size} bytes or more; "
            f"MAX_REPLY_BYTES is {limit}).",
            headers=headers,
        )


async def read_within(
    parts: AsyncIterable[bytes],
    limit: int,
    *,
    length: int | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A body arriving in `parts`, whole, or AnswerTooLargeError (carrying `headers`) once it
    passes `limit` bytes: refused by its announced `length` before a byte is read, else while
    it arrives, so a huge answer never sits in memory whole."""
    if length is not None and length > limit:
        raise AnswerTooLargeError.past(length, limit, headers=headers)
    read: list[bytes] = []
    size = 0
    async for part in parts:
        size += len(part)
        if size > limit:
            raise AnswerTooLargeError.past(size, limit, headers=headers)
        read.append(part)
    return b"".join(read)


class UpstreamHTTPError(RouterError):
    """An upstream's own error answer (a 4xx, or a stream's error event as a 502), relayed with
    its status, body and headers.

    `body` is already an OpenAI error object (compact JSON); `to_openai_error` sends it as is.
    """

    type = "invalid_request_error"

    def __init__(
        self, status: int, body: bytes, *, message: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message or f"upstream answered HTTP {status}", headers=headers)
        self.status = status
        self.body = body


class ServiceUnavailableError(RouterError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class GatewayTimeoutError(RouterError):
    status = 504
    type = "timeout_error"
    code = "timeout"


class DeadlineError(GatewayTimeoutError):
    """The router's own deadline for the request passed (`REQUEST_TIMEOUT`, `TTFT_TIMEOUT`).

    It says `x-should-retry: false`: the OpenAI SDKs retry a 504 twice by default, and the same
    request would most likely run into the same deadline, for three times the wait and three
    upstream calls.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={SHOULD_RETRY: "false"})


class InternalError(RouterError):
    """A bug, answered as a bare 500 that names the request id and nothing else."""

    def __init__(self, request_id: str) -> None:
        super().__init__(internal_error_message(request_id), headers={"x-request-id": request_id})


def internal_error_message(request_id: str = "") -> str:
    suffix = f" (request id {request_id})" if request_id else ""
    return f"The server had an error processing your request{suffix}."


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | int | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def to_openai_error(
    exc: BaseException, *, request_id: str = ""
) -> tuple[int, bytes, dict[str, Any]]:
    """Map any exception to (status, OpenAI error body, extra response headers)."""
    if isinstance(exc, UpstreamHTTPError):
        return exc.status, exc.body, dict(exc.headers)
    if isinstance(exc, RouterError):
        body = error_body(exc.message, exc.type, param=exc.param, code=exc.code)
        return exc.status, body, dict(exc.headers)
    body = error_body(internal_error_message(request_id), "server_error")
    return 500, body, {}


class QueueFullError(ServiceUnavailableError):
    """The broker refused a job because its queue is at its bound (reject-publish)."""

    code = "queue_full"

    def __init__(self, message: str = "The router is at capacity; retry shortly.") -> None:
        super().__init__(message, headers={"retry-after": "1"})


class BrokerUnavailableError(ServiceUnavailableError):
    """The broker did not confirm a publish in time, or is unreachable."""

    code = "broker_unavailable"

    def __init__(self, message: str = "The message broker is unavailable; retry shortly.") -> None:
        super().__init__(message, headers={"retry-after": "1"})


class UnroutableError(RouterError):
    """A mandatory publish found no queue (an internal condition callers map to a reply)."""


class ReplyQueueGoneError(UnroutableError):
    """The job's reply queue is gone: its API process died, nobody waits for the answer.

    Raised by reply publishing so the work stops (an agent aborts its upstream call); the
    consumer then acks the job instead of requeueing it for another agent to redo for nobody.
    """


class BrokerEntityMissingError(RouterError):
    """A passive declare found no such queue or exchange: under least privilege
    (`DECLARE_TOPOLOGY=false`) `router topology` has not declared it yet."""
