"""Whether the inference server is up, judged from its `/health` checks (pure; no I/O).

An agent whose server died must stop taking its models' jobs: it would answer them 502 while
healthy agents of the same models wait. `AgentService` checks `/health` every
HEARTBEAT_INTERVAL and stops consuming while this says the server is down (its heartbeats
pause with the consumers, so the registry lets it go), and consumes again once it is up.
"""

from __future__ import annotations


class UpstreamHealth:
    """Down once `failures` checks in a row failed (one failure may be a blip, such as a slow
    answer under load); up again at the first check that passes."""

    def __init__(self, failures: int = 2) -> None:
        self.failures = failures
        self._failed = 0  # checks failed in a row

    @property
    def healthy(self) -> bool:
        return self._failed < self.failures

    def record(self, passed: bool) -> bool:
        """Count one check; returns whether the server counts as healthy now."""
        self._failed = 0 if passed else self._failed + 1
        return self.healthy
