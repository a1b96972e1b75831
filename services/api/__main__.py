"""`router api`: run the API service under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import uvicorn

from services.api.app import create_app
from services.api.settings import ApiSettings
from shared.logs import configure_logging


def main() -> None:
    settings = ApiSettings()
    configure_logging(settings.log_level, "api")
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
