"""10,000 arbitrary unicode contents through every step that touches a body, in-process.

The path, as the services run it: the API's edge validation (raw bytes kept), the job on the
wire, the dispatcher's cache key, the agent's model rewrite, a fake vLLM that echoes the prompt
(JSON and SSE), the agent's rewrite of the answer and its SSE decoding, and the client's parse.
The same round trip runs through the real processes in tests/integration/test_fuzz.py, for
fewer examples (the whole stack does about a hundred requests a second on a test machine).
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes.core import FakeConfig, Pacing, parse_chat_request, plan_completion
from fakes.vllm import VllmFlavour
from services.agent.bodies import stream_event, with_model
from services.agent.sse import SseDecoder
from services.api.validation import ChatRequestParser
from services.dispatcher.cache_key import CachePolicy, plan_request
from shared.messages import Job, decode_job, encode_job

ROUTER_MODEL, SERVED_MODEL = "local_echo", "echo"
PARSER = ChatRequestParser()
FAKE = VllmFlavour(FakeConfig(models=[SERVED_MODEL], echo=True))
POLICY = CachePolicy(prefix="t:cache:v1", ttl=60)
PACING = Pacing(latency=0.0, token_rate=0.0, tokens=None)


def through_the_router(content: str, *, stream: bool) -> str:
    raw = orjson.dumps(
        {
            "model": ROUTER_MODEL,
            "messages": [{"role": "user", "content": content}],
            "stream": stream,
        }
    )
    # api: validate at the edge, keep the bytes, publish a job
    view = PARSER.parse(raw)
    assert view.body is raw
    job = Job("r1", view.model, "reply.q", deadline=2e9, body=view.body, stream=stream)
    job = decode_job(encode_job(job, now=1e9))
    # dispatcher: the cache key reads the body (it must never fail on one the edge accepted)
    plan_request(job.body, stream=stream, tenant="t", cache_control=None, policy=POLICY)
    # agent -> fake vLLM
    upstream = orjson.loads(with_model(job.body, SERVED_MODEL))
    chat = parse_chat_request(
        upstream, [SERVED_MODEL], model_required=False, strict_stream_options=False
    )
    completion = plan_completion(
        chat,
        FAKE._config,
        PACING,
        completion_id="chatcmpl-1",
        created=1,
        new_tool_call_id=FAKE.tool_call_id,
        format_arguments=FAKE.format_arguments,
    )
    if not stream:
        answer = with_model(FAKE.json_body(completion), job.model)  # agent -> api -> client
        return str(orjson.loads(answer)["choices"][0]["message"]["content"])
    decoder = SseDecoder()
    text = ""
    for _, event in FAKE.stream_events(completion):
        for data in decoder.feed(event):
            relayed = stream_event(data, job.model)
            if relayed.chunk is not None:  # framed `data: {...}\n\n`, as the client reads it
                chunk = orjson.loads(relayed.chunk[len(b"data: ") :])
                text += chunk["choices"][0]["delta"].get("content") or ""
    return text


@pytest.mark.timeout(120)
@given(content=st.text(), stream=st.booleans())
@settings(
    max_examples=10_000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
def test_ten_thousand_unicode_contents_round_trip(content: str, stream: bool) -> None:
    assert through_the_router(content, stream=stream).encode() == content.encode()


def test_the_chain_is_real() -> None:
    """A sanity check of the harness: it echoes, so the property above is not vacuous."""
    assert through_the_router("héllo \x00 wörld 😀", stream=False) == "héllo \x00 wörld 😀"
    assert through_the_router("a  b\n", stream=True) == "a  b\n"
