"""Cloud providers (OpenAI first), called over HTTP by the dispatcher.

`base` is the interface; `retry`, `upstream`, `sse` and `routes` are plain functions over plain
data; `openai` is the thin HTTP shell; `worker` consumes a provider queue; `runtime` wires it all
into one dispatcher process.
"""
