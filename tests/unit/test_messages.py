"""Wire format round trips and refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.messages import (
    H_VERSION,
    AgentHeartbeat,
    AgentRegistration,
    Completed,
    Envelope,
    Job,
    MessageDecodeError,
    Reply,
    ReplyKind,
    decode_cancel,
    decode_completed,
    decode_control,
    decode_job,
    decode_reply,
    encode_cancel,
    encode_completed,
    encode_control,
    encode_job,
    encode_reply,
)

JOB = Job(
    request_id="abc123",
    model="dummy",
    reply_to="router.v1.durable.reply.p1",
    deadline=1000.0,
    body=b'{"model":"dummy"}',
    stream=True,
    include_usage=True,
    tenant="team-a",
    cache_key="k1",
)


def test_job_round_trip_and_expiration() -> None:
    env = encode_job(JOB, now=990.0)
    assert env.expiration_ms == 10_000
    assert env.correlation_id == env.message_id == "abc123"
    assert decode_job(env) == JOB


def test_expired_job_still_gets_a_positive_expiration() -> None:
    assert encode_job(JOB, now=2000.0).expiration_ms == 1


@pytest.mark.parametrize(
    "env",
    [
        Envelope(type="job", headers={H_VERSION: 1, "x-model": "m", "x-deadline": 1.0}),
        Envelope(type="job", headers={H_VERSION: 2}, correlation_id="a", reply_to="q"),
        Envelope(type="reply.final", headers={H_VERSION: 1}, correlation_id="a", reply_to="q"),
        Envelope(
            type="job",
            headers={H_VERSION: 1, "x-model": 3, "x-deadline": 1.0},
            correlation_id="a",
            reply_to="q",
        ),
    ],
)
def test_bad_jobs_are_decode_errors(env: Envelope) -> None:
    with pytest.raises(MessageDecodeError):
        decode_job(env)


def test_reply_round_trip() -> None:
    reply = Reply(
        ReplyKind.ERROR,
        "abc",
        "att1",
        body=b'{"error":{}}',
        seq=3,
        status=429,
        http_headers={"retry-after": "2"},
    )
    assert decode_reply(encode_reply(reply)) == reply


@pytest.mark.parametrize("raw", ["not json", "[1]", '"retry-after"', "3", "null"])
def test_reply_http_headers_must_be_a_json_object(raw: str) -> None:
    headers = {H_VERSION: 1, "x-http-headers": raw}
    env = Envelope(type="reply.final", headers=headers, correlation_id="a")
    with pytest.raises(MessageDecodeError):
        decode_reply(env)


def test_control_round_trip() -> None:
    for message in (
        AgentRegistration(name="gpu1", endpoint="http://h:5000", models=["local_a"]),
        AgentHeartbeat(name="gpu1", models=["local_a"], load=2),
        AgentHeartbeat(name="gpu1"),
    ):
        assert decode_control(encode_control(message)) == message


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "gpu1", "models": ["gpt-4o"]},  # only local* models
        {"name": "gpu1", "models": []},
        {"name": "../etc", "models": ["local_a"]},
        {"name": "gpu1", "models": ["local_a"], "endpoint": "x" * 600},
        {"name": "gpu1", "models": ["local_a"], "extra": 1},
    ],
)
def test_registration_refuses_bad_payloads(payload: dict) -> None:
    with pytest.raises(ValidationError):
        AgentRegistration.model_validate(payload)


def test_cancel_and_completed_round_trip() -> None:
    assert decode_cancel(encode_cancel("abc_123")) == "abc_123"
    events = [
        Completed("k1", b"{}", request_id="r1"),
        Completed("k2", b"", 503, "r2"),
        Completed("k3", b'{"a":1}'),  # no request id
    ]
    assert decode_completed(encode_completed(events)) == events
    with pytest.raises(MessageDecodeError):
        decode_cancel(Envelope(type="cancel", body=b"bad id!", headers={H_VERSION: 1}))


def test_cancel_refuses_trailing_newline() -> None:
    with pytest.raises(MessageDecodeError):
        decode_cancel(Envelope(type="cancel", body=b"abc\n", headers={H_VERSION: 1}))


def test_completed_from_a_producer_without_request_ids_still_decodes() -> None:
    """Events published before `x-request-ids` existed: their writer frees whoever's lock."""
    assert decode_completed(_completed()) == [Completed("k1", b"{}", 200, None)]
    assert decode_completed(_completed(**{"x-request-ids": [b"r1"]})) == [
        Completed("k1", b"{}", 200, "r1")
    ]


def _completed(body: bytes = b"{}", **headers: object) -> Envelope:
    fields = {H_VERSION: 1, "x-cache-keys": ["k1"], "x-statuses": [200], "x-lengths": [2]}
    return Envelope(type="job.completed", body=body, headers={**fields, **headers})


@pytest.mark.parametrize(
    "env",
    [
        _completed(**{"x-cache-keys": ["k1", "k2"]}),  # arrays of different lengths
        _completed(**{"x-lengths": [3]}),  # the lengths do not add up to the body
        _completed(  # nor may one go backwards
            **{"x-cache-keys": ["k1", "k2"], "x-statuses": [200, 200], "x-lengths": [-2, 4]}
        ),
        _completed(**{"x-cache-keys": [""]}),
        _completed(**{"x-cache-keys": [7]}),
        _completed(**{"x-statuses": ["200"]}),
        _completed(**{"x-statuses": [True]}),
        _completed(**{"x-lengths": []}),
        _completed(**{"x-request-ids": ["r1", "r2"]}),
        _completed(**{"x-request-ids": [7]}),
        _completed(**{"x-request-ids": "r1"}),
        _completed(**{"x-cache-keys": "k1"}),
        _completed(**{H_VERSION: 2}),
        Envelope(type="reply.final", body=b"{}", headers={H_VERSION: 1, "x-cache-key": "k1"}),
    ],
)
def test_completed_refuses_a_malformed_message(env: Envelope) -> None:
    with pytest.raises(MessageDecodeError):
        decode_completed(env)
