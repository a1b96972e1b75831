"""Client API keys: who may call `/v1/*`, as which tenant, for which models.

Keys are configured as `id:key` or `id:key:model1|model2` entries (`CLIENT_KEYS`, comma
separated, and/or `CLIENT_KEYS_FILE`, one per line, `#` comments). The id names the tenant
(stamped on every job, never read from a body); a model list limits the key to those models.
Only SHA-256 digests of keys are kept, and a presented key is compared with every digest in
constant time. With no keys configured the router is open: every caller is the `anonymous`
tenant with every model.

Nothing here ever puts a key, or a part of one, in an exception message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from services.api.agent_auth import bearer_token
from shared.errors import AuthenticationError, PermissionDeniedError

ANONYMOUS = "anonymous"
# A tenant id travels in a message header and names a cache namespace: keep it plain.
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A key is 8-512 printable ASCII characters except the configuration's separators `,` and `:`.
KEY_RE = re.compile(r"^[\x21-\x2b\x2d-\x39\x3b-\x7e]{8,512}$")

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
INCORRECT_KEY = "Incorrect API key provided."


class ClientKeyConfigError(ValueError):
    """A malformed CLIENT_KEYS entry; the message names its position, never its content."""


@dataclass(frozen=True, slots=True)
class Client:
    """An authenticated caller: its tenant id and the models it may use (None: all)."""

    id: str
    models: frozenset[str] | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def check_model(self, model: str) -> None:
        """Raises PermissionDeniedError (403 `model_not_allowed`) outside the key's models."""
        if not self.allows(model):
            raise PermissionDeniedError(
                f"This API key does not have access to model `{model}`.",
                param="model",
                code="model_not_allowed",
            )


OPEN_CLIENT = Client(ANONYMOUS)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_entry(entry: str, where: str) -> tuple[Client, str]:
    """`id:key` or `id:key:m1|m2` -> (Client, key). Raises ClientKeyConfigError."""
    client_id, sep, rest = entry.partition(":")
    key, models_sep, models_text = rest.partition(":")
    client_id, key = client_id.strip(), key.strip()
    if not sep or not CLIENT_ID_RE.fullmatch(client_id):
        raise ClientKeyConfigError(f"{where}: the id must match {CLIENT_ID_RE.pattern}")
    if not KEY_RE.fullmatch(key):
        raise ClientKeyConfigError(
            f"{where} (id {client_id}): the key must be 8-512 printable ASCII characters "
            "without spaces, ':' or ','"
        )
    models: frozenset[str] | None = None
    if models_sep:
        # Fail closed: `id:key:${MODELS}` with MODELS unset must not grant every model.
        if not models_text.strip():
            raise ClientKeyConfigError(
                f"{where} (id {client_id}): an empty model list after the second ':' "
                "(leave the ':' out to allow every model)"
            )
        names = [m.strip() for m in models_text.split("|")]
        if not all(names):
            raise ClientKeyConfigError(f"{where} (id {client_id}): an empty model name")
        models = frozenset(names)
    return Client(client_id, models), key


def parse_entries(text: str, *, separator: str, source: str) -> list[tuple[Client, str]]:
    """Parse every non-empty, non-comment entry of `text`."""
    entries: list[tuple[Client, str]] = []
    for number, raw in enumerate(text.split(separator), start=1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        entries.append(parse_entry(entry, f"{source} entry {number}"))
    return entries


def load_entries(keys: str = "", file: str = "") -> list[tuple[Client, str]]:
    """The entries of CLIENT_KEYS (comma separated) and CLIENT_KEYS_FILE (one per line)."""
    entries = parse_entries(keys, separator=",", source="CLIENT_KEYS")
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ClientKeyConfigError(f"cannot read CLIENT_KEYS_FILE: {type(e).__name__}") from e
        entries += parse_entries(text, separator="\n", source="CLIENT_KEYS_FILE")
    return entries


class ClientKeys:
    """The configured client keys; `authenticate()` turns an Authorization header into a Client."""

    def __init__(self, entries: Iterable[tuple[Client, str]] = ()) -> None:
        # By SHA-256 digest: one lookup per request, whatever the number of keys. A lookup's
        # timing can tell at most something about a stored digest, and a digest does not
        # lead back to its key.
        self._keys: dict[bytes, Client] = {}
        for client, key in entries:
            digest = _digest(key)
            if digest in self._keys:
                raise ClientKeyConfigError(f"a key of id {client.id} is configured twice")
            self._keys[digest] = client

    @classmethod
    def from_config(cls, keys: str = "", file: str = "") -> ClientKeys:
        """From CLIENT_KEYS (comma separated) and CLIENT_KEYS_FILE (one entry per line)."""
        return cls(load_entries(keys, file))

    @property
    def is_configured(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, authorization: str | None) -> Client:
        """The caller's Client; raises AuthenticationError (401 `invalid_api_key`).

        Open (no keys configured): everyone is the anonymous client, whatever they send.
        The key itself is never compared: only its SHA-256 digest is looked up.
        """
        if not self._keys:
            return OPEN_CLIENT
        key = bearer_token(authorization)
        if key is None:
            raise AuthenticationError(MISSING_KEY)
        found = self._keys.get(_digest(key))
        if found is None:
            raise AuthenticationError(INCORRECT_KEY)
        return found

    def shares_a_key_with(self, tokens: Iterable[str]) -> bool:
        """True if any of `tokens` (agent tokens) is also a client key: a misconfiguration."""
        return any(_digest(token) in self._keys for token in tokens)


def visible_models(listing: bytes, client: Client) -> bytes:
    """OpenAI's model list (JSON bytes) cut down to the models `client` may use."""
    if client.models is None:
        return listing
    data = orjson.loads(listing)
    data["data"] = [
        entry
        for entry in data.get("data", [])
        if isinstance(entry, dict) and client.allows(str(entry.get("id")))
    ]
    return orjson.dumps(data)
