"""`router agent`: run one agent until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from services.agent.heartbeat import RegistrationRefusedError
from services.agent.service import run
from services.agent.settings import AgentSettings
from shared.logs import configure_logging, secret_values
from shared.runner import run_service
from shared.settings import load_settings


def main() -> None:
    settings = load_settings(AgentSettings, "agent")
    configure_logging(settings.log_level, "agent", secrets=secret_values(settings))
    # httpx logs every request at INFO: one line per job and heartbeat is noise here.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))

    async def serve(stop: asyncio.Event) -> None:
        await run(settings, stop)

    try:
        run_service(serve)
    except RegistrationRefusedError:
        # Logged where it happened ("registration refused ...: check AGENT_TOKEN and
        # AGENT_NAME", or what the API found wrong); the agent is stopped. A traceback would
        # add nothing to fix.
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
