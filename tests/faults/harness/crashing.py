"""`python -m tests.faults.harness.crashing`: a real dispatcher with test-only crash hooks.

The hooks live here, in the test tree, and patch the handler before the dispatcher starts, so
the service code carries no test switch at all. Environment:

- `FAULTS_CRASH_AFTER_REPLIES=N`: after the N-th job was answered (its reply confirmed by the
  broker) the process dies at once (`os._exit`), before the consumer acks the job: the broker
  must hand it to another dispatcher, whose second reply the API must drop.
- `FAULTS_EXIT_ON_BODY=MARK`: a job whose body contains MARK kills the process before anything
  is done with it (a message that crashes its consumer every time: a crash loop).
- `FAULTS_RAISE_ON_BODY=MARK`: a job whose body contains MARK makes the handler raise (the
  process lives; the consumer's requeue-once policy decides).
"""

from __future__ import annotations

import os

from services.dispatcher import handler as handler_module
from services.dispatcher.__main__ import main
from shared.amqp import Delivery
from shared.messages import Envelope

CRASH_EXIT_CODE = 70


class HookError(RuntimeError):
    """Raised by the FAULTS_RAISE_ON_BODY hook."""


def install(env: dict[str, str]) -> None:
    original = handler_module.DispatcherHandler.on_job
    after = int(env.get("FAULTS_CRASH_AFTER_REPLIES", "0"))
    exit_mark = env.get("FAULTS_EXIT_ON_BODY", "").encode()
    raise_mark = env.get("FAULTS_RAISE_ON_BODY", "").encode()
    answered = 0

    async def on_job(self: handler_module.DispatcherHandler, env: Envelope, d: Delivery) -> None:
        nonlocal answered
        if exit_mark and exit_mark in env.body:
            os._exit(CRASH_EXIT_CODE)
        if raise_mark and raise_mark in env.body:
            raise HookError("test hook: this job makes the handler fail")
        await original(self, env, d)
        answered += 1
        if after and answered >= after:
            os._exit(CRASH_EXIT_CODE)  # replied and confirmed, not yet acked

    handler_module.DispatcherHandler.on_job = on_job  # type: ignore[method-assign]


if __name__ == "__main__":
    install(dict(os.environ))
    main()
