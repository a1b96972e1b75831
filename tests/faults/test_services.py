"""Router processes fail: dispatchers and agents killed or frozen, an inference server down or
hung, no dispatcher at all for longer than a request's deadline."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from tests.faults.harness.crashing import CRASH_EXIT_CODE
from tests.faults.harness.load import GRACE, Ledger, LoadGenerator, send, wait_full_service
from tests.faults.harness.router import LOCAL, FaultRouter
from tests.support.procs import wait_for

RouterFactory = Callable[..., FaultRouter]
IDLE = 3.0  # conftest BASE_ENV's STREAM_IDLE_TIMEOUT


def timeouts(seconds: float) -> dict[str, str]:
    return {"REQUEST_TIMEOUT": str(seconds), "TTFT_TIMEOUT": str(seconds)}


async def burst(
    router: FaultRouter, count: int, *, model: str = LOCAL, timeout: float, stream: bool | None
) -> Ledger:
    """`count` concurrent requests (all JSON, all streams, or alternating when None)."""
    ledger = Ledger()
    async with httpx.AsyncClient(base_url=router.api, timeout=None) as http:
        await asyncio.gather(
            *(
                send(
                    http,
                    ledger,
                    model=model,
                    stream=(i % 2 == 1) if stream is None else stream,
                    timeout=timeout,
                )
                for i in range(count)
            )
        )
    return ledger


# --- dispatchers ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_dispatcher_kill9_mid_job(make_router: RouterFactory) -> None:
    """One of two dispatchers is killed while its provider workers hold calls to a (slow) fake
    OpenAI: the jobs it held go back to the queue and the other dispatcher answers them."""
    router = make_router(**timeouts(20))
    # One fake OpenAI per dispatcher, so the test knows the doomed one holds calls when it
    # is killed (the provider queue hands jobs to either dispatcher).
    fakes = [await asyncio.to_thread(router.fake_openai, "--latency", "1.5") for _ in range(2)]
    openai = fakes[0]  # the doomed dispatcher's
    doomed, _ = [
        await asyncio.to_thread(
            router.add_dispatcher, OPENAI_API_KEY="sk-fake", OPENAI_BASE_URL=f"{fake.url}/v1"
        )
        for fake in fakes
    ]
    await asyncio.to_thread(router.add_api)
    ledger = Ledger()
    models = ["dummy", "gpt-4o-mini"]
    async with httpx.AsyncClient(base_url=router.api, timeout=None) as http:
        load = LoadGenerator(http, ledger, models=models, timeout=20, concurrency=8).start()
        await asyncio.to_thread(
            wait_for, lambda: openai.stats()["in_flight"] >= 2, timeout=15, message="no calls"
        )
        doomed.kill()
        killed = time.monotonic()
        await asyncio.sleep(4.0)
        await load.stop()
    # Streams the dead dispatcher had started end with an error event; nothing else may fail.
    router.check(ledger, allowed_errors=())
    in_flight = [e for e in ledger.entries if e.sent < killed < (e.finished or 0)]
    assert any(e.model == "gpt-4o-mini" and e.outcome == "ok" for e in in_flight), ledger.summary()
    assert openai.stats()["aborted"] >= 1, "the kill did not interrupt any provider call"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_dispatcher_dies_after_replying_before_acking(
    make_router: RouterFactory, stream: bool
) -> None:
    """The dispatcher answers, the broker confirms the reply, the process dies before its ack:
    the job is delivered again and answered again, and the API drops the second answer."""
    router = make_router(**timeouts(15))
    crashing = await asyncio.to_thread(
        router.add_crashing_dispatcher, FAULTS_CRASH_AFTER_REPLIES="1"
    )
    await asyncio.to_thread(router.add_api)
    first = await burst(router, 1, model="dummy", timeout=15, stream=stream)
    router.check(first, allowed_errors=())
    assert first.entries[0].text == "Hello world"
    request_id = first.entries[0].request_id
    assert request_id
    code = await asyncio.to_thread(crashing.process.wait, 15)  # type: ignore[union-attr]
    assert code == CRASH_EXIT_CODE
    assert router.queue("jobs") == (1, 0), "the unacked job did not go back to its queue"

    survivor = await asyncio.to_thread(router.add_dispatcher)
    await asyncio.to_thread(
        wait_for, lambda: request_id in survivor.log(), timeout=20, message="not redelivered"
    )
    await asyncio.to_thread(
        wait_for, lambda: router.queue("jobs") == (0, 1), timeout=10, message="job not acked"
    )
    after = await burst(router, 4, model="dummy", timeout=15, stream=None)
    router.check(after, allowed_errors=())
    assert all(e.text == "Hello world" for e in after.entries)


@pytest.mark.timeout(120)
async def test_no_dispatcher_for_longer_than_the_deadline(make_router: RouterFactory) -> None:
    """No dispatcher runs for longer than the requests' deadline: they end 504 on time, and
    the expired jobs never reach an inference server once a dispatcher is back."""
    deadline = 3.0
    router = make_router(**timeouts(deadline))
    dispatcher = await asyncio.to_thread(router.add_dispatcher)
    await asyncio.to_thread(router.add_api)
    fake = await asyncio.to_thread(router.fake)
    await asyncio.to_thread(router.agent, "a1", fake.url)
    await asyncio.to_thread(router.wait_listed)
    router.check(await burst(router, 2, timeout=deadline, stream=None), allowed_errors=())
    dispatcher.kill()
    fake.reset()

    orphans = await burst(router, 6, timeout=deadline, stream=None)
    router.check(orphans, allowed_errors=(504,))
    assert all(e.status == 504 for e in orphans.entries), orphans.summary()

    await asyncio.to_thread(router.add_dispatcher)
    await asyncio.to_thread(router.wait_listed)
    await asyncio.sleep(2.0)
    assert fake.stats()["requests"] == 0, "an expired job was sent to the inference server"
    assert router.queue("jobs") == (0, 1)
    router.check(await burst(router, 2, timeout=10, stream=None), allowed_errors=())
    assert fake.stats()["requests"] == 2


# --- agents --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "before-first-chunk"])
async def test_agent_kill9_mid_job(make_router: RouterFactory, stream: bool) -> None:
    """An agent is killed while it holds jobs (a JSON answer not sent, a stream before its first
    chunk): they go back to the model's queue and the other agent completes them."""
    router = make_router(**timeouts(20))
    await asyncio.to_thread(router.add_dispatcher)
    await asyncio.to_thread(router.add_api)
    slow = await asyncio.to_thread(router.fake, "--latency", "5")
    fast = await asyncio.to_thread(router.fake)
    doomed = await asyncio.to_thread(router.agent, "a1", slow.url)
    await asyncio.to_thread(router.agent, "a2", fast.url)
    await asyncio.to_thread(router.wait_listed)

    async with httpx.AsyncClient(base_url=router.api, timeout=None) as http:
        ledger = Ledger()
        requests = [
            asyncio.create_task(send(http, ledger, model=LOCAL, stream=stream, timeout=20))
            for _ in range(6)
        ]
        await asyncio.to_thread(
            wait_for, lambda: slow.stats()["in_flight"] >= 1, timeout=15, message="a1 idle"
        )
        doomed.service.kill()
        await asyncio.gather(*requests)
    router.check(ledger, allowed_errors=())
    assert slow.stats()["completed"] == 0
    assert fast.stats()["completed"] == 6


@pytest.mark.timeout(120)
async def test_agent_frozen_mid_stream(make_router: RouterFactory) -> None:
    """An agent frozen (SIGSTOP) mid-stream: the client gets an error event within the stream
    idle limit; once the agent thaws, the cancel makes it abort the upstream call."""
    router = make_router(**timeouts(30))
    await asyncio.to_thread(router.add_dispatcher)
    await asyncio.to_thread(router.add_api)
    fake = await asyncio.to_thread(router.fake, "--tokens", "80", "--token-rate", "4")
    agent = await asyncio.to_thread(router.agent, "a1", fake.url)
    await asyncio.to_thread(router.wait_listed)

    body = {"model": LOCAL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    raw = b""
    async with (
        httpx.AsyncClient(base_url=router.api, timeout=None) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        chunks = response.aiter_raw()
        while b'"content":"' not in raw:  # the first content chunk is out
            raw += await anext(chunks)
        agent.service.signal(signal.SIGSTOP)
        frozen = time.monotonic()
        async with asyncio.timeout(IDLE + GRACE + 5):
            async for piece in chunks:
                raw += piece
        ended = time.monotonic()
    agent.service.signal(signal.SIGCONT)
    last = raw.strip().split(b"\n\n")[-1]
    assert last.startswith(b'data: {"error":'), last[:200]
    assert b"[DONE]" not in raw
    assert ended - frozen <= IDLE + GRACE, f"error event after {ended - frozen:.1f}s"
    await asyncio.to_thread(
        wait_for, lambda: fake.stats()["aborted"] >= 1, timeout=15, message="upstream not aborted"
    )
    fresh = await burst(router, 2, timeout=30, stream=None)
    router.check(fresh, allowed_errors=())


@pytest.mark.timeout(150)
async def test_inference_server_down_or_hung_behind_an_agent(make_router: RouterFactory) -> None:
    """The agent's inference server refuses connections (down), then accepts and never answers
    (hung), then comes back: prompt 502s, then 504s at the deadline, then full service."""
    deadline = 6.0
    # The down burst must reach the agent before its second failed /health check detaches it
    # (from then on its jobs wait, and end 504): checks 1.5 s apart give the burst 1.5-3 s,
    # not 0.5-1 s, which a slow host once missed. The TTL keeps its margin over the interval.
    router = make_router(**timeouts(deadline), HEARTBEAT_TTL="6")
    await asyncio.to_thread(router.add_dispatcher)
    await asyncio.to_thread(router.add_api)
    fake = await asyncio.to_thread(router.fake)
    proxy = router.proxy(int(fake.url.rsplit(":", 1)[1]))
    await asyncio.to_thread(router.agent, "a1", f"http://{proxy.address}", HEARTBEAT_INTERVAL="1.5")
    await asyncio.to_thread(router.wait_listed)
    router.check(await burst(router, 2, timeout=deadline, stream=None), allowed_errors=())

    proxy.refuse = True
    proxy.reset_all()
    down = await burst(router, 6, timeout=deadline, stream=None)
    router.check(down, allowed_errors=(502,))
    assert all(e.status == 502 for e in down.entries), down.summary()
    slow = [e.describe() for e in down.entries if (e.latency or 0) > 3.0]
    assert not slow, "a down server must fail fast:\n" + "\n".join(slow)

    proxy.refuse = False
    proxy.blackhole = True
    hung = await burst(router, 4, timeout=deadline, stream=None)
    router.check(hung, allowed_errors=(504,))

    proxy.heal()
    proxy.reset_all()
    async with httpx.AsyncClient(base_url=router.api, timeout=None) as http:
        await wait_full_service(http, models=[LOCAL], since=time.monotonic(), within=15)
