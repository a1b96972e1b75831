"""Settings of the API service (environment variables, see the README table)."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from services.api.agent_auth import parse_token_pairs
from services.api.client_auth import ClientKeys
from shared.settings import BrokerSettings, ReplyTrustSettings


class ApiSettings(BrokerSettings, ReplyTrustSettings):
    api_host: str = Field(
        "127.0.0.1", description="Address the API binds to (loopback by default)."
    )
    api_port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    drain_timeout: float = Field(
        20.0,
        ge=0,
        description="Seconds a stopping API lets requests wait for their answers; then those "
        "still waiting end with 503 `api_stopping` and their jobs are cancelled.",
    )
    api_keepalive_timeout: int = Field(
        65,
        ge=1,
        description="Seconds an idle client connection stays open. Longer than the idle time "
        "of clients' pools (httpx 5 s, aiohttp 15 s) and of load balancers (60 s on AWS), so "
        "the API never closes a connection just as a client reuses it.",
    )
    # The defaults wait as long as a client would: the OpenAI SDKs give a request 600 s, and a
    # reasoning model sends nothing while it thinks (on OpenAI's chat completions, minutes at
    # a high effort), as the provider client's PROVIDER_READ_TIMEOUT (300 s) allows a stream.
    request_timeout: float = Field(
        600.0,
        gt=0,
        description="Total seconds a chat completion may take: then 504, or an error event in "
        "a stream already committed to 200.",
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a request body may take to arrive (REQUEST_TIMEOUT if that is "
        "less): then 408. A stalled upload does not hold a connection for the whole deadline.",
    )
    ttft_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds to wait for a stream's first chunk: then 504, or an error event "
        "once the stream committed to 200 (after STREAM_KEEPALIVE_AFTER).",
    )
    stream_idle_timeout: float = Field(
        300.0, gt=0, description="Seconds a started stream may stay silent before it is ended."
    )
    stream_keepalive_after: float = Field(
        10.0,
        gt=0,
        description="Seconds without a first chunk after which a stream commits to 200 and "
        "pings; also how often a silent stream is pinged, before its first chunk or between two.",
    )
    # Room for a phone photo in base64 (a 12-megapixel JPEG is 3-5 MB, 4-7 MB encoded) and the
    # conversation around it, and 4 MiB below RabbitMQ 4's default `max_message_size` (16 MiB):
    # a job past that closes the publishing channel.
    max_body_bytes: int = Field(
        12 * 1024 * 1024,
        gt=0,
        description="Largest accepted request body, in bytes (413 past it).",
    )
    cors_allow_origins: str = Field(
        "",
        description=(
            "Origins a browser may call the API from, comma separated (`*`: any); empty: no "
            "CORS headers, so browsers keep pages of other origins from reading answers."
        ),
    )
    models_timeout: float = Field(
        3.0, gt=0, description="Seconds to wait for a dispatcher to answer the model list."
    )
    agent_tokens: SecretStr = Field(
        SecretStr(""),
        description="Agent credentials as `name=token` pairs, comma separated.",
    )
    agent_token_secret: SecretStr = Field(
        SecretStr(""),
        description="If set, an agent's token may also be HMAC-SHA256(secret, name) in hex.",
    )
    client_keys: SecretStr = Field(
        SecretStr(""),
        description=(
            "Client API keys as `id:key` or `id:key:model1|model2` entries, comma separated; "
            "none (and no CLIENT_KEYS_FILE) leaves /v1/* open."
        ),
    )
    client_keys_file: str = Field(
        "", description="A file of client key entries, one per line (`#` starts a comment)."
    )
    max_messages: int = Field(
        2048, ge=1, le=1_000_000, description="Most `messages` one chat request may carry."
    )
    max_tokens_limit: int = Field(
        1_000_000,
        ge=1,
        description="Largest `max_tokens` / `max_completion_tokens` a request may ask for.",
    )

    @model_validator(mode="after")
    def _credentials_parse(self) -> ApiSettings:
        """Malformed credentials stop the API at start like any other bad setting: one line
        naming the variable (never the secret), not a traceback from the half-built app."""
        tokens = parse_token_pairs(self.agent_tokens.get_secret_value())
        keys = ClientKeys.from_config(self.client_keys.get_secret_value(), self.client_keys_file)
        if keys.shares_a_key_with(tokens.values()):
            raise ValueError("a client key is also an agent token: give each its own")
        return self
