"""Broker trust boundary logic: who may answer for which model, and the permission regexes."""

from __future__ import annotations

import base64
import hashlib
import re
import shlex

import pytest

from services.api.rpc import ReplyRouter
from services.dispatcher.cache_key import CachePolicy, cache_key
from shared.broker_acl import (
    agent_grant,
    api_grant,
    definitions,
    dispatcher_grant,
    password_hash,
    rabbitmqctl_commands,
    reply_users,
    shell_script,
)
from shared.messages import Reply, ReplyKind
from shared.reply_trust import ReplyTrust
from shared.topology import Topology

T = Topology(namespace="router")


# --- REPLY_USERS -------------------------------------------------------------------------------


def test_reply_trust_grants_per_model_and_router_users() -> None:
    trust = ReplyTrust.parse(" router-dispatcher=* , gpu1=local_a|local_b ")
    assert trust.enforced
    assert trust.may_answer("router-dispatcher", "gpt-4o")
    assert trust.may_answer("gpu1", "local_b")
    assert not trust.may_answer("gpu1", "local_c")
    assert not trust.may_answer("gpu2", "local_a")
    assert not trust.may_answer(None, "local_a")
    assert trust.is_router("router-dispatcher")
    assert not trust.is_router("gpu1")


def test_no_reply_users_means_one_trusted_broker_user() -> None:
    trust = ReplyTrust.parse("")
    assert not trust.enforced
    assert trust.may_answer(None, "anything") and trust.is_router(None)


@pytest.mark.parametrize(
    "text",
    [
        "gpu1",
        "gpu1=",
        "=local_a",
        "gpu1=local a",
        "gpu1=|",
        "gpu1=local_a,gpu1=local_b",  # the second silently replaced the first
    ],
)
def test_malformed_reply_users_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ReplyTrust.parse(text)


async def test_the_api_drops_a_reply_from_a_user_that_may_not_answer_the_model() -> None:
    router = ReplyRouter(ReplyTrust.parse("disp=*,gpu-a=local_a,gpu-b=local_b"))
    call = router.open("r1", "local_a")
    forged = Reply(ReplyKind.FINAL, "r1", "evil", body=b"{}")
    assert not router.dispatch(forged, "gpu-b")
    assert not router.dispatch(forged, None)
    genuine = Reply(ReplyKind.FINAL, "r1", "good", body=b"{}")
    assert router.dispatch(genuine, "gpu-a")
    assert (await call.next(1.0)).attempt == "good"  # the forged one never queued


async def test_only_router_users_answer_rpcs() -> None:
    router = ReplyRouter(ReplyTrust.parse("disp=*,gpu-a=local_a"))
    answer = router.expect_result("q1")
    assert not router.resolve_result("q1", b"forged", "gpu-a")
    assert router.resolve_result("q1", b"real", "disp")
    assert await answer == b"real"


# --- permissions -------------------------------------------------------------------------------


def matches(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


def test_an_agent_may_read_only_its_models_and_write_only_replies() -> None:
    grant = agent_grant("gpu1", T, ["local_a", "local.b"])
    perm = grant.permission
    assert matches(perm.read, T.agent_queue("local_a"))
    assert matches(perm.read, T.agent_queue("local.b"))
    assert not matches(perm.read, T.agent_queue("localxb"))  # `.` is not a wildcard
    assert not matches(perm.read, T.agent_queue("local_a2"))
    for name in (T.jobs_queue, T.rpc_queue, T.completed_queue, T.reply_queue("0" * 12)):
        assert not matches(perm.read, name)
    assert matches(perm.write, T.replies_exchange)
    for name in ("amq.default", T.jobs_queue, T.control_exchange, T.dead_letter_exchange):
        assert not matches(perm.write, name)
    assert not matches(perm.configure, T.jobs_queue)
    assert matches(perm.configure, T.private_queue("cancel", "0123456789ab"))
    # Counted copies: its own models' requeue exchanges only, never the shared one (review
    # 2026-11-29: an exchange of its own bound to `requeue` routed jobs into any queue).
    assert matches(perm.write, T.agent_requeue_exchange("local_a"))
    assert matches(perm.write, T.agent_requeue_exchange("local.b"))
    assert not matches(perm.write, T.agent_requeue_exchange("local_c"))
    assert not matches(perm.write, T.requeue_exchange)
    topics = {topic.exchange: topic for topic in grant.topics}
    assert set(topics) == {T.cancel_exchange}
    cancels = topics[T.cancel_exchange]
    # It hears its own models' cancels only (review 2026-11-29: it could bind `#`).
    assert matches(cancels.read, "local_a") and matches(cancels.read, "local.b")
    for key in ("#", "*", "local_c", "local_a.x", "local_a2", "localxb"):
        assert not matches(cancels.read, key)
    assert cancels.write == "^$"


def test_the_api_and_dispatcher_declare_only_their_own_queues() -> None:
    api = api_grant("api", T).permission
    dispatcher = dispatcher_grant("dispatcher", T).permission
    for shared in (T.jobs_queue, T.agent_queue("local_a"), T.replies_exchange):
        assert not matches(api.configure, shared)
        assert not matches(dispatcher.configure, shared)
    assert matches(api.configure, T.reply_queue("0123456789ab"))
    assert matches(api.read, T.reply_queue("0123456789ab"))
    assert not matches(api.read, T.jobs_queue)
    assert matches(dispatcher.read, T.provider_queue("openai"))
    assert not matches(dispatcher.read, T.agent_queue("local_a"))


def test_permissions_apply_through_rabbitmqctl_and_match_reply_users() -> None:
    grants = [dispatcher_grant("d", T), agent_grant("g", T, ["local_a", "local_b"])]
    commands = rabbitmqctl_commands("router", grants)
    assert commands[0] == ["rabbitmqctl", "add_vhost", "router"]
    assert commands[-1][:5] == ["rabbitmqctl", "set_topic_permissions", "-p", "router", "g"]
    assert ReplyTrust.parse(reply_users(grants)).may_answer("g", "local_b")


def test_the_shell_script_names_its_namespace_and_quotes_reply_users() -> None:
    grants = [dispatcher_grant("d", T), agent_grant("g", T, ["local_a", "local_b"])]
    script = shell_script("router", grants, made_for="BROKER_NAMESPACE=router, DURABILITY=durable")
    assert "# For BROKER_NAMESPACE=router, DURABILITY=durable:" in script
    line = next(x for x in script.splitlines() if "REPLY_USERS=" in x)
    # Pasted in front of a command, the value must stay one word (`|` unquoted is a pipe).
    value = shlex.split(line.removeprefix("# API and dispatcher: "))[0]
    assert value == f"REPLY_USERS={reply_users(grants)}"


def test_password_hash_is_rabbitmqs_salted_sha256() -> None:
    encoded = password_hash("s3cret", salt=b"\x01\x02\x03\x04")
    raw = base64.b64decode(encoded)
    assert raw[:4] == b"\x01\x02\x03\x04"
    assert raw[4:] == hashlib.sha256(b"\x01\x02\x03\x04" + b"s3cret").digest()
    # A password with a '-' cannot turn up by chance in a base64 hash (a random salt once
    # made "pw" appear in one).
    document = definitions("router", [agent_grant("g", T, ["local_a"])], {"g": "pass-word"})
    assert "pass-word" not in str(document)  # only the hash is written


def test_cache_keys_name_their_model_for_the_writers_check() -> None:
    policy = CachePolicy(prefix="router:cache:v1", ttl=60)
    key = cache_key({"model": "local_a", "messages": []}, tenant="t", policy=policy)
    assert policy.model_of(key) == "local_a"
    odd = cache_key({"model": "gpt 4 ☃", "messages": []}, tenant="t", policy=policy)
    tag = policy.model_of(odd)
    assert tag is not None and tag.startswith("_h")  # hashed: cannot be an agent model
