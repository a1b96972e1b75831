"""`router api`: run the API service under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from services.api.agent_auth import parse_token_pairs
from services.api.app import create_app
from services.api.client_auth import load_entries
from services.api.server import (
    WRITE_GRACE,
    DrainingServer,
    DroppedStreamFilter,
    listening_sockets,
)
from services.api.settings import ApiSettings
from shared.logs import configure_logging, secret_values
from shared.runner import settle_heap, startup_errors_reported
from shared.settings import load_settings

log = logging.getLogger(__name__)


def credential_values(settings: ApiSettings) -> list[str]:
    """Each client key and agent token on its own, for the log redactor."""
    tokens = parse_token_pairs(settings.agent_tokens.get_secret_value())
    entries = load_entries(settings.client_keys.get_secret_value(), settings.client_keys_file)
    return [*tokens.values(), *(key for _, key in entries)]


def main() -> None:
    settings = load_settings(ApiSettings, "api")
    configure_logging(
        settings.log_level, "api", secrets=secret_values(settings, *credential_values(settings))
    )
    # Before the app: a port in use is one line and exit code 1, with nothing connected yet.
    with startup_errors_reported():
        sockets = listening_sockets(settings.api_host, settings.api_port)
    # uvicorn says where it listens only when it binds the port itself.
    log.info("listening on %s:%d", settings.api_host, settings.api_port)
    app = create_app(settings)
    logging.getLogger("uvicorn.error").addFilter(DroppedStreamFilter())
    settle_heap()
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's records go through our handler, and its secret redactor
        access_log=False,
        # uvicorn's 5 s equals httpx's pool expiry and the agents' heartbeat interval: a
        # request written as the server closes its idle connection fails on the wire.
        timeout_keep_alive=settings.api_keepalive_timeout,
        # A backstop: the requests still waiting end at DRAIN_TIMEOUT (services/api/server.py).
        timeout_graceful_shutdown=round(settings.drain_timeout + WRITE_GRACE),
    )
    server = DrainingServer(
        config, drain_timeout=settings.drain_timeout, end_waiting=app.state.bus.end_waiting
    )
    server.run(sockets=sockets)
    if server.force_exit:  # a second Ctrl-C cut the drain short: not a clean stop
        sys.exit(1)


if __name__ == "__main__":
    main()
