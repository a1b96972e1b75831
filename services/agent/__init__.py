"""The agent: a queue consumer in front of one inference server (vLLM or any OpenAI server).

For each `local*` model it serves, the agent consumes `router.<v>.<mode>.agent.<model>` with
prefetch AGENT_CONCURRENCY, calls the server's `/v1/chat/completions` and publishes the reply to
the job's `reply_to` (one final message, or coalesced chunk messages then an end message).
It registers at `{ROUTER_URL}/register` once its consumers are attached and heartbeats every
HEARTBEAT_INTERVAL while they stay attached. Modules:

  models.py     model-name mapping (the rule is below)          bodies.py   body rewriting,
  sse.py        incremental SSE parsing                                      error normalising
  backend.py    the server's HTTP API (raw aiohttp)             handler.py  one job: acks, replies
  heartbeat.py  /register and /heartbeat                        container.py vllm-docker backend
  service.py    lifecycle (its /health and /ready: shared/health.py)

Model names. Router-facing ids start with `local`; the server knows models by their served
names. AGENT_MODELS is a comma-separated list of entries:
  `local_x=served-x`   router id `local_x`, served as `served-x`
  `local_x`            router id `local_x`, served as `x`
  `x`                  router id `local_x`, served as `x`
When AGENT_MODELS is empty the agent asks the server's `/v1/models` and exposes each served
name `x` as `local_x`. Requests are rewritten to the served name; every response and stream
chunk carries the router id the client asked for.

Acks. A job is acked once it is over (its reply, or a stream's end, confirmed), so the model's
prefetch bounds the jobs this agent holds. A job that cannot reach the server before any output
is requeued once (the broker hands it to any consumer of its queue, maybe this agent again),
then answered 502. Jobs already cancelled or past their deadline are acked and dropped; a
cancel that arrives mid-call aborts the HTTP call (closing the connection is what stops vLLM
generating) and drops the job without a reply.
"""
