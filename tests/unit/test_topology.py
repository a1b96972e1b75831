"""Queue names and arguments as data."""

from __future__ import annotations

import pytest

from shared.settings import Durability
from shared.topology import EVERY_CANCEL, MODEL_NAME_RE, Topology, cancel_routing_key


def test_names_carry_schema_version_and_mode() -> None:
    t = Topology(namespace="router", mode=Durability.DURABLE)
    assert t.jobs_queue == "router.v1.durable.jobs"
    assert t.agent_queue("local_a") == "router.v1.durable.agent.local_a"
    assert Topology(mode=Durability.QUORUM).jobs_queue == "router.v1.quorum.jobs"


def test_jobs_queue_is_bounded_and_refuses_when_full() -> None:
    spec = Topology(jobs_max_length=7).jobs_queue_spec()
    assert spec.durable
    assert spec.arguments["x-max-length"] == 7
    assert spec.arguments["x-overflow"] == "reject-publish"
    assert spec.arguments["x-dead-letter-exchange"].endswith(".dlx")


def test_quorum_mode_sets_delivery_limit() -> None:
    spec = Topology(mode=Durability.QUORUM, delivery_limit=4).jobs_queue_spec()
    assert spec.arguments["x-queue-type"] == "quorum"
    assert spec.arguments["x-delivery-limit"] == 4


def test_transient_mode_is_not_durable() -> None:
    t = Topology(mode=Durability.TRANSIENT)
    assert not t.jobs_queue_spec().durable
    assert t.reply_queue_spec("p").exclusive


def test_agent_queue_bounds_the_wait_and_returns_to_dispatchers() -> None:
    t = Topology(agent_queue_ttl_ms=1234)
    args = t.agent_queue_spec("local_a").arguments
    assert args["x-message-ttl"] == 1234
    assert args["x-dead-letter-routing-key"] == t.returns_queue


def test_durable_reply_queue_expires_when_unused() -> None:
    spec = Topology(reply_queue_expires_ms=5000).reply_queue_spec("p1")
    assert spec.durable and spec.arguments == {"x-expires": 5000}


@pytest.mark.parametrize("model", ["", "local a", "local\n", "x" * 200])
def test_unsafe_model_names_never_become_queue_names(model: str) -> None:
    with pytest.raises(ValueError):
        Topology().agent_queue_spec(model)


def test_a_cancel_is_routed_by_its_model_and_every_dispatcher_hears_all() -> None:
    assert cancel_routing_key("local_llama-3.1-8b") == "local_llama-3.1-8b"
    assert cancel_routing_key("x" * 256) == ""  # too long for a key: dispatchers only
    assert EVERY_CANCEL == "#"  # matches every key, the empty one included
    # An agent binds its models' names as they are: none may be a topic wildcard.
    assert not MODEL_NAME_RE.fullmatch("local.*") and not MODEL_NAME_RE.fullmatch("local.#")


def test_a_counted_copy_goes_back_by_its_queues_own_route() -> None:
    t = Topology(namespace="router")
    assert t.requeue_route(t.jobs_queue) == (t.requeue_exchange, t.jobs_queue)
    provider = t.provider_queue("openai")
    assert t.requeue_route(provider) == (t.requeue_exchange, provider)
    # An agent queue has an exchange of its own (an agent may write to no shared one).
    route = t.requeue_route(t.agent_queue("local_a.b"))
    assert route == (t.agent_requeue_exchange("local_a.b"), "")
