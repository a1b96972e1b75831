"""The response headers a reply may carry to the client, defined once.

Producers choose them (`services.dispatcher.providers.upstream.relay_headers` from an upstream's
answer, `shared.replies` the cache verdict); the API relays only these from any reply
(`relayable`), so no backend can set the router's own headers (`x-request-id`, `content-type`,
`content-length`) or any other (`set-cookie`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
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


def upstream_hints(headers: Mapping[str, str]) -> dict[str, str]:
    """An upstream answer's retry and rate-limit headers (`is_upstream_relayed`), lower-cased."""
    return {
        name.lower(): value for name, value in headers.items() if is_upstream_relayed(name.lower())
    }


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


@dataclass(frozen=True, slots=True)
class CacheControl:
    """A request's `Cache-Control`, as the response cache reads it: `no-cache` skips the
    lookup, `no-store` the write, and `max-age` (seconds) refuses a stored answer older than
    that. The API sends the job on with `header()`, so nothing a client puts before a
    directive (a long `private="..."`, another header line) can push it out of the job."""

    no_cache: bool = False
    no_store: bool = False
    max_age: int | None = None

    def header(self) -> str | None:
        """The canonical header for these directives; None for none."""
        parts = [
            name for name, on in (("no-cache", self.no_cache), ("no-store", self.no_store)) if on
        ]
        if self.max_age is not None:
            parts.append(f"max-age={self.max_age}")
        return ", ".join(parts) or None


# RFC 9111 §1.2.2: a delta-seconds past 2**31 is taken as 2**31.
_MAX_DELTA_SECONDS = 2**31


def parse_cache_control(value: str | None) -> CacheControl:
    """Parse a `Cache-Control` request header (case-insensitive; other directives ignored).
    Repeated header lines form one list (RFC 9110 §5.3): join them with commas first.

    `max-age=0` means the client accepts no stored answer, so it counts as `no-cache`.
    """
    if not value:
        return CacheControl()
    directives = set()
    max_age: int | None = None
    for part in value.split(","):
        name, _, argument = part.strip().partition("=")
        name = name.strip().lower()
        if name == "max-age":
            seconds = _delta_seconds(argument)
            if seconds is not None:
                max_age = seconds if max_age is None else min(max_age, seconds)
            continue
        directives.add(name)
    return CacheControl(
        no_cache="no-cache" in directives or max_age == 0,
        no_store="no-store" in directives,
        max_age=max_age or None,
    )


def _delta_seconds(argument: str) -> int | None:
    text = argument.strip().strip('"')
    if not text.isascii() or not text.isdigit():
        return None
    return _MAX_DELTA_SECONDS if len(text) > 10 else min(int(text), _MAX_DELTA_SECONDS)


def cache_directives(lines: list[str]) -> str | None:
    """What a job carries of a request's `Cache-Control` lines: `CacheControl.header()` of them
    all (repeated lines form one list, RFC 9110 §5.3); None, unparsed, without the header."""
    return parse_cache_control(", ".join(lines)).header() if lines else None
