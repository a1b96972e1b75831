"""Settings of the dispatcher service (environment variables, see the README table)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from services.dispatcher.providers.routes import (
    DEFAULT_ROUTES,
    KNOWN_PROVIDERS,
    parse_provider_routes,
)
from shared.settings import BrokerSettings, RedisSettings, ReplySizeSettings, ReplyTrustSettings


class DispatcherSettings(BrokerSettings, RedisSettings, ReplyTrustSettings, ReplySizeSettings):
    dispatcher_prefetch: int = Field(
        64, ge=1, le=10_000, description="Jobs a dispatcher holds unacked at once."
    )
    registry_path: str = Field(
        "var/dispatcher.sqlite3", description="SQLite file of this dispatcher's agent registry."
    )
    heartbeat_ttl: float = Field(
        15.0, gt=0, description="Seconds after its last heartbeat that an agent counts as dead."
    )
    agent_forget_after: float = Field(
        86_400.0,
        gt=0,
        description="Seconds after its last heartbeat that a dead agent is dropped from the "
        "registry: its models then answer 404 instead of 503.",
    )
    stream_coalesce_ms: float = Field(
        5.0, ge=0, description="Window in ms over which stream chunks are sent as one message."
    )
    drain_timeout: float = Field(
        20.0, ge=0, description="Seconds a stopping service lets in-flight jobs finish."
    )
    health_port: int = Field(
        0, ge=0, le=65535, description="Port of the dispatcher's /health and /ready; 0 = off."
    )
    health_host: str = Field("127.0.0.1", description="Address the /health server binds to.")

    # --- response cache (REDIS_URL, CACHE_TTL: shared.settings.RedisSettings) ------------------
    cache_shared_namespace: bool = Field(
        False, description="One cache for every tenant (default: each tenant has its own)."
    )
    cache_deterministic_only: bool = Field(
        False, description="Store only requests with temperature 0 or a seed."
    )
    cache_timeout_ms: float = Field(
        100.0, gt=0, description="Bound in ms of each Redis operation (past it: cache bypass)."
    )
    cache_single_flight_wait: float = Field(
        30.0,
        ge=0,
        description="Seconds an identical deterministic request waits for one in flight (0: off).",
    )

    # --- cloud providers ----------------------------------------------------------------------
    openai_api_key: SecretStr | None = Field(
        None, description="OpenAI API key; unset or empty leaves OpenAI unconfigured."
    )
    openai_base_url: str = Field(
        "https://api.openai.com/v1",
        pattern=r"^https?://\S+$",
        description="Base URL of the OpenAI API (or a compatible server).",
    )
    provider_routes: str = Field(
        DEFAULT_ROUTES,
        description="`prefix=provider` pairs, first match wins; an empty prefix matches any model.",
    )
    provider_prefetch: int = Field(
        256, ge=1, le=10_000, description="Provider jobs a dispatcher runs at once, per provider."
    )
    provider_connect_timeout: float = Field(
        10.0, gt=0, description="Seconds to connect to a provider."
    )
    provider_read_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds a provider's stream may stay silent (first byte, between chunks); "
        "a JSON answer has none (its deadline bounds it).",
    )
    provider_max_retries: int = Field(
        2, ge=0, le=10, description="Retries of a provider call (5xx, timeout, lost connection)."
    )
    provider_backoff_base: float = Field(
        0.5, gt=0, description="Seconds of the first retry backoff (doubling, jittered)."
    )
    provider_backoff_max: float = Field(
        8.0, gt=0, description="Longest wait in seconds between two tries of a provider call."
    )
    provider_models_ttl: float = Field(
        300.0, gt=0, description="Seconds between refreshes of the providers' model lists."
    )

    @field_validator("openai_api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("provider_routes")
    @classmethod
    def _routes_parse(cls, value: str) -> str:
        rules = parse_provider_routes(value)  # raises ValueError on a malformed pair
        unknown = sorted({rule.provider for rule in rules} - KNOWN_PROVIDERS)
        if unknown:
            known = ", ".join(sorted(KNOWN_PROVIDERS))
            raise ValueError(f"names providers this router has no code for: {unknown} ({known})")
        return value
