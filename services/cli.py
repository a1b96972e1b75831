"""The `router` command: one entry point for every service and tool.

router api | dispatcher | agent     run one service (configured by environment variables)
router dev                          every service, on local defaults, one log stream
router fake-vllm | fake-openai      the fake upstream servers shipped for tests and dev
router topology                     declare the shared broker topology (admin, once)
router broker-acl                   print least-privilege broker permissions per service/agent
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _api(argv: list[str]) -> None:
    from services.api.__main__ import main

    main()


def _dispatcher(argv: list[str]) -> None:
    from services.dispatcher.__main__ import main

    main()


def _agent(argv: list[str]) -> None:
    from services.agent.__main__ import main

    main()


def _dev(argv: list[str]) -> None:
    from services.devstack import main

    main(argv)


def _fake_vllm(argv: list[str]) -> None:
    from fakes.vllm import main

    main(argv)


def _fake_openai(argv: list[str]) -> None:
    from fakes.openai import main

    main(argv)


def _topology(argv: list[str]) -> None:
    from services.admin import topology_main

    topology_main(argv)


def _broker_acl(argv: list[str]) -> None:
    from services.admin import broker_acl_main

    broker_acl_main(argv)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "api": _api,
    "dispatcher": _dispatcher,
    "agent": _agent,
    "dev": _dev,
    "fake-vllm": _fake_vllm,
    "fake-openai": _fake_openai,
    "topology": _topology,
    "broker-acl": _broker_acl,
}


# Configured by the environment alone: any argument is a mistake, and `--help` must not start
# a service (on a production host it would join the live namespace and take jobs).
NO_ARGUMENTS = ("api", "dispatcher", "agent", "dev")
HELP = ("-h", "--help")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        if args and args[0] in HELP:
            print(__doc__)
            sys.exit(0)
        print(__doc__, file=sys.stderr)
        said = f"unknown command {args[0]!r}" if args else "a command is needed"
        print(f"router: {said}", file=sys.stderr)
        sys.exit(2)
    command, rest = args[0], args[1:]
    if command in NO_ARGUMENTS and rest:
        usage = (
            f"usage: router {command}\n"
            "Takes no arguments: it is configured by environment variables "
            "(README.md, Configuration)."
        )
        if rest[0] in HELP:
            print(usage)
            sys.exit(0)
        print(f"{usage}\nrouter {command}: unexpected argument {rest[0]!r}", file=sys.stderr)
        sys.exit(2)
    COMMANDS[command](rest)


if __name__ == "__main__":
    main()
