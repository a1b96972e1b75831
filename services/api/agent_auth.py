"""Agent credentials: which token may speak for which agent name.

Tokens are configured per agent name (`AGENT_TOKENS="gpu1=tok1,gpu2=tok2"`) or derived from a
secret (`HMAC-SHA256(AGENT_TOKEN_SECRET, name)`), so an agent cannot register or heartbeat as
another. Only digests are kept in memory, and comparisons take constant time.
"""

from __future__ import annotations

import hashlib
import hmac

from shared.errors import AuthenticationError, PermissionDeniedError


def derive_agent_token(secret: str, name: str) -> str:
    return hmac.new(secret.encode(), name.encode(), hashlib.sha256).hexdigest()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_token_pairs(text: str) -> dict[str, str]:
    """`"a=t1, b=t2"` -> {"a": "t1", "b": "t2"}; raises ValueError on a malformed pair."""
    pairs: dict[str, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, token = item.partition("=")
        if not sep or not name.strip() or not token.strip():
            raise ValueError("AGENT_TOKENS must be comma-separated name=token pairs")
        pairs[name.strip()] = token.strip()
    return pairs


class AgentCredentials:
    def __init__(self, tokens: dict[str, str], secret: str = "") -> None:
        self._digests = {name: _digest(token) for name, token in tokens.items()}
        self._secret = secret

    @property
    def is_configured(self) -> bool:
        return bool(self._digests or self._secret)

    def check(self, name: str, authorization: str | None) -> None:
        """Accept only the token of agent `name`: 401 without one, 403 for any other."""
        token = bearer_token(authorization)
        if token is None:
            raise AuthenticationError("Missing agent token: send `Authorization: Bearer <token>`.")
        expected: list[bytes] = []
        if name in self._digests:
            expected.append(self._digests[name])
        if self._secret:
            expected.append(_digest(derive_agent_token(self._secret, name)))
        presented = _digest(token)
        if not any(hmac.compare_digest(presented, digest) for digest in expected):
            raise PermissionDeniedError(f"This token may not act as agent `{name}`.")


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
