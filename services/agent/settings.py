"""Settings of the agent service (environment variables, see the README table)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, SecretStr, field_validator, model_validator

from services.agent.models import parse_agent_models
from shared.settings import BrokerSettings, ReplySizeSettings, check_url


class Backend(StrEnum):
    """How the agent reaches its inference server."""

    VLLM = "vllm"  # an OpenAI-compatible server that is already running at VLLM_URL
    VLLM_DOCKER = "vllm-docker"  # the agent starts `vllm/vllm-openai` itself and stops it


class AgentSettings(BrokerSettings, ReplySizeSettings):
    agent_name: str = Field(
        "agent",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="This agent's name in the registry (its token is issued for it).",
    )
    agent_token: SecretStr = Field(
        SecretStr(""), description="Bearer token the API accepts for AGENT_NAME."
    )
    router_url: str = Field(
        "http://127.0.0.1:8000",
        pattern=r"^https?://\S+$",
        description="Base URL of the API (where /register lives).",
    )
    vllm_url: str = Field(
        "",
        description=(
            "OpenAI base URL of the inference server, with or without /v1 "
            "(default http://127.0.0.1:8000/v1, or the container's port with vllm-docker)."
        ),
    )
    vllm_api_key: SecretStr = Field(
        SecretStr(""),
        description=(
            "Key the inference server requires (vLLM's --api-key), sent as `Bearer`; with "
            "vllm-docker the container gets it as VLLM_API_KEY."
        ),
    )
    agent_models: str = Field(
        "",
        description=(
            "Models served, comma separated: `local_x=served`, `local_x` (serves `x`) or `x` "
            "(exposed as `local_x`); empty asks the server's /v1/models."
        ),
    )
    agent_concurrency: int = Field(
        8, ge=1, le=4096, description="Jobs taken at once from each model's queue (prefetch)."
    )
    heartbeat_interval: float = Field(
        5.0,
        gt=0,
        description=(
            "Seconds between heartbeats to the API, and between checks of the inference "
            "server's /health (two failed in a row: no jobs taken until one passes)."
        ),
    )
    agent_host: str = Field(
        "", description="Host name put in the registered endpoint (default: this host's name)."
    )
    agent_bind: str = Field("0.0.0.0", description="Address the agent's /health server binds to.")
    agent_port: int = Field(5000, ge=0, le=65535, description="Port of the agent's /health server.")
    stream_coalesce_ms: float = Field(
        5.0, ge=0, description="Window in ms over which stream chunks are sent as one message."
    )
    drain_timeout: float = Field(
        20.0, ge=0, description="Seconds a stopping service lets in-flight jobs finish."
    )
    upstream_connect_timeout: float = Field(
        5.0, gt=0, description="Seconds to open a connection to the inference server."
    )
    agent_backend: Backend = Field(
        Backend.VLLM, description="`vllm` (a running server) or `vllm-docker` (start it)."
    )
    # --- vllm-docker backend -------------------------------------------------------------------
    vllm_image: str = Field(
        "vllm/vllm-openai:latest", description="vllm-docker: the vLLM image (pin a tag)."
    )
    vllm_model: str = Field("", description="vllm-docker: the Hugging Face model to load.")
    vllm_gpus: str = Field(
        "all", description="vllm-docker: `all` or comma-separated GPU ids for the container."
    )
    vllm_host_port: int = Field(
        8001, ge=1, le=65535, description="vllm-docker: host port the container's 8000 maps to."
    )
    vllm_args: str = Field(
        "", description="vllm-docker: extra `vllm serve` arguments (shell-quoted)."
    )
    vllm_container_name: str = Field(
        "", description="vllm-docker: container name (default `router-vllm-<AGENT_NAME>`)."
    )
    vllm_startup_timeout: float = Field(
        900.0, gt=0, description="vllm-docker: seconds to wait for the server's /health."
    )
    hf_cache_dir: str = Field(
        "~/.cache/huggingface",
        description="vllm-docker: host model cache mounted in the container.",
    )
    hf_token: SecretStr = Field(
        SecretStr(""), description="vllm-docker: Hugging Face token passed to the container."
    )

    @field_validator("vllm_url")
    @classmethod
    def _server_url(cls, value: str) -> str:
        return check_url(value, ("http", "https"), "http://127.0.0.1:8000/v1") if value else value

    @field_validator("agent_models")
    @classmethod
    def _models_parse(cls, value: str) -> str:
        parse_agent_models(value)  # raises ModelConfigError, a ValueError
        return value

    @model_validator(mode="after")
    def _docker_needs_a_model(self) -> AgentSettings:
        if self.agent_backend is Backend.VLLM_DOCKER and not self.vllm_model:
            raise ValueError("VLLM_MODEL is required with AGENT_BACKEND=vllm-docker")
        return self
