"""The wire format: one model per message kind, and its encode()/decode().

A message is an `Envelope`: AMQP properties (type, ids, reply_to, expiration), a few headers,
and a body. The OpenAI request and response bodies travel as raw JSON bytes, validated once at
the edge and never re-parsed on the way. Every message carries `x-router-v`; additive fields
keep the version, and decoders ignore headers they do not know.

This module knows nothing of aio-pika: `shared.amqp` turns envelopes into AMQP messages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StringConstraints,
    ValidationError,
)

WIRE_VERSION = 1

# Header names, defined once.
H_VERSION = "x-router-v"
H_MODEL = "x-model"
H_STREAM = "x-stream"
H_INCLUDE_USAGE = "x-include-usage"
H_TENANT = "x-tenant"
H_DEADLINE = "x-deadline"
H_CACHE_KEY = "x-cache-key"
H_CACHE_KEYS = "x-cache-keys"  # job.completed: one per event, as are the next three
H_STATUSES = "x-statuses"
H_LENGTHS = "x-lengths"
H_REQUEST_IDS = "x-request-ids"
H_CACHE_CONTROL = "x-cache-control"
H_CACHE_STATUS = "x-cache-status"
H_ATTEMPT = "x-attempt"
H_SEQ = "x-seq"
H_STATUS = "x-status"
H_HTTP_HEADERS = "x-http-headers"
H_DELIVERIES = "x-router-deliveries"  # deliveries counted where the queue type cannot
# When a job entered the agent queue it is in (Unix ms, its publisher's clock): tells a job an
# agent held apart from one nobody took (services/dispatcher/returns.py).
H_QUEUED_AT = "x-queued-at"


class MessageType(StrEnum):
    JOB = "job"
    REPLY_FINAL = "reply.final"
    REPLY_ERROR = "reply.error"
    REPLY_CHUNK = "reply.chunk"
    REPLY_END = "reply.end"
    AGENT_REGISTER = "agent.register"
    AGENT_HEARTBEAT = "agent.heartbeat"
    CANCEL = "cancel"
    RPC_MODELS = "rpc.models"
    RPC_RESULT = "rpc.result"
    JOB_COMPLETED = "job.completed"


class MessageDecodeError(ValueError):
    """A message that cannot be understood; its consumer rejects it into the dead queue."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message as it crosses the broker, independent of the AMQP client library."""

    type: str
    body: bytes = b""
    headers: dict[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    message_id: str | None = None
    expiration_ms: int | None = None
    user_id: str | None = None  # set by the broker-validated sender on receipt


def _check_version(env: Envelope) -> None:
    version = env.headers.get(H_VERSION)
    if version != WIRE_VERSION:
        raise MessageDecodeError(f"unsupported wire version {version!r} on {env.type!r}")


def _header(env: Envelope, name: str, kind: type, default: Any = None) -> Any:
    value = env.headers.get(name, default)
    if value is None or isinstance(value, kind):
        return value
    if kind is str and isinstance(value, bytes):
        return value.decode()
    if kind is float and isinstance(value, int):
        return float(value)
    raise MessageDecodeError(f"header {name} has type {type(value).__name__}")


# --- jobs --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """One chat completion request on its way to a backend.

    `deadline` is a Unix time: nobody spends upstream tokens on a job past it. `cache_key` is
    set by the dispatcher on a cacheable miss, and asks whoever finishes the job to publish a
    `job.completed` event. `cache_control` is what the cache reads of the client's
    `Cache-Control` (`no-cache`, `no-store`, `max-age=N`, as `CacheControl.header()` writes
    them), carried for the dispatcher; `cache_status` is the dispatcher's verdict (`hit`,
    `miss`, `bypass`), which every reply to the job carries as its `x-cache` header.
    """

    request_id: str
    model: str
    reply_to: str
    deadline: float
    body: bytes
    stream: bool = False
    include_usage: bool = False
    tenant: str = "anonymous"
    cache_key: str | None = None
    cache_control: str | None = None
    cache_status: str | None = None

    def remaining(self, now: float) -> float:
        return self.deadline - now

    def with_changes(self, **changes: Any) -> Job:
        fields = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        fields.update(changes)
        return Job(**fields)


def encode_job(job: Job, *, now: float) -> Envelope:
    headers: dict[str, Any] = {
        H_VERSION: WIRE_VERSION,
        H_MODEL: job.model,
        H_STREAM: job.stream,
        H_INCLUDE_USAGE: job.include_usage,
        H_TENANT: job.tenant,
        # Integer milliseconds: AMQP tables carry a Python float as a 32-bit float, which
        # rounds a Unix time to 128 s.
        H_DEADLINE: round(job.deadline * 1000),
    }
    if job.cache_key is not None:
        headers[H_CACHE_KEY] = job.cache_key
    if job.cache_control is not None:
        headers[H_CACHE_CONTROL] = job.cache_control
    if job.cache_status is not None:
        headers[H_CACHE_STATUS] = job.cache_status
    return Envelope(
        type=MessageType.JOB,
        body=job.body,
        headers=headers,
        correlation_id=job.request_id,
        message_id=job.request_id,
        reply_to=job.reply_to,
        # The broker drops what nobody took before the client's deadline.
        expiration_ms=max(1, int(job.remaining(now) * 1000)),
    )


def decode_job(env: Envelope) -> Job:
    if env.type != MessageType.JOB:
        raise MessageDecodeError(f"expected a job, got {env.type!r}")
    _check_version(env)
    if not env.correlation_id or not env.reply_to:
        raise MessageDecodeError("job without correlation_id or reply_to")
    model = _header(env, H_MODEL, str)
    deadline_ms = _header(env, H_DEADLINE, int)
    if not model or deadline_ms is None:
        raise MessageDecodeError("job without model or deadline")
    return Job(
        request_id=env.correlation_id,
        model=model,
        reply_to=env.reply_to,
        deadline=deadline_ms / 1000,
        body=env.body,
        stream=bool(_header(env, H_STREAM, bool, False)),
        include_usage=bool(_header(env, H_INCLUDE_USAGE, bool, False)),
        tenant=_header(env, H_TENANT, str, "anonymous"),
        cache_key=_header(env, H_CACHE_KEY, str),
        cache_control=_header(env, H_CACHE_CONTROL, str),
        cache_status=_header(env, H_CACHE_STATUS, str),
    )


# --- replies -----------------------------------------------------------------------------------


class ReplyKind(StrEnum):
    FINAL = MessageType.REPLY_FINAL
    ERROR = MessageType.REPLY_ERROR
    CHUNK = MessageType.REPLY_CHUNK
    END = MessageType.REPLY_END


@dataclass(frozen=True, slots=True)
class Reply:
    """A message on a reply queue.

    FINAL carries a whole `chat.completion` body; ERROR an OpenAI error body and its status;
    CHUNK one or more SSE events, already framed (`data: {...}\\n\\n`), so the API writes them
    as they are; END closes a stream. `attempt` names one try at the job (the API keeps the
    first attempt it sees); `seq` numbers a stream's CHUNK and END messages from 0.
    `http_headers` are response headers to relay (retry-after, x-ratelimit-*, x-cache); the API
    passes on only those `shared.http_headers` names.
    """

    kind: ReplyKind
    request_id: str
    attempt: str
    body: bytes = b""
    seq: int = 0
    status: int = 200
    http_headers: dict[str, str] = field(default_factory=dict)


def encode_reply(reply: Reply) -> Envelope:
    headers: dict[str, Any] = {
        H_VERSION: WIRE_VERSION,
        H_ATTEMPT: reply.attempt,
        H_SEQ: reply.seq,
        H_STATUS: reply.status,
    }
    if reply.http_headers:
        headers[H_HTTP_HEADERS] = orjson.dumps(reply.http_headers).decode()
    return Envelope(
        type=reply.kind, body=reply.body, headers=headers, correlation_id=reply.request_id
    )


def decode_reply(env: Envelope) -> Reply:
    try:
        kind = ReplyKind(env.type)
    except ValueError as e:
        raise MessageDecodeError(f"not a reply: {env.type!r}") from e
    _check_version(env)
    if not env.correlation_id:
        raise MessageDecodeError("reply without correlation_id")
    raw_headers = _header(env, H_HTTP_HEADERS, str)
    try:
        http_headers = orjson.loads(raw_headers) if raw_headers else {}
    except orjson.JSONDecodeError as e:
        raise MessageDecodeError("reply http headers are not JSON") from e
    if not isinstance(http_headers, dict):
        raise MessageDecodeError("reply http headers are not a JSON object")
    return Reply(
        kind=kind,
        request_id=env.correlation_id,
        attempt=_header(env, H_ATTEMPT, str, ""),
        body=env.body,
        seq=int(_header(env, H_SEQ, int, 0)),
        status=int(_header(env, H_STATUS, int, 200)),
        http_headers=http_headers,
    )


# --- control: agents ---------------------------------------------------------------------------

AGENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LOCAL_MODEL_PATTERN = r"^local[A-Za-z0-9._:/@+-]{0,123}$"

AgentName = Annotated[str, StringConstraints(pattern=AGENT_NAME_PATTERN)]
# One agent process: replicas may share a name (and its token), so the registry tells them
# apart by this id, new at each start. Empty from agents that predate it.
AgentInstance = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{0,64}$")]
LocalModel = Annotated[str, StringConstraints(pattern=LOCAL_MODEL_PATTERN)]


# The most models one agent registers: a registry entry and every heartbeat carry them all.
MAX_AGENT_MODELS = 64


class AgentRegistration(BaseModel):
    """`POST /register`: an agent announces the `local*` models it serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AgentName
    endpoint: str = Field("", max_length=512, pattern=r"^[\x21-\x7e]*$")
    models: list[LocalModel] = Field(min_length=1, max_length=MAX_AGENT_MODELS)
    instance: AgentInstance = ""

    def to_json(self) -> bytes:
        """Without the fields left at their defaults, as `AgentHeartbeat.to_json`."""
        return self.model_dump_json(exclude_defaults=True).encode()


class AgentHeartbeat(BaseModel):
    """`POST /heartbeat`: a full snapshot when `models` is given, else a plain sign of life.
    With `leaving`, the agent's last word as it stops: count it dead from now."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AgentName
    models: list[LocalModel] | None = Field(None, max_length=MAX_AGENT_MODELS)
    load: StrictFloat | None = Field(None, ge=0, le=1_000_000)  # not true, nor "5"
    leaving: StrictBool = False
    instance: AgentInstance = ""

    def to_json(self) -> bytes:
        """Without the fields left at their defaults: a heartbeat without `leaving` reads the
        same to an API or dispatcher that predates the field (both forbid unknown fields)."""
        return self.model_dump_json(exclude_defaults=True).encode()


def encode_control(message: AgentRegistration | AgentHeartbeat) -> Envelope:
    if isinstance(message, AgentRegistration):
        kind, body = MessageType.AGENT_REGISTER, message.to_json()
    else:
        kind, body = MessageType.AGENT_HEARTBEAT, message.to_json()
    return Envelope(type=kind, body=body, headers=_version())


def decode_control(env: Envelope) -> AgentRegistration | AgentHeartbeat:
    _check_version(env)
    model: type[AgentRegistration] | type[AgentHeartbeat]
    if env.type == MessageType.AGENT_REGISTER:
        model = AgentRegistration
    elif env.type == MessageType.AGENT_HEARTBEAT:
        model = AgentHeartbeat
    else:
        raise MessageDecodeError(f"not a control message: {env.type!r}")
    try:
        return model.model_validate_json(env.body)
    except ValidationError as e:
        raise MessageDecodeError(f"bad {env.type}: {e.error_count()} errors") from e


# --- cancel, rpc, completed --------------------------------------------------------------------

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def encode_cancel(request_id: str) -> Envelope:
    return Envelope(type=MessageType.CANCEL, body=request_id.encode(), headers=_version())


def decode_cancel(env: Envelope) -> str:
    _check_version(env)
    request_id = env.body.decode(errors="replace")
    if env.type != MessageType.CANCEL or not _REQUEST_ID_RE.fullmatch(request_id):
        raise MessageDecodeError("bad cancel message")
    return request_id


def encode_rpc_models(request_id: str, reply_to: str, model: str | None = None) -> Envelope:
    """Ask for the model list; with `model`, the list also holds that id if it reaches a
    listed model under another name (`GET /v1/models/openai/gpt-4o`)."""
    headers = _version() if model is None else {**_version(), H_MODEL: model}
    return Envelope(
        type=MessageType.RPC_MODELS,
        headers=headers,
        correlation_id=request_id,
        reply_to=reply_to,
        expiration_ms=5_000,
    )


def encode_rpc_result(request_id: str, body: bytes) -> Envelope:
    return Envelope(
        type=MessageType.RPC_RESULT,
        body=body,
        headers=_version(),
        correlation_id=request_id,
    )


# Message sizes. RabbitMQ refuses a message past its `max_message_size` (16 MiB by default on
# RabbitMQ 4) by closing the channel it came on, failing every publish in flight there.
MAX_REPLY_BYTES = 15 * 1024 * 1024  # default of MAX_REPLY_BYTES: one reply's body
# The cache keeps no larger answer, so a `job.completed` of a larger one carries no body.
MAX_CACHED_BODY = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Completed:
    """A finished cacheable job: its whole answer (status 200), or (another status, empty body)
    the news that it ended without one, so the dispatchers waiting on it stop waiting.

    `request_id` is the finished job's: the owner its single-flight lock would have, so the
    writer frees only a lock the job itself holds. None in events from producers that predate
    it (their writer freed the key's lock whoever held it)."""

    cache_key: str
    body: bytes = b""
    status: int = 200
    request_id: str | None = None


def encode_completed(events: Sequence[Completed]) -> Envelope:
    """One `job.completed` message for one or more events: the bodies back to back, and each
    event's key, status, body length and request id ("" for none) at the same index of four
    header arrays."""
    headers = {
        **_version(),
        H_CACHE_KEYS: [e.cache_key for e in events],
        H_STATUSES: [e.status for e in events],
        H_LENGTHS: [len(e.body) for e in events],
        H_REQUEST_IDS: [e.request_id or "" for e in events],
    }
    return Envelope(
        type=MessageType.JOB_COMPLETED, body=b"".join(e.body for e in events), headers=headers
    )


def decode_completed(env: Envelope) -> list[Completed]:
    _check_version(env)
    keys = _header(env, H_CACHE_KEYS, list)
    statuses = _header(env, H_STATUSES, list)
    lengths = _header(env, H_LENGTHS, list)
    # Absent from the messages of producers that predate it: no request ids.
    request_ids = _header(env, H_REQUEST_IDS, list, [""] * len(lengths or ()))
    if env.type != MessageType.JOB_COMPLETED or keys is None or statuses is None or not lengths:
        raise MessageDecodeError("bad job.completed message")
    if not len(keys) == len(statuses) == len(lengths) == len(request_ids):
        raise MessageDecodeError("job.completed: header arrays of different lengths")
    if not all(type(n) is int and n >= 0 for n in (*statuses, *lengths)):
        raise MessageDecodeError("job.completed: a status or length is not a whole number")
    if sum(lengths) != len(env.body):
        raise MessageDecodeError("job.completed: the lengths do not add up to the body")
    events, start = [], 0
    for raw_key, status, length, raw_id in zip(keys, statuses, lengths, request_ids, strict=True):
        key, request_id = _text(raw_key), _text(raw_id)
        if not isinstance(key, str) or not key:
            raise MessageDecodeError("job.completed: a cache key is missing")
        if not isinstance(request_id, str):
            raise MessageDecodeError("job.completed: a request id is not a string")
        body = env.body[start : start + length]
        events.append(Completed(key, body, status, request_id or None))
        start += length
    return events


def _text(value: object) -> object:
    """A string header value as AMQP tables may carry it (bytes), decoded; others as they are."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _version() -> dict[str, Any]:
    return {H_VERSION: WIRE_VERSION}
