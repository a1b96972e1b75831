"""Registration and heartbeats: how the router learns that this agent serves its models.

`POST {ROUTER_URL}/register` once the queue consumers are attached (retried with backoff until
the API accepts it), then `POST /heartbeat` with the models and the current load every
interval, but only while the consumers are attached: every one of them live on the broker, not
merely started (`AgentService.is_attached`). An agent that cannot take jobs must drop out of
the registry after the TTL instead of attracting them.

A refused token (401 or 403, at registration or on a heartbeat) ends both: no retry changes
it, and an agent the registry will never list must not go on taking its models' jobs from
their shared queues either. The error ends the heartbeat task, and with it the agent
(`AgentService.serve`), which exits non-zero. So does a registration whose payload the API
refuses (400, 413, 422): the same payload is refused again. Any other failure is retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx

from shared.messages import AgentHeartbeat, AgentRegistration

log = logging.getLogger(__name__)


def next_backoff(current: float, *, cap: float) -> float:
    return min(cap, current * 2)


class RegistrationRefusedError(Exception):
    """The API refused the agent's request (a 4xx); retrying may not help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class AgentTokenRefusedError(RegistrationRefusedError):
    """The API refused the agent's token (401 or 403): AGENT_TOKEN is missing, wrong, revoked,
    or not this AGENT_NAME's."""


TOKEN_REFUSALS = (401, 403)
# The API refused the registration itself: sent again, it is refused again.
PAYLOAD_REFUSALS = (400, 413, 422)


def _reason(error: Exception) -> str:
    if isinstance(error, (httpx.HTTPError, RegistrationRefusedError)):
        return str(error)
    return f"{type(error).__name__}: {error}"  # unexpected: its type says what went wrong


class Registrar:
    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        router_url: str,
        token: str,
        registration: AgentRegistration,
        interval: float,
        is_attached: Callable[[], bool],
        load: Callable[[], float],
        first_backoff: float = 0.5,
        max_backoff: float = 10.0,
    ) -> None:
        self._client = client
        self._router_url = router_url.rstrip("/")
        self._headers = {"authorization": f"Bearer {token}"}
        self.registration = registration
        self.interval = interval
        self._is_attached = is_attached
        self._load = load
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self.registered = asyncio.Event()
        self.heartbeats_sent = 0

    async def run(self) -> None:
        """Register, then heartbeat until cancelled."""
        await self.register()
        await self.heartbeat_forever()

    async def register(self) -> None:
        delay = self._first_backoff
        while True:
            if self._is_attached():
                try:
                    await self._post("/register", self.registration.to_json())
                    self.registered.set()
                    log.info(
                        "registered as %s serving %s",
                        self.registration.name,
                        ", ".join(self.registration.models),
                    )
                    return
                except AgentTokenRefusedError as e:
                    log.error("registration refused (%s): check AGENT_TOKEN and AGENT_NAME", e)
                    raise
                except Exception as e:  # any failure, not only httpx's: the loop must go on
                    if isinstance(e, RegistrationRefusedError) and e.status in PAYLOAD_REFUSALS:
                        log.error("registration refused (%s): the API will not list this agent", e)
                        raise
                    log.warning("registration failed (%s); retrying in %.1fs", _reason(e), delay)
            await asyncio.sleep(delay)
            delay = next_backoff(delay, cap=self._max_backoff)

    async def heartbeat_forever(self) -> None:
        """Heartbeats start `interval` apart, however long each takes: timed from the end of
        the last, one slow answer (up to the 5 s timeout) would stretch a gap past the TTL."""
        loop = asyncio.get_running_loop()
        paused = False
        next_at = loop.time() + self.interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += self.interval
            if next_at < loop.time():  # the loop slept long past its time: no catching up
                next_at = loop.time() + self.interval
            if not self._is_attached():
                if not paused:
                    log.warning("queue consumers detached: heartbeats paused")
                paused = True
                continue
            if paused:
                log.info("queue consumers attached again: heartbeats resumed")
                paused = False
            await self.heartbeat()

    async def heartbeat(self) -> bool:
        """One heartbeat; False (logged) if it failed, for any reason but a refused token
        (raised): the transport lets some of aiohttp's errors through (a malformed reply), and
        a loop they ended would let the agent drop out of the registry while it still looks
        ready."""
        try:
            message = AgentHeartbeat(
                name=self.registration.name,
                instance=self.registration.instance,
                models=self.registration.models,
                load=self._load(),
            )
            await self._post("/heartbeat", message.to_json())
        except AgentTokenRefusedError as e:
            log.error("heartbeat refused (%s): check AGENT_TOKEN and AGENT_NAME", e)
            raise
        except Exception as e:
            log.warning("heartbeat failed: %s", _reason(e))
            return False
        self.heartbeats_sent += 1
        return True

    async def leave(self, timeout: float = 2.0) -> None:
        """Tell the router this agent is stopping, so dispatchers stop routing its models' jobs
        to it now rather than one TTL after its last heartbeat. Best effort, bounded: a router
        that does not answer lets the agent go after the TTL, as before."""
        if not self.registered.is_set():
            return
        message = AgentHeartbeat(
            name=self.registration.name, instance=self.registration.instance, leaving=True
        )
        try:
            async with asyncio.timeout(timeout):
                await self._post("/heartbeat", message.to_json())
        except Exception as e:  # any failure (an api stopping too, as in `router dev`)
            log.info(
                "could not tell the router this agent is leaving (%s): dispatchers let it go "
                "after HEARTBEAT_TTL",
                _reason(e),
            )
            return
        log.info("left the registry: no more jobs are routed to this agent")

    async def _post(self, path: str, body: bytes) -> None:
        response = await self._client.post(
            f"{self._router_url}{path}",
            content=body,
            headers={**self._headers, "content-type": "application/json"},
            timeout=5.0,
        )
        if response.status_code >= 400:
            # The API answers OpenAI error objects; their message says what is wrong.
            text = response.text[:300]
            status = response.status_code
            if status in TOKEN_REFUSALS:
                raise AgentTokenRefusedError(f"{path} answered {status}: {text}", status)
            if status < 500:
                raise RegistrationRefusedError(f"{path} answered {status}: {text}", status)
            raise httpx.HTTPStatusError(
                f"{path} answered {response.status_code}",
                request=response.request,
                response=response,
            )
