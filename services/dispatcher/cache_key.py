"""What the response cache keys on, and whether a request may use it (pure functions).

A key is `<prefix>:<scope>:<model>:<sha256 of the canonical request>`. The model is there so
the cache writer can check that whoever sent an answer may answer for that model (see
`shared.reply_trust`); a name unfit for a key is replaced by a hash. The canonical request is the
parsed body without the fields that never change the answer (`IGNORED_FIELDS`) and the sampling
parameters set to null (their default: `NULL_IS_DEFAULT`), serialised as
compact JSON with sorted keys and integral floats written as integers, so `{"temperature": 0}`
and `{"temperature": 0.0}` are one key. The scope is the caller's tenant (stamped on the job by
the API, never read from the body), or one shared scope when `shared_namespace` is set.

Unknown fields are part of the key: a parameter the router does not know may change the answer,
so two requests that differ in it never share an entry.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

from shared.http_headers import parse_cache_control
from shared.request_bodies import past_orjson_integers
from shared.topology import MODEL_NAME_RE

# Fields that change how an answer travels or is accounted, never what it says.
IGNORED_FIELDS = frozenset(
    {
        "stream",  # the same answer, as JSON or replayed as SSE
        "stream_options",  # include_usage only adds the usage chunk, which the replay honours
        "user",  # the end user's id, for the provider's abuse monitoring
        "safety_identifier",  # the same, under its newer name
        "metadata",  # tags for stored completions
        "store",  # whether the provider keeps the completion
        "prompt_cache_key",  # a hint for the provider's own prompt cache
        "prompt_cache_retention",  # likewise
    }
)

# Sampling parameters for which `null` is the default on OpenAI and vLLM alike (the SDKs send
# `"seed": null` for `seed=None`): null or absent is one key. Not every field: vLLM defaults an
# absent `tool_choice` to "auto" when tools are given, but not a null one.
NULL_IS_DEFAULT = frozenset(
    {
        "seed",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "logprobs",
        "top_logprobs",
    }
)

SHARED_SCOPE = "_shared"  # starts with `_`: no tenant's scope can (see `tenant_scope`)
_TENANT = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}"
_SCOPE = rf"(?:_shared|_h[0-9a-f]{{32}}|{_TENANT})"


_MODEL_TAG = rf"(?:_h[0-9a-f]{{32}}|{MODEL_NAME_RE.pattern.strip('^$')})"


@functools.lru_cache(maxsize=8)
def _entry_key_re(prefix: str) -> re.Pattern[str]:
    # The digest is last and fixed-length, so a model tag holding `:` parses unambiguously.
    return re.compile(rf"{re.escape(prefix)}:{_SCOPE}:(?P<model>{_MODEL_TAG}):[0-9a-f]{{64}}")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The cache settings of one dispatcher, as plain data.

    `prefix` namespaces every key (`<BROKER_NAMESPACE>:cache:v1`); `ttl` is in seconds and 0
    (or no Redis) turns the cache off; `deterministic_only` stores only requests with
    temperature 0 or a seed.
    """

    prefix: str
    ttl: int
    enabled: bool = True
    deterministic_only: bool = False
    shared_namespace: bool = False

    @property
    def is_active(self) -> bool:
        return self.enabled and self.ttl > 0

    def model_of(self, key: str) -> str | None:
        """The model tag of an entry key this policy could have made, else None (a lock key,
        a done channel, another prefix's key): the cache writer checks every `job.completed`
        with it before anything is written to Redis."""
        match = _entry_key_re(self.prefix).fullmatch(key)
        return match["model"] if match else None


class InexactNumberError(ValueError):
    """The parsed request may differ from what was sent: orjson reads an integer literal past
    64 bits as the nearest float, so `...890` and `...891` would share one key."""


def _normalised(value: Any) -> Any:
    # 1.0 and 1 are one key; past 64 bits a float stays a float (orjson writes no bigger int).
    if isinstance(value, float) and value.is_integer():
        if past_orjson_integers(value):  # maybe an integer orjson could not keep
            raise InexactNumberError(value)
        if value < 2**63:
            return int(value)
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def canonical_request(data: dict[str, Any]) -> bytes:
    """The bytes the key hashes: the request minus `IGNORED_FIELDS` and the `NULL_IS_DEFAULT`
    parameters set to null, keys sorted. Raises InexactNumberError for a request that may hold
    an integer past 64 bits (a whole float out of that range, `1e30` too)."""
    kept = {
        k: _normalised(v)
        for k, v in data.items()
        if k not in IGNORED_FIELDS and not (v is None and k in NULL_IS_DEFAULT)
    }
    return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)


def tenant_scope(tenant: str) -> str:
    """The tenant as it appears in a key: itself when it is a plain name, else a hash."""
    if re.fullmatch(_TENANT, tenant):
        return tenant
    return "_h" + hashlib.sha256(tenant.encode()).hexdigest()[:32]


def model_tag(model: object) -> str:
    """The model as it appears in a key: itself when a queue could be named after it (every
    agent model is), else a hash (`_` cannot start a model name)."""
    name = model if isinstance(model, str) else orjson.dumps(model).decode()
    if MODEL_NAME_RE.fullmatch(name):
        return name
    return "_h" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def cache_key(data: dict[str, Any], *, tenant: str, policy: CachePolicy) -> str:
    scope = SHARED_SCOPE if policy.shared_namespace else tenant_scope(tenant)
    digest = hashlib.sha256(canonical_request(data)).hexdigest()
    return f"{policy.prefix}:{scope}:{model_tag(data.get('model'))}:{digest}"


def lock_key(key: str) -> str:
    """The single-flight lock of an entry (held by the dispatcher whose job computes it)."""
    return f"{key}:lock"


def done_channel(key: str) -> str:
    """The pub/sub channel that says an entry was written (`ok`) or will not be (`fail`)."""
    return f"{key}:done"


def whole_number(value: Any) -> int | None:
    """A JSON integer, `2.0` included (JSON Schema counts both, the API accepts both, and the
    key writes both as 2); None for anything else, booleans too."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_deterministic(data: dict[str, Any]) -> bool:
    """Temperature 0 or a seed: the same request should get the same answer."""
    temperature = data.get("temperature")
    seed = data.get("seed")
    zero = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    return (zero and temperature == 0) or whole_number(seed) is not None


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What the cache does for one job.

    `key` None means the cache plays no part (the answer says `x-cache: bypass`). `lookup`:
    read before routing; `store`: ask whoever finishes the job to publish it; `deterministic`:
    identical requests in flight at once may share one upstream call.
    """

    key: str | None = None
    lookup: bool = False
    store: bool = False
    deterministic: bool = False
    max_age: int | None = None  # a stored answer older than this (seconds) is not served


BYPASS = CachePlan()


def plan_request(
    body: bytes, *, stream: bool, tenant: str, cache_control: str | None, policy: CachePolicy
) -> CachePlan:
    """Decide the cache's part in one request (never raises: a body it cannot read bypasses).

    Streams are looked up (and replayed) but never stored: only whole answers are kept.
    """
    if not policy.is_active:
        return BYPASS
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return BYPASS
    if not isinstance(data, dict):
        return BYPASS
    deterministic = is_deterministic(data)
    if policy.deterministic_only and not deterministic:
        return BYPASS
    control = parse_cache_control(cache_control)
    lookup = not control.no_cache
    store = not control.no_store and not stream
    if not lookup and not store:
        return BYPASS
    try:
        key = cache_key(data, tenant=tenant, policy=policy)
    except InexactNumberError:
        return BYPASS  # rare, and a key that could collide would serve another's answer
    return CachePlan(
        key=key,
        lookup=lookup,
        store=store,
        deterministic=deterministic,
        max_age=control.max_age,
    )
