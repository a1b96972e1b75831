"""Settings of the dispatcher service (environment variables, see the README table)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import BrokerSettings, RedisSettings


class DispatcherSettings(BrokerSettings, RedisSettings):
    dispatcher_prefetch: int = Field(
        64, ge=1, le=10_000, description="Jobs a dispatcher holds unacked at once."
    )
    registry_path: str = Field(
        "var/dispatcher.sqlite3", description="SQLite file of this dispatcher's agent registry."
    )
    heartbeat_ttl: float = Field(
        15.0, gt=0, description="Seconds after its last heartbeat that an agent counts as dead."
    )
    agent_queue_ttl: float = Field(
        30.0, gt=0, description="Seconds a job may wait in an agent queue before it gets 503."
    )
    stream_coalesce_ms: float = Field(
        5.0, ge=0, description="Window in ms over which stream chunks are sent as one message."
    )
    drain_timeout: float = Field(
        20.0, ge=0, description="Seconds a stopping service lets in-flight jobs finish."
    )
