"""One logging set-up for every service: one line per record, the service named."""

from __future__ import annotations

import logging


def configure_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        force=True,
    )
    # aio-pika and aiormq are chatty at INFO about reconnects; keep their warnings.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
