"""Jobs dead-lettered back from an agent queue: why they came back, and whether an agent held
them (pure; no I/O).

An agent queue's `x-message-ttl` (AGENT_QUEUE_TTL) sends a job nobody took in time back to a
dispatcher, which answers 503. But RabbitMQ keeps a message's first enqueue time when it is
requeued (its agent died, stopped or handed it back): a job an agent held for longer than the
TTL expires the moment it is back in its queue. Its client got "no agent took the request"
while a healthy agent sat idle (review 2026-11-29). The broker cannot tell the two apart; the
time the job entered its queue (`x-queued-at`, stamped by whoever published it there) against
the broker's time of its death can: a job that only waited dies one TTL after it entered, one
that was held and handed back dies later.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from shared.messages import H_DELIVERIES, H_QUEUED_AT, Envelope

# x-death's time has whole seconds, and the publisher's clock is not the broker's: a job that
# only waited may seem to have died up to this much past its TTL.
HELD_SLACK = 2.0


def header_text(value: object) -> str | None:
    """A header value as text (the AMQP client gives long strings as bytes or str)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Death:
    """A dead-lettered message's last death, as the broker's `x-death` entry tells it."""

    queue: str | None = None
    reason: str | None = None
    time: float | None = None  # Unix seconds, by the broker's clock


def latest_death(env: Envelope) -> Death:
    """From the `x-death` entry the broker wrote, not `x-first-death-*`: RabbitMQ keeps a
    publisher's own values of those when the message already carries `x-death`, so an agent
    could forge them (review 2026-11-29)."""
    deaths = env.headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return Death()
    entry = deaths[0]
    died = entry.get("time")
    return Death(
        queue=header_text(entry.get("queue")),
        reason=header_text(entry.get("reason")),
        time=_unix(died) if isinstance(died, datetime.datetime) else None,
    )


def _unix(moment: datetime.datetime) -> float:
    if moment.tzinfo is None:  # AMQP timestamps are UTC
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def was_held(env: Envelope, death: Death, queue_ttl: float) -> bool:
    """Whether a job that expired in its queue had been taken by a consumer and handed back,
    rather than waiting there for `queue_ttl` seconds (see the module docstring). Without a
    stamp (a job queued by an older dispatcher) or a time of death: not held, as before."""
    queued = env.headers.get(H_QUEUED_AT)
    if death.reason != "expired" or death.time is None or not isinstance(queued, int):
        return False
    return death.time - queued / 1000 > queue_ttl + HELD_SLACK


def delivery_count(env: Envelope) -> int:
    """How many times the job was delivered, as its `x-router-deliveries` counts them (1 when
    nothing counted yet)."""
    counted = env.headers.get(H_DELIVERIES, 1)
    return max(1, counted) if isinstance(counted, int) and not isinstance(counted, bool) else 1
