"""Router services: the HTTP API, the dispatcher and the agent."""
