"""The fault suite's own machinery: a private RabbitMQ node and Redis, a TCP fault proxy, a load
generator with a ledger, and the router stack wired to them."""
