"""RabbitMQ permissions for least-privilege broker users, derived from the topology (pure).

RabbitMQ grants each user three regular expressions per vhost, matched against queue and
exchange names: `configure` (declare, delete), `write` (publish to an exchange, bind a queue)
and `read` (consume a queue, bind from an exchange). Passive declares need none. Topic
permissions further limit the routing keys a user may publish with to a topic exchange.

Roles (see docs/security.md):
- admin: everything in the vhost; runs `router topology` once.
- api: its own reply queue; publishes jobs and RPCs (default exchange), cancels, control.
- dispatcher: consumes the shared queues; hands jobs to agent and provider queues; replies.
- agent: consumes only its models' queues; publishes only replies (the replies exchange, where
  its `user_id` is checked by the API), cache events, and counted copies of its own jobs.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
from dataclasses import dataclass
from typing import Any

from shared.topology import MODEL_NAME_RE, Topology, cancel_routing_key

# Process ids are 12 hex digits (uuid4().hex[:12]) in every private queue name.
_ID = r"[0-9a-f]{12}"
NOTHING = "^$"


@dataclass(frozen=True)
class Permission:
    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class TopicPermission:
    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class Grant:
    """What one broker user may do in the vhost."""

    user: str
    role: str
    permission: Permission
    topics: tuple[TopicPermission, ...] = ()
    models: tuple[str, ...] = ()  # agents only


def _names(*alternatives: str) -> str:
    return "^(" + "|".join(alternatives) + ")$"


def admin_grant(user: str) -> Grant:
    return Grant(user, "admin", Permission(".*", ".*", ".*"))


def api_grant(user: str, t: Topology) -> Grant:
    p = re.escape(t.prefix)
    reply = rf"{p}\.reply\.{_ID}"
    return Grant(
        user,
        "api",
        Permission(
            configure=_names(reply),
            write=_names(r"amq\.default", rf"{p}\.cancels", rf"{p}\.control", reply),
            read=_names(rf"{p}\.replies", reply),
        ),
    )


def dispatcher_grant(user: str, t: Topology) -> Grant:
    p = re.escape(t.prefix)
    private = rf"{p}\.(control|cancel)\.{_ID}"
    return Grant(
        user,
        "dispatcher",
        Permission(
            configure=_names(private),
            write=_names(
                r"amq\.default",  # jobs into agent and provider queues
                rf"{p}\.replies",
                rf"{p}\.completed",
                rf"{p}\.requeue",
                private,
            ),
            read=_names(
                rf"{p}\.(jobs|rpc|returns|completed)",
                rf"{p}\.provider\..+",
                rf"{p}\.(control|cancels)",
                private,
            ),
        ),
    )


def agent_grant(user: str, t: Topology, models: list[str]) -> Grant:
    if not models:
        raise ValueError(f"agent user {user!r} needs at least one model")
    bad = [m for m in models if not MODEL_NAME_RE.fullmatch(m)]
    if bad:
        raise ValueError(f"model names not allowed in queue names: {bad}")
    p = re.escape(t.prefix)
    own = "(" + "|".join(re.escape(m) for m in models) + ")"
    own_queues = rf"{p}\.agent\.{own}"
    # Counted copies go to each model's own requeue exchange, bound to that queue alone: an
    # exchange the agent may declare (its cancel queue's name fits one too) and bind to those
    # reaches nothing else (no write on the shared `requeue`, which routes to every queue).
    own_requeues = rf"{p}\.requeue\.agent\.{own}"
    cancel = rf"{p}\.cancel\.{_ID}"
    return Grant(
        user,
        "agent",
        Permission(
            configure=_names(cancel),
            write=_names(rf"{p}\.replies", rf"{p}\.completed", own_requeues, cancel),
            read=_names(own_queues, rf"{p}\.cancels", cancel),
        ),
        topics=(
            # Cancels are routed by model: it may bind (hear) only its own models' keys.
            TopicPermission(
                t.cancel_exchange,
                write=NOTHING,
                read=_names(*(re.escape(cancel_routing_key(m)) for m in models)),
            ),
        ),
        models=tuple(models),
    )


def reply_users(grants: list[Grant]) -> str:
    """The REPLY_USERS value matching these grants."""
    entries = [f"{g.user}=*" for g in grants if g.role == "dispatcher"]
    entries += [f"{g.user}={'|'.join(g.models)}" for g in grants if g.role == "agent"]
    return ",".join(entries)


def rabbitmqctl_commands(vhost: str, grants: list[Grant]) -> list[list[str]]:
    """The `rabbitmqctl` calls that apply the grants (users must exist: `add_user`)."""
    commands = [["rabbitmqctl", "add_vhost", vhost]]
    for g in grants:
        perm = g.permission
        target = ["-p", vhost, g.user]
        commands.append(["rabbitmqctl", "set_permissions", *target, *_triple(perm)])
        for topic in g.topics:
            triple = (topic.exchange, topic.write, topic.read)
            commands.append(["rabbitmqctl", "set_topic_permissions", *target, *triple])
    return commands


def _triple(perm: Permission) -> tuple[str, str, str]:
    return perm.configure, perm.write, perm.read


def shell_script(vhost: str, grants: list[Grant], *, made_for: str = "") -> str:
    """The rabbitmqctl commands; `made_for` names the namespace and durability mode whose
    names the grants' patterns match (grants for another pair match nothing)."""
    lines = [
        "# Broker users for the router (run where rabbitmqctl reaches the broker).",
        "# Create each user first: rabbitmqctl add_user <user> <password>",
    ]
    if made_for:
        lines.append(f"# For {made_for}: the patterns match only that pair's names.")
    lines += [shlex.join(command) for command in rabbitmqctl_commands(vhost, grants)]
    # Quoted: the value holds `|`, which a shell would take for a pipe.
    lines.append(f"# API and dispatcher: REPLY_USERS={shlex.quote(reply_users(grants))}")
    return "\n".join(lines) + "\n"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def definitions(vhost: str, grants: list[Grant], passwords: dict[str, str]) -> dict[str, Any]:
    """A RabbitMQ definitions document (`load_definitions`, `rabbitmqctl import_definitions`)
    creating the vhost, the users with these passwords, and their permissions."""
    return {
        "vhosts": [{"name": vhost}],
        "users": [
            {
                "name": g.user,
                "password_hash": password_hash(passwords[g.user]),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"] if g.role == "admin" else [],
            }
            for g in grants
        ],
        "permissions": [
            {
                "user": g.user,
                "vhost": vhost,
                "configure": g.permission.configure,
                "write": g.permission.write,
                "read": g.permission.read,
            }
            for g in grants
        ],
        "topic_permissions": [
            {
                "user": g.user,
                "vhost": vhost,
                "exchange": topic.exchange,
                "write": topic.write,
                "read": topic.read,
            }
            for g in grants
            for topic in g.topics
        ],
    }
