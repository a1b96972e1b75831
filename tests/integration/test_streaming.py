"""Streaming edge cases through an agent: keep-alives, deadlines before the first chunk, and
cancellation of a job that is still waiting in its queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import require_services
from tests.integration.conftest import STACK_ENV, sdk_client
from tests.support.procs import running_stack, wait_for
from tests.support.rig import MESSAGES, Router

pytestmark = pytest.mark.integration


@pytest.fixture
def slow_first_chunk(tmp_path: Path) -> Iterator[Router]:
    """An API that commits to 200 after 1 s without output and gives up after 4 s."""
    require_services()
    env = {
        **STACK_ENV,
        "STREAM_KEEPALIVE_AFTER": "1",
        "TTFT_TIMEOUT": "4",
        "STREAM_IDLE_TIMEOUT": "3",
    }
    with running_stack(env) as stack:
        router = Router(stack, tmp_path, [])
        router.add_dispatcher()
        router.add_api()
        yield router


def stream_raw(api: str, model: str) -> tuple[int, float, bytes]:
    status, committed, _, raw = stream_timed(api, model)
    return status, committed, raw


def stream_timed(api: str, model: str) -> tuple[int, float, float, bytes]:
    """The status, when the headers came and when the first body bytes did, and the body."""
    body = {"model": model, "messages": MESSAGES, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", f"{api}/v1/chat/completions", json=body, timeout=20) as response:
        committed = time.monotonic() - started
        pieces = response.iter_raw()
        first = next(pieces, b"")
        first_bytes = time.monotonic() - started
        return response.status_code, committed, first_bytes, first + b"".join(pieces)


def test_a_slow_first_chunk_commits_early_and_pings(slow_first_chunk: Router) -> None:
    router = slow_first_chunk
    fake = router.fake("--latency", "2.5", "--tokens", "3")
    router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    status, committed, first_bytes, raw = stream_timed(router.api, "local_m")
    assert status == 200
    assert committed >= 0.8  # not before STREAM_KEEPALIVE_AFTER (1 s): the status was kept free
    assert raw.startswith(b": ping\n\n")  # the headers left before the model's first token
    # ... and the ping with them, not a ping interval later (proxies time out the first byte)
    assert first_bytes - committed < 0.5
    assert raw.endswith(b"data: [DONE]\n\n")
    with sdk_client(router.api) as client:  # the SDK skips comments and validates the rest
        chunks = list(
            client.chat.completions.create(model="local_m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_no_first_chunk_by_the_ttft_limit_ends_with_an_error_event(
    slow_first_chunk: Router,
) -> None:
    router = slow_first_chunk
    fake = router.fake("--latency", "8", "--tokens", "3")
    router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    status, _, raw = stream_raw(router.api, "local_m")
    assert status == 200  # committed at 1 s by the keep-alive
    # The model's first token comes at 8 s, within the 20 s deadline: an error event instead of
    # [DONE] is the 4 s TTFT limit's.
    assert b"[DONE]" not in raw
    last = raw.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: ")
    assert orjson.loads(last[len(b"data: ") :])["error"]["code"] == "timeout"
    wait_for(lambda: fake.stats()["aborted"] >= 1, timeout=5, message="upstream never aborted")


def test_no_first_chunk_before_commit_is_a_504(router: Router) -> None:
    """With the keep-alive later than the TTFT limit, the status is still free: a real 504."""
    router.add_api(STREAM_KEEPALIVE_AFTER="10", TTFT_TIMEOUT="1.5")
    fake = router.fake("--latency", "6", "--tokens", "3")
    router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m", timeout=8)
    body = {"model": "local_m", "messages": MESSAGES, "stream": True}
    response = httpx.post(f"{router.apis[-1]}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"


def test_a_job_whose_client_left_while_queued_never_runs(router: Router) -> None:
    fake = router.fake("--tokens", "30", "--token-rate", "15")  # a 2-second stream
    router.agent("a1", fake, AGENT_MODELS="local_m", AGENT_CONCURRENCY="1")
    router.wait_listed("local_m")

    def occupy() -> None:  # takes the agent's only slot for ~2 s
        stream_raw(router.api, "local_m")

    busy = threading.Thread(target=occupy)
    busy.start()
    wait_for(lambda: fake.stats()["in_flight"] == 1, timeout=5, message="first job never ran")
    with pytest.raises(httpx.ReadTimeout):  # this client gives up while its job is queued
        httpx.post(
            f"{router.api}/v1/chat/completions",
            json={"model": "local_m", "messages": MESSAGES},
            timeout=httpx.Timeout(5, read=0.5),
        )
    busy.join(10)
    time.sleep(1.5)  # the agent is free again: a job still live would run now
    stats = fake.stats()
    assert stats["requests"] == 1, stats
    assert stats["completed"] == 1
