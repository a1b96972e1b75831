"""A request body read and written again exactly: the agent (served model name) and provider
workers (upstream model name) change one field and must keep the rest as the client sent it.

orjson reads an integer past 64 bits as the nearest float, and writes no such integer: a body
that may hold one is read and written by the standard library instead, which keeps every
integer (rare, and then a few times slower). Finding out costs a walk of the parsed values
(about 2 us for a 2 KB chat body); a large body is first searched at C speed for the 19
digits in a row such an integer needs (about 1 ms per MB), and walked only if it has them.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# Below this many bytes the walk is cheaper than the search for a run of digits.
SEARCH_FIRST_FROM = 16 * 1024
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LOST_INTEGER_DIGITS = b"0" * 19  # -9223372036854775809, the first one below orjson's range


def past_orjson_integers(value: float) -> bool:
    """Whether `value` lies where orjson's integers end (u64 above, i64 below): there a
    parsed float may be an integer literal it could not keep (or a literal like `1e30`).
    Every float that large is whole."""
    return value >= 2**64 or value <= -(2**63)


def may_hold_a_lost_integer(value: Any) -> bool:
    """Whether any float in the parsed `value` is `past_orjson_integers`."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) and past_orjson_integers(item):
            return True
    return False


def load_request(body: bytes) -> Any:
    """The parsed body; raises orjson.JSONDecodeError (a ValueError) for what is not JSON."""
    data = orjson.loads(body)
    searched = len(body) >= SEARCH_FIRST_FROM
    if searched and _LOST_INTEGER_DIGITS not in body.translate(_DIGITS_AS_ZERO):
        return data
    if may_hold_a_lost_integer(data):
        return json.loads(body)
    return data


def dump_request(data: Any) -> bytes:
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:  # an integer past 64 bits that `load_request` kept
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
