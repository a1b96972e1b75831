"""Settings pieces reused by each service's `Settings`.

Every variable the router reads is declared here (or in a service's own settings module, built
on these) and listed in the README. Nothing else in the code reads `os.environ` but `router dev`
(services/devstack.py), which reads a few to plan the dev stack; each service builds its
settings once in `__main__` and passes them down.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import TypeVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.messages import MAX_REPLY_BYTES

S = TypeVar("S", bound=BaseSettings)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}


def load_settings(cls: type[S], service: str) -> S:
    """`cls()` from the environment. A bad value ends the process with exit code 2 and one
    line per variable (`ROUTER_URL: String should match ...`), not a traceback; the value
    itself is not repeated, since it may be a secret."""
    try:
        return cls()
    except ValidationError as e:
        lines = [_error_line(error["loc"], error["msg"]) for error in e.errors()]
        print(f"router {service}: invalid configuration", *lines, sep="\n", file=sys.stderr)
        raise SystemExit(2) from None


def _error_line(loc: tuple[int | str, ...], message: str) -> str:
    """`  VARIABLE: message`; a check across variables (no loc) names them in its message."""
    message = message.removeprefix("Value error, ")
    variable = ".".join(str(part) for part in loc).upper()
    return f"  {variable}: {message}" if variable else f"  {message}"


def check_url(value: str, schemes: tuple[str, ...], example: str) -> str:
    """`value` if it is a URL of one of `schemes` with a host (`unix://` with a path); the
    error never repeats it, since a broker or Redis URL carries a password."""
    try:
        parts = urlsplit(value)
        _ = parts.port  # a port that is no number raises
    except ValueError:
        parts = None
    where = (parts.path if parts.scheme == "unix" else parts.hostname) if parts else None
    if parts is None or parts.scheme not in schemes or not where:
        kinds = ", ".join(f"{scheme}://" for scheme in schemes)
        raise ValueError(f"must be a URL ({kinds}) with a host, such as {example}")
    return value


class Durability(StrEnum):
    """How jobs survive a broker restart; part of every queue name (see `shared.topology`)."""

    TRANSIENT = "transient"
    DURABLE = "durable"
    QUORUM = "quorum"


class BrokerSettings(BaseSettings):
    """What every service needs to reach RabbitMQ."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    rabbitmq_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/", description="AMQP URL of the broker (vhost included)."
    )
    durability: Durability = Field(
        Durability.DURABLE, description="transient, durable or quorum queues and messages."
    )
    broker_namespace: str = Field(
        "router",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$",
        description="Prefix of every exchange and queue name; tests use a unique one per run.",
    )
    publish_timeout: float = Field(
        5.0, gt=0, description="Seconds to wait for a publisher confirm before answering 503."
    )
    log_level: str = Field("INFO", description="Python logging level of the service.")
    declare_topology: bool = Field(
        True,
        description="Declare shared exchanges and queues at start; false only checks they "
        "exist (least-privilege broker users; run `router topology` once as admin).",
    )
    agent_queue_ttl: float = Field(
        30.0,
        gt=0,
        description="Seconds a job may wait in an agent queue before it gets 503. Part of the "
        "agent queues' arguments: every service must agree on it.",
    )

    @field_validator("rabbitmq_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        return check_url(value, ("amqp", "amqps"), "amqp://user:password@host:5672/vhost")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        # logging knows WARN and FATAL too, uvicorn does not: they are read as their full names.
        level = LOG_LEVEL_ALIASES.get(level, level)
        if level not in LOG_LEVELS:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level


class ReplySizeSettings(BaseSettings):
    """How large a reply the services that answer jobs (dispatcher, agents) may publish."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    max_reply_bytes: int = Field(
        MAX_REPLY_BYTES,
        ge=8 * 1024 * 1024,
        description="Largest answer one reply message carries (a JSON answer, or one stream "
        "event): a larger one is a 502 answer_too_large. Keep it below the broker's "
        "max_message_size (16 MiB by default on RabbitMQ 4), which refuses a larger message "
        "by closing the publishing channel. At least 8 MiB: a cached answer (up to 4 MiB) is "
        "replayed in one message.",
    )


class ReplyTrustSettings(BaseSettings):
    """Whose replies the API and the cache writer accept; agents answer, they do not check."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    reply_users: str = Field(
        "",
        description="API and dispatcher: broker users whose replies are accepted, as "
        "`user=*` or `user=model1|model2`, comma separated; empty accepts any sender.",
    )

    @field_validator("reply_users")
    @classmethod
    def _reply_users_parse(cls, value: str) -> str:
        from shared.reply_trust import ReplyTrust  # shared.topology imports this module

        ReplyTrust.parse(value)
        return value


class RedisSettings(BaseSettings):
    """The response cache's Redis (used by dispatchers only)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    redis_url: str | None = Field(
        "redis://127.0.0.1:6379/0", description="Redis for the response cache; empty disables it."
    )
    cache_ttl: int = Field(3600, ge=0, description="Seconds a cached response lives; 0 disables.")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if not value:
            return value
        return check_url(value, ("redis", "rediss", "unix"), "redis://host:6379/0")
