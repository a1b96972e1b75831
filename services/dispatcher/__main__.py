"""`router dispatcher`: run one dispatcher until SIGTERM."""

from __future__ import annotations

import asyncio

from services.dispatcher.service import run
from services.dispatcher.settings import DispatcherSettings
from shared.logs import configure_logging, secret_values
from shared.runner import run_service
from shared.settings import load_settings


def main() -> None:
    settings = load_settings(DispatcherSettings, "dispatcher")
    configure_logging(settings.log_level, "dispatcher", secrets=secret_values(settings))

    async def serve(stop: asyncio.Event) -> None:
        await run(settings, stop)

    run_service(serve)


if __name__ == "__main__":
    main()
