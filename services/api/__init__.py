"""The HTTP edge: OpenAI routes, agent routes, SSE relay and reply correlation."""
