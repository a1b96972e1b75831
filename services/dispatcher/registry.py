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
    """One agent process: its name (replicas may share one, and its token) and its `instance`,
    new at each start (empty from agents that predate it). `left`: it said it was stopping."""

    name: str
    endpoint: str
    models: tuple[str, ...]
    registered_at: float
    last_heartbeat: float
    load: float | None = None
    instance: str = ""
    left: bool = False

    @property
    def key(self) -> AgentKey:
        return (self.name, self.instance)


AgentKey = tuple[str, str]  # (name, instance)


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
    """Agent processes by (name, instance) and the last heartbeat of each model, judged
    against one TTL. A model is live while any process serving it is.

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
        self._agents: dict[AgentKey, AgentRecord] = {}
        self._instances: dict[str, set[str]] = {}  # name -> its processes' instances
        self._model_last_seen: dict[str, float] = {}

    def start_listening(self, now: float) -> None:
        """Registrations and heartbeats reach this table from `now` on: warm up for one TTL."""
        if self._warm_until == -math.inf:  # a (re)started dispatcher: live at the file's last write
            staying = [r.last_heartbeat for r in self._agents.values() if not r.left]
            self._carried = self._live_at(max(staying, default=now))
        self._warm_until = now + self.ttl

    def stop_listening(self, now: float) -> None:
        """Registrations and heartbeats may no longer reach this table: warm up until it
        listens again, and one TTL after."""
        if self._warm_until != math.inf:  # not lost already
            warming_up = now < self._warm_until
            self._carried = (self._carried if warming_up else frozenset()) | self._live_at(now)
        self._warm_until = math.inf

    def _live_at(self, when: float) -> frozenset[str]:
        """The models some process served at `when`, but for those that said they were
        leaving: one that left just before a dispatcher stopped is not carried into its
        restart's warm-up (its jobs would wait out AGENT_QUEUE_TTL for a 503)."""
        cutoff = when - self.ttl
        return frozenset(
            model
            for record in self._agents.values()
            if not record.left and record.last_heartbeat >= cutoff
            for model in record.models
        )

    def __len__(self) -> int:
        return len(self._agents)

    def get(self, name: str, instance: str = "") -> AgentRecord | None:
        return self._agents.get((name, instance))

    def records(self) -> list[AgentRecord]:
        return list(self._agents.values())

    def put(self, record: AgentRecord) -> None:
        previous = self._agents.get(record.key)
        self._agents[record.key] = record
        self._instances.setdefault(record.name, set()).add(record.instance)
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
            instance=message.instance,
        )
        self.put(record)
        return record

    def heartbeat(self, message: AgentHeartbeat, now: float) -> AgentRecord:
        """A heartbeat with `models` is a full snapshot; without, it only proves life.

        A heartbeat from an agent this dispatcher never saw registers it, so a dispatcher that
        starts with an empty file converges within one heartbeat interval. A `leaving` one
        (the agent is stopping) is dated one TTL back, just expired: its models stop being
        routed to it at once instead of a TTL later, and stay known (503 until an agent serves
        them again, not 404), and the agent is forgotten on the usual schedule. It retires only
        its own process: a replica of the same name keeps the models live.
        """
        known = self._agents.get((message.name, message.instance))
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
                instance=message.instance,
                left=message.leaving,
            )
        else:
            record = replace(
                known,
                models=models if models is not None else known.models,
                last_heartbeat=heard,
                load=message.load if message.load is not None else known.load,
                left=message.leaving,
            )
        self.put(record)
        return record

    def retire_dead_namesakes(self, record: AgentRecord, now: float) -> list[AgentKey]:
        """Drop the dead processes (expired, or gone with a leave) of the name `record`'s
        live process belongs to; their keys. A restarted agent is a new instance: its
        predecessor's record would otherwise keep the models it no longer serves known (503
        "retry shortly") for AGENT_FORGET_AFTER, where they had been unknown (404) at once."""
        if record.left:
            return []
        cutoff = now - self.ttl
        gone = [
            (record.name, instance)
            for instance in self._instances.get(record.name, ())
            if instance != record.instance
            and self._agents[(record.name, instance)].last_heartbeat < cutoff
        ]
        self._remove(gone)
        return gone

    def forget_silent_since(self, cutoff: float) -> list[AgentKey]:
        """Drop the agent processes not heard from since `cutoff`; their keys."""
        gone = [key for key, r in self._agents.items() if r.last_heartbeat < cutoff]
        self._remove(gone)
        return gone

    def _remove(self, keys: list[AgentKey]) -> None:
        for name, instance in keys:
            del self._agents[(name, instance)]
            instances = self._instances[name]
            instances.discard(instance)
            if not instances:
                del self._instances[name]
        if keys:
            self._reindex()

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
                last_seen[model] = max(last_seen.get(model, -math.inf), record.last_heartbeat)
        self._model_last_seen = last_seen


# One row per agent process. Files written before instances existed have a table `agents`
# keyed by name alone: its rows move over (as instance "") when the file is opened.
SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_processes (
    name TEXT NOT NULL,
    instance TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    models TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    load REAL,
    left INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, instance)
)
"""
# The newer row wins: a dispatcher that predates instances may have written `agents` again
# after a newer one moved its rows over.
MIGRATE_BY_NAME = """
INSERT INTO agent_processes
    (name, instance, endpoint, models, registered_at, last_heartbeat, load)
SELECT name, '', endpoint, models, registered_at, last_heartbeat, load FROM agents WHERE true
ON CONFLICT(name, instance) DO UPDATE SET
    endpoint=excluded.endpoint, models=excluded.models, registered_at=excluded.registered_at,
    last_heartbeat=excluded.last_heartbeat, load=excluded.load, left=0
WHERE excluded.last_heartbeat > agent_processes.last_heartbeat
"""
UPSERT = """
INSERT INTO agent_processes
    (name, instance, endpoint, models, registered_at, last_heartbeat, load, left)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(name, instance) DO UPDATE SET
    endpoint=excluded.endpoint, models=excluded.models, registered_at=excluded.registered_at,
    last_heartbeat=excluded.last_heartbeat, load=excluded.load, left=excluded.left
"""
SELECT_ALL = """
SELECT name, instance, endpoint, models, registered_at, last_heartbeat, load, left
FROM agent_processes
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
            self._create()
        except (OSError, sqlite3.Error) as e:
            raise StartupError(f"REGISTRY_PATH {path} cannot hold the registry: {e}") from e

    def _create(self) -> None:
        # One transaction: dispatchers sharing the file may open it at once.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(SCHEMA)
            old = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'agents'"
            ).fetchone()
            if old:
                self._db.execute(MIGRATE_BY_NAME)
                self._db.execute("DROP TABLE agents")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def save(self, record: AgentRecord) -> None:
        self._db.execute(
            UPSERT,
            (
                record.name,
                record.instance,
                record.endpoint,
                orjson.dumps(record.models).decode(),
                record.registered_at,
                record.last_heartbeat,
                record.load,
                int(record.left),
            ),
        )

    def delete(self, keys: list[AgentKey]) -> None:
        self._db.executemany("DELETE FROM agent_processes WHERE name = ? AND instance = ?", keys)

    def load_all(self) -> list[AgentRecord]:
        rows = self._db.execute(SELECT_ALL).fetchall()
        return [
            AgentRecord(
                name=row[0],
                instance=row[1],
                endpoint=row[2],
                models=tuple(orjson.loads(row[3])),
                registered_at=row[4],
                last_heartbeat=row[5],
                load=row[6],
                left=bool(row[7]),
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
        retired = self.table.retire_dead_namesakes(record, now)
        if retired:
            self.store.delete(retired)
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
