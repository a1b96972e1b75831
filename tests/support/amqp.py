"""aio-pika messages for tests that publish through aio-pika themselves (the router does not)."""

from __future__ import annotations

import aio_pika

from shared.messages import Envelope


def to_message(env: Envelope, *, persistent: bool, user_id: str | None = None) -> aio_pika.Message:
    return aio_pika.Message(
        env.body,
        user_id=user_id,
        headers=env.headers,
        type=env.type,
        correlation_id=env.correlation_id,
        reply_to=env.reply_to,
        message_id=env.message_id,
        expiration=None if env.expiration_ms is None else env.expiration_ms / 1000,
        delivery_mode=(
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        ),
    )
