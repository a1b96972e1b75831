"""The agent registry: who serves which `local*` model, and who is alive.

`AgentTable` is the plain in-memory logic (unit-tested without a database); `SqliteStore`
persists it in this dispatcher's own SQLite file (WAL), so a restarted dispatcher keeps its
registry, and `Registry` joins the two. Liveness is judged by this dispatcher's receive time of
the last heartbeat, never by a clock of the agent's.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

from services.dispatcher.routing import AgentView
from shared.messages import AgentHeartbeat, AgentRegistration
from shared.runner import StartupError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AgentRecord:
    name: str
    endpoint: str
    models: tuple[str, ...]
    registered_at: float
    last_heartbeat: float
    load: float | None = None


class LiveModels(Set[str]):
    """The models seen since `cutoff`, and those in `carried`: a set computed on demand from
    the last sightings."""

    __slots__ = ("_carried", "_cutoff", "_seen")

    def __init__(
        self, seen: Mapping[str, float], cutoff: float, carried: Set[str] = frozenset()
    ) -> None:
        self._seen = seen
        self._cutoff = cutoff
        self._carried = carried

    def __contains__(self, model: object) -> bool:
        seen = self._seen.get(model, -math.inf) if isinstance(model, str) else -math.inf
        return seen >= self._cutoff or model in self._carried

    def __iter__(self) -> Iterator[str]:
        return (
            model
            for model, seen in self._seen.items()
            if seen >= self._cutoff or model in self._carried
        )

    def __len__(self) -> int:
        return sum(1 for _ in self)


class AgentTable:
    """Agents by name and the last heartbeat of each model, judged against one TTL.

    A warm-up covers the time this table cannot know who is alive: while it hears no
    registrations and heartbeats (before a dispatcher starts, while its control channel is
    lost), and for one TTL after it hears them again, within which every live agent
    heartbeats. During it a model nobody announced may belong to an agent not heard yet
    (`view().warming_up`: 503, not 404), and the models that were live when the table last
    heard stay live (`carried`): their agents most likely kept serving while this dispatcher
    was away, and the jobs that waited for it go to them instead of a 503. A model whose
    agents did stop meanwhile is routed for one TTL more; its jobs then wait in its queue up
    to AGENT_QUEUE_TTL, as they do after an agent dies between two heartbeats.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._warm_until = -math.inf  # never listened yet: no warm-up
        self._carried: frozenset[str] = frozenset()
        self._agents: dict[str, AgentRecord] = {}
        self._model_last_seen: dict[str, float] = {}

    def start_listening(self, now: float) -> None:
        """Registrations and heartbeats reach this table from `now` on: warm up for one TTL."""
        if self._warm_until == -math.inf:  # a (re)started dispatcher: live at the file's last write
            last_heard = max((r.last_heartbeat for r in self._agents.values()), default=now)
            self._carried = self._live_at(last_heard)
        self._warm_until = now + self.ttl

    def stop_listening(self, now: float) -> None:
        """Registrations and heartbeats may no longer reach this table: warm up until it
        listens again, and one TTL after."""
        if self._warm_until != math.inf:  # not lost already
            warming_up = now < self._warm_until
            self._carried = (self._carried if warming_up else frozenset()) | self._live_at(now)
        self._warm_until = math.inf

    def _live_at(self, when: float) -> frozenset[str]:
        cutoff = when - self.ttl
        return frozenset(m for m, seen in self._model_last_seen.items() if seen >= cutoff)

    def __len__(self) -> int:
        return len(self._agents)

    def get(self, name: str) -> AgentRecord | None:
        return self._agents.get(name)

    def records(self) -> list[AgentRecord]:
        return list(self._agents.values())

    def put(self, record: AgentRecord) -> None:
        previous = self._agents.get(record.name)
        self._agents[record.name] = record
        if previous is None or (
            previous.models == record.models and record.last_heartbeat >= previous.last_heartbeat
        ):
            # The common case, a heartbeat: each of its models' last sighting can only move
            # forward, so bump them instead of rescanning every agent on every heartbeat.
            seen = self._model_last_seen
            for model in record.models:
                seen[model] = max(seen.get(model, -math.inf), record.last_heartbeat)
        else:
            # A changed snapshot (or an older record): a model may have lost its last agent.
            self._reindex()

    def register(self, message: AgentRegistration, now: float) -> AgentRecord:
        record = AgentRecord(
            name=message.name,
            endpoint=message.endpoint,
            models=tuple(dict.fromkeys(message.models)),
            registered_at=now,
            last_heartbeat=now,
        )
        self.put(record)
        return record

    def heartbeat(self, message: AgentHeartbeat, now: float) -> AgentRecord:
        """A heartbeat with `models` is a full snapshot; without, it only proves life.

        A heartbeat from an agent this dispatcher never saw registers it, so a dispatcher that
        starts with an empty file converges within one heartbeat interval. A `leaving` one
        (the agent is stopping) is dated one TTL back, just expired: its models stop being
        routed to it at once instead of a TTL later, and stay known (503 until an agent serves
        them again, not 404), and the agent is forgotten on the usual schedule.
        """
        known = self._agents.get(message.name)
        models = tuple(dict.fromkeys(message.models)) if message.models is not None else None
        heard = math.nextafter(now - self.ttl, -math.inf) if message.leaving else now
        if known is None:
            record = AgentRecord(
                name=message.name,
                endpoint="",
                models=models or (),
                registered_at=now,
                last_heartbeat=heard,
                load=message.load,
            )
        else:
            record = replace(
                known,
                models=models if models is not None else known.models,
                last_heartbeat=heard,
                load=message.load if message.load is not None else known.load,
            )
        self.put(record)
        return record

    def forget_silent_since(self, cutoff: float) -> list[str]:
        """Drop the agents not heard from since `cutoff`; their names."""
        gone = [name for name, r in self._agents.items() if r.last_heartbeat < cutoff]
        for name in gone:
            del self._agents[name]
        if gone:
            self._reindex()
        return gone

    def view(self, now: float) -> AgentView:
        """Views over the index, not copies of it: a job asks about one model, and copying
        every model's state for it cost 72 us per job at 1,000 models."""
        seen = self._model_last_seen
        warming_up = now < self._warm_until
        return AgentView(
            live=LiveModels(seen, now - self.ttl, self._carried if warming_up else frozenset()),
            known=seen.keys(),
            warming_up=warming_up,
        )

    def _reindex(self) -> None:
        last_seen: dict[str, float] = {}
        for record in self._agents.values():
            for model in record.models:
                last_seen[model] = max(last_seen.get(model, 0.0), record.last_heartbeat)
        self._model_last_seen = last_seen


SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    models TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    load REAL
)
"""


class SqliteStore:
    """Agent records in a SQLite file (WAL; parameterised SQL only)."""

    def __init__(self, path: str) -> None:
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StartupError(f"REGISTRY_PATH {path} cannot hold the registry: {e}") from e

    def save(self, record: AgentRecord) -> None:
        self._db.execute(
            "INSERT INTO agents (name, endpoint, models, registered_at, last_heartbeat, load) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET endpoint=excluded.endpoint,"
            " models=excluded.models, registered_at=excluded.registered_at,"
            " last_heartbeat=excluded.last_heartbeat, load=excluded.load",
            (
                record.name,
                record.endpoint,
                orjson.dumps(record.models).decode(),
                record.registered_at,
                record.last_heartbeat,
                record.load,
            ),
        )

    def delete(self, names: list[str]) -> None:
        self._db.executemany("DELETE FROM agents WHERE name = ?", [(name,) for name in names])

    def load_all(self) -> list[AgentRecord]:
        rows = self._db.execute(
            "SELECT name, endpoint, models, registered_at, last_heartbeat, load FROM agents"
        ).fetchall()
        return [
            AgentRecord(
                name=row[0],
                endpoint=row[1],
                models=tuple(orjson.loads(row[2])),
                registered_at=row[3],
                last_heartbeat=row[4],
                load=row[5],
            )
            for row in rows
        ]

    def close(self) -> None:
        self._db.close()


class Registry:
    """The table, persisted: every change is written through to SQLite.

    An agent silent for `forget_after` seconds is dropped from both: agents that come and go
    under new names (one per pod, say) would otherwise pile up for ever, and a retired model
    would answer 503 "retry shortly" for ever instead of 404. Checked at most every
    `SWEEP_EVERY` seconds, on the next heartbeat or job.
    """

    SWEEP_EVERY = 60.0

    def __init__(
        self, table: AgentTable, store: SqliteStore, forget_after: float = math.inf
    ) -> None:
        self.table = table
        self.store = store
        self.forget_after = forget_after
        self._next_sweep = -math.inf
        for record in store.load_all():
            table.put(record)

    def record(self, message: AgentRegistration | AgentHeartbeat, now: float) -> AgentRecord:
        self._sweep(now)
        if isinstance(message, AgentRegistration):
            record = self.table.register(message, now)
        else:
            record = self.table.heartbeat(message, now)
        self.store.save(record)
        return record

    def view(self, now: float) -> AgentView:
        self._sweep(now)
        return self.table.view(now)

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(self.SWEEP_EVERY, self.forget_after)
        gone = self.table.forget_silent_since(now - self.forget_after)
        if gone:
            self.store.delete(gone)
            log.info("forgot %d agent(s) silent for %gs: %s", len(gone), self.forget_after, gone)

    def close(self) -> None:
        self.store.close()
