"""The providers' models for `/v1/models`, fetched in the background and served from memory.

The model list RPC must never wait on a provider: `names()` is synchronous and returns what
the last successful fetch found. A background task refetches every `ttl` seconds (sooner,
every `retry_interval`, while fetches fail); a failed fetch keeps the previous list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from services.dispatcher.providers.base import Provider
from services.dispatcher.providers.routes import listed_models
from services.dispatcher.routing import ProviderRule
from shared.errors import RouterError

log = logging.getLogger(__name__)


class ModelCatalog:
    def __init__(
        self,
        providers: Sequence[Provider],
        rules: tuple[ProviderRule, ...],
        *,
        ttl: float,
        retry_interval: float = 10.0,
        fetch_timeout: float = 30.0,
    ) -> None:
        self._providers = providers
        self._rules = rules
        self._ttl = ttl
        self._retry_interval = min(retry_interval, ttl)
        self._fetch_timeout = fetch_timeout
        self._listed: dict[str, list[str]] = {}
        self._task: asyncio.Task[None] | None = None

    def names(self) -> list[str]:
        """Every provider model a client may ask for, under the name it would use."""
        return [
            name for provider in self._providers for name in self._listed.get(provider.name, [])
        ]

    async def refresh(self) -> bool:
        """Fetch every provider's list once; True if all answered."""
        ok = True
        for provider in self._providers:
            try:
                async with asyncio.timeout(self._fetch_timeout):
                    ids = await provider.list_models()
            except (RouterError, TimeoutError) as e:
                log.warning("model list of %s not refreshed: %s", provider.name, _describe(e))
                ok = False
                continue
            self._listed[provider.name] = listed_models(ids, self._rules, provider.name)
            log.debug("%s lists %d models", provider.name, len(self._listed[provider.name]))
        return ok

    def start(self) -> None:
        """Start refreshing in the background (the first fetch at once)."""
        if self._providers and self._task is None:
            self._task = asyncio.create_task(self._refresh_forever(), name="model-catalog")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _refresh_forever(self) -> None:
        while True:
            try:
                ok = await self.refresh()
            except Exception:  # a bug here must not end the refreshes for good
                log.exception("model list refresh failed")
                ok = False
            await asyncio.sleep(self._ttl if ok else self._retry_interval)


def _describe(exc: BaseException) -> str:
    return exc.message if isinstance(exc, RouterError) else type(exc).__name__
