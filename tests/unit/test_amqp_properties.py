"""The hot path's AMQP properties equal what aio-pika's Message would have sent."""

from __future__ import annotations

import pytest

from shared.amqp import to_properties
from shared.messages import Envelope
from tests.support.amqp import to_message

ENVELOPES = [
    Envelope(
        type="job",
        body=b"{}",
        headers={"x-a": 1, "x-b": "two"},
        correlation_id="r1",
        reply_to="ns.reply.p1",
        message_id="m1",
        expiration_ms=30_000,
    ),
    Envelope(type="reply", body=b"x", headers={}),
]


@pytest.mark.parametrize("env", ENVELOPES)
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("user_id", ["router-api", None])
def test_properties_match_aio_pika_message(
    env: Envelope, persistent: bool, user_id: str | None
) -> None:
    expected = to_message(env, persistent=persistent, user_id=user_id).properties
    expected.priority = None  # aio-pika sends 0; nothing reads it, so it is left out
    assert to_properties(env, persistent=persistent, user_id=user_id) == expected
