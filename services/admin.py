"""Operator commands for a least-privilege broker (docs/security.md).

router topology [--agent-model M ...]
    Declare the shared exchanges and queues, every provider queue and the named agent
    models' queues, with RABBITMQ_URL's (admin) user. Idempotent; run once per namespace and
    durability mode, and again when an agent pool gets a new model. Services then run with
    DECLARE_TOPOLOGY=false and only check that these exist.

router broker-acl --api USER --dispatcher USER --agent USER=model1|model2 ... [--vhost V]
    Print the permissions (rabbitmqctl commands) for one broker user per service and per agent
    pool, and the matching REPLY_USERS. `--format definitions --password USER=PW ...` prints a
    RabbitMQ definitions file with the users instead (for `load_definitions`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys

from shared.amqp import Broker
from shared.broker_acl import (
    Grant,
    admin_grant,
    agent_grant,
    api_grant,
    definitions,
    dispatcher_grant,
    shell_script,
)
from shared.errors import BrokerUnavailableError
from shared.messages import LOCAL_MODEL_PATTERN
from shared.runner import StartupError
from shared.settings import BrokerSettings, load_settings
from shared.topology import (
    broker_refusals_stop_start,
    declare_topology,
    declare_work_queue,
    topology_for,
)

TOPOLOGY_HELP = (
    "Declare the shared exchanges and queues, every provider queue and the named agent "
    "models' queues, with RABBITMQ_URL's (admin) user. Idempotent: run it once per namespace "
    "and durability mode, and again when an agent pool gets a new model."
)
BROKER_ACL_HELP = (
    "Print the permissions (rabbitmqctl commands) for one broker user per service and per "
    "agent pool, and the matching REPLY_USERS; or, with --format definitions, a RabbitMQ "
    "definitions file with the users (docs/security.md)."
)


async def declare_all(
    settings: BrokerSettings, agent_models: list[str], providers: list[str]
) -> list[str]:
    """Declare everything the services expect; returns the work queues declared."""
    t = topology_for(settings)
    broker = Broker(settings.rabbitmq_url, name="router-topology", publish_timeout=5.0)
    await broker.connect()
    try:
        # A user without rights: one line, not a traceback.
        with broker_refusals_stop_start(
            "`router topology` declares every shared name: run it as the vhost's administrator"
        ):
            channel = await broker.channel()
            await declare_topology(channel, t)
            specs = [t.provider_queue_spec(p) for p in providers]
            specs += [t.agent_queue_spec(m) for m in agent_models]
            for spec in specs:
                await declare_work_queue(channel, t, spec)
            return [spec.name for spec in specs]
    finally:
        await broker.close()


def check_agent_models(parser: argparse.ArgumentParser, models: list[str]) -> None:
    """Agent queues are named after the router's ids of their models (`local_x`, as
    /v1/models lists them): a queue for any other name would never be consumed."""
    for model in models:
        if not re.match(LOCAL_MODEL_PATTERN, model):
            parser.error(f"{model!r} is not a router model id of an agent (such as local_{model})")


def topology_main(argv: list[str]) -> None:
    from services.dispatcher.providers.routes import KNOWN_PROVIDERS

    known = ", ".join(sorted(KNOWN_PROVIDERS))
    parser = argparse.ArgumentParser(prog="router topology", description=TOPOLOGY_HELP)
    parser.add_argument(
        "--agent-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="declare this agent model's queue too (repeatable)",
    )
    parser.add_argument(
        "--provider",
        action="append",
        choices=sorted(KNOWN_PROVIDERS),
        metavar="NAME",
        help=f"only these provider queues (repeatable; default: all: {known})",
    )
    args = parser.parse_args(argv)
    check_agent_models(parser, args.agent_model)
    settings = load_settings(BrokerSettings, "topology")
    # aiormq logs a failed connect itself; the command's own last line says it, once.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
    providers = args.provider or sorted(KNOWN_PROVIDERS)
    try:
        names = asyncio.run(declare_all(settings, args.agent_model, providers))
    except ValueError as e:  # a model name that cannot name a queue
        parser.error(str(e))
    except BrokerUnavailableError as e:
        parser.exit(1, f"router topology: {e.message}\n")
    except StartupError as e:  # refused: a user without rights, a queue with other arguments
        parser.exit(1, f"router topology: {e}\n")
    t = topology_for(settings)
    print(f"declared the shared topology {t.prefix}.* and: {', '.join(names)}")


def _pair(text: str) -> tuple[str, str]:
    user, sep, value = text.partition("=")
    if not sep or not user or not value:
        raise argparse.ArgumentTypeError(f"expected USER=VALUE, got {text!r}")
    return user, value


def acl_grants(args: argparse.Namespace, settings: BrokerSettings) -> list[Grant]:
    t = topology_for(settings)
    grants = [admin_grant(user) for user in args.admin]
    grants += [api_grant(user, t) for user in args.api]
    grants += [dispatcher_grant(user, t) for user in args.dispatcher]
    for user, models in args.agent:
        grants.append(agent_grant(user, t, [m for m in models.split("|") if m]))
    users = [grant.user for grant in grants]
    twice = sorted({user for user in users if users.count(user) > 1})
    if twice:
        # RabbitMQ keeps one permission set per user: the last would silently replace the rest.
        raise ValueError(f"a broker user may have one role and one --agent entry: {twice}")
    return grants


def broker_acl_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="router broker-acl", description=BROKER_ACL_HELP)
    parser.add_argument("--vhost", default="router", help="the vhost (default: %(default)s)")
    roles = {
        "admin": "a user with every right in the vhost, to run `router topology` (repeatable)",
        "api": "a broker user for api processes (repeatable)",
        "dispatcher": "a broker user for dispatchers (repeatable)",
    }
    for role, text in roles.items():
        parser.add_argument(f"--{role}", action="append", default=[], metavar="USER", help=text)
    parser.add_argument(
        "--agent",
        action="append",
        default=[],
        type=_pair,
        metavar="USER=MODEL|MODEL",
        help="a broker user for an agent pool and the models it serves (repeatable)",
    )
    parser.add_argument(
        "--format",
        choices=("shell", "definitions"),
        default="shell",
        help="rabbitmqctl commands or a definitions file (default: %(default)s)",
    )
    parser.add_argument(
        "--password",
        action="append",
        default=[],
        type=_pair,
        metavar="USER=PW",
        help="a user's password, for --format definitions (repeatable)",
    )
    args = parser.parse_args(argv)
    check_agent_models(parser, [m for _, models in args.agent for m in models.split("|") if m])
    settings = load_settings(BrokerSettings, "broker-acl")
    try:
        grants = acl_grants(args, settings)
    except ValueError as e:
        parser.error(str(e))
    if args.format == "shell":
        made_for = (
            f"BROKER_NAMESPACE={settings.broker_namespace}, DURABILITY={settings.durability.value}"
        )
        sys.stdout.write(shell_script(args.vhost, grants, made_for=made_for))
        return
    passwords = dict(args.password)
    missing = [g.user for g in grants if g.user not in passwords]
    if missing:
        parser.error(f"--format definitions needs --password for {', '.join(missing)}")
    print(json.dumps(definitions(args.vhost, grants, passwords), indent=2))
