"""The providers of one dispatcher process: which are configured, their routes, one pooled
HTTP client, the model catalog, and a consumer per provider queue.

A provider is configured when its key is set; routes to an unconfigured provider are dropped,
so its models answer 404 `model_not_found`.
"""

from __future__ import annotations

import logging

import httpx

from services.dispatcher.providers.base import Provider
from services.dispatcher.providers.catalog import ModelCatalog
from services.dispatcher.providers.openai import OpenAIProvider, build_http_client
from services.dispatcher.providers.retry import RetryPolicy
from services.dispatcher.providers.routes import active_rules, parse_provider_routes
from services.dispatcher.providers.worker import ProviderWorker
from services.dispatcher.routing import ProviderRule
from services.dispatcher.settings import DispatcherSettings
from shared.amqp import Broker
from shared.cancel import Cancellations
from shared.replies import ReplyPublisher
from shared.topology import Topology

log = logging.getLogger(__name__)


class ProviderRuntime:
    def __init__(
        self,
        providers: dict[str, Provider],
        rules: tuple[ProviderRule, ...],
        *,
        client: httpx.AsyncClient | None = None,
        models_ttl: float = 300.0,
    ) -> None:
        self.providers = providers
        self.rules = rules
        self.client = client
        self.catalog = ModelCatalog(list(providers.values()), rules, ttl=models_ttl)

    @classmethod
    def from_settings(cls, settings: DispatcherSettings) -> ProviderRuntime:
        rules = parse_provider_routes(settings.provider_routes)  # checked by the settings
        providers: dict[str, Provider] = {}
        client: httpx.AsyncClient | None = None
        if settings.openai_api_key is not None:
            client = build_http_client(
                max_connections=settings.provider_prefetch,
                connect_timeout=settings.provider_connect_timeout,
            )
            providers["openai"] = OpenAIProvider(
                client,
                api_key=settings.openai_api_key.get_secret_value(),
                base_url=settings.openai_base_url,
                policy=RetryPolicy(
                    max_retries=settings.provider_max_retries,
                    backoff_base=settings.provider_backoff_base,
                    backoff_max=settings.provider_backoff_max,
                ),
                connect_timeout=settings.provider_connect_timeout,
                read_timeout=settings.provider_read_timeout,
                max_reply_bytes=settings.max_reply_bytes,
            )
        active = active_rules(rules, providers)
        for rule in rules:
            if rule not in active:
                log.info(
                    "route %r -> %s inactive: provider not configured", rule.prefix, rule.provider
                )
        return cls(providers, active, client=client, models_ttl=settings.provider_models_ttl)

    def models(self) -> list[str]:
        """The providers' models for `/v1/models` (from memory; never waits on a provider)."""
        return self.catalog.names()

    async def start(
        self,
        broker: Broker,
        topology: Topology,
        *,
        reply: ReplyPublisher,
        cancellations: Cancellations,
        prefetch: int,
        coalesce_window: float,
    ) -> None:
        """Consume each configured provider's queue on its own channel; start the catalog."""
        self.catalog.start()
        for name, provider in self.providers.items():
            worker = ProviderWorker(
                provider,
                rules=self.rules,
                reply=reply,
                cancellations=cancellations,
                coalesce_window=coalesce_window,
            )
            channel = await broker.channel(prefetch=prefetch)
            await broker.consume(
                channel,
                topology.provider_queue_spec(name),
                worker.on_job,
                redelivery_limit=topology.redelivery_limit,
                on_give_up=reply.give_up,
            )
            log.info("consuming %s (prefetch %d)", topology.provider_queue(name), prefetch)

    async def aclose(self) -> None:
        """Stop the catalog and close the HTTP pool (after the consumers drained)."""
        await self.catalog.aclose()
        if self.client is not None:
            await self.client.aclose()
