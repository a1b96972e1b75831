"""Fake upstream LLM servers speaking vLLM's and OpenAI's exact wire formats.

Used by the tests, by `make dev` and as the benchmark's mock backend:
  python -m fakes.vllm --port 8100      (fakes.vllm.create_app)
  python -m fakes.openai --port 8200    (fakes.openai.create_app)
In-process: `async with running(create_app(config)) as base_url: ...`.
"""

from fakes.core import FakeConfig
from fakes.server import STATE, FakeState, running, serve

__all__ = ["STATE", "FakeConfig", "FakeState", "running", "serve"]
