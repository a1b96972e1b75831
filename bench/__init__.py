"""The benchmark harness (`make bench`): the router against the direct path and LiteLLM."""
