"""aio-pika messages for tests that publish through aio-pika themselves (the router does not),
and a stand-in broker that only records what it is asked to publish."""

from __future__ import annotations

from typing import Any

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


class RecordingBroker:
    """Takes every publish at once (a `shared.amqp.Broker` in duck type): `sent` holds the
    envelopes in order."""

    def __init__(self, publish_timeout: float = 5.0) -> None:
        self.publish_timeout = publish_timeout
        self.sent: list[Envelope] = []

    async def publish(self, env: Envelope, routing_key: str, **_: Any) -> None:
        self.sent.append(env)
