"""Which broker users may answer jobs for which models (`REPLY_USERS`).

Agents may run on other people's machines. Their broker users may publish replies, so a reply's
sender is checked before it reaches a client: RabbitMQ refuses a message whose `user_id`
property differs from the publishing connection's user, so `user_id` names the real sender.
`REPLY_USERS="router-dispatcher=*,gpu-pool-1=local-llama|local-qwen"` lets the dispatcher's
user answer for every model and `gpu-pool-1` only for its two. Left empty, the check is off
(one broker user for everything, as in `make dev`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.topology import MODEL_NAME_RE

ANY_MODEL = "*"


@dataclass(frozen=True)
class ReplyTrust:
    # user -> the models it may answer for; None means every model (the router's own users)
    grants: dict[str, frozenset[str] | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> ReplyTrust:
        """`"user=*, user2=model-a|model-b"`; raises ValueError on a malformed entry."""
        grants: dict[str, frozenset[str] | None] = {}
        for raw in text.split(","):
            entry = raw.strip()
            if not entry:
                continue
            user, sep, models = (part.strip() for part in entry.partition("="))
            if not sep or not user or not models:
                raise ValueError(f"REPLY_USERS entries are user=models: {entry!r}")
            if user in grants:  # a second entry would silently replace the first
                raise ValueError(f"REPLY_USERS names {user!r} twice: list its models once")
            if models == ANY_MODEL:
                grants[user] = None
                continue
            names = frozenset(m.strip() for m in models.split("|") if m.strip())
            bad = sorted(m for m in names if not MODEL_NAME_RE.fullmatch(m))
            if not names or bad:
                raise ValueError(f"REPLY_USERS: bad model list for {user!r}: {bad or models!r}")
            grants[user] = names
        return cls(grants)

    @property
    def enforced(self) -> bool:
        return bool(self.grants)

    def may_answer(self, user: str | None, model: str) -> bool:
        """May a message published as `user` answer a job for `model`?"""
        if not self.enforced:
            return True
        if user is None or user not in self.grants:
            return False
        models = self.grants[user]
        return models is None or model in models

    def is_router(self, user: str | None) -> bool:
        """Is `user` one of the router's own (any-model) users? Only they answer RPCs."""
        if not self.enforced:
            return True
        return user is not None and user in self.grants and self.grants[user] is None
