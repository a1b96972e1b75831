"""The response headers a reply may carry to the client, defined once.

Producers choose them (`services.dispatcher.providers.upstream.relay_headers` from an upstream's
answer, `shared.replies` the cache verdict); the API relays only these from any reply
(`relayable`), so no backend can set the router's own headers (`x-request-id`, `content-type`,
`content-length`) or any other (`set-cookie`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeGuard

SHOULD_RETRY = "x-should-retry"
UPSTREAM_REQUEST_ID = "x-upstream-request-id"
CACHE = "x-cache"
RETRY_HINTS = frozenset({"retry-after", "retry-after-ms"})
# An upstream's own headers a client may use: retry hints and rate limits.
UPSTREAM_RELAYED = RETRY_HINTS | {SHOULD_RETRY}
UPSTREAM_RELAYED_PREFIXES = ("x-ratelimit-",)
# What the router adds: the upstream's `x-request-id` under its own name, the cache verdict.
ROUTER_ADDED = frozenset({UPSTREAM_REQUEST_ID, CACHE})
# A header name is an RFC 9110 token; a prefix match alone would pass `x-ratelimit-a b`, which
# the HTTP server refuses once the response has begun.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


def is_upstream_relayed(name: str) -> bool:
    """Whether an upstream's header (lower-cased `name`) is passed on to the client."""
    if name in UPSTREAM_RELAYED:
        return True
    return name.startswith(UPSTREAM_RELAYED_PREFIXES) and _TOKEN.fullmatch(name) is not None


def relayable(headers: Mapping[str, object]) -> dict[str, str]:
    """The headers of a reply that the API passes on, lower-cased; the rest are dropped.

    Only relayed names with plain text values (printable ASCII) are kept: a number, a nested
    object or a line break in a value would break the response instead.
    """
    kept: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if (is_upstream_relayed(key) or key in ROUTER_ADDED) and _is_plain_text(value):
            kept[key] = value
    return kept


def _is_plain_text(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and value.isascii() and value.isprintable()
