"""`python -m bench.registry`: what one agent heartbeat costs a dispatcher, by fleet size.

Every heartbeat runs on the dispatcher's event loop: the in-memory table's update, then the
upsert into its SQLite file (WAL, `synchronous=NORMAL`). This times both, and the table alone,
for fleets of 10, 100 and 1,000 agents (20 models among them) heartbeating in turn, in a
temporary directory. `BEATS` (default 5000) sets how many heartbeats per row.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from services.dispatcher.registry import AgentTable, Registry, SqliteStore
from shared.messages import AgentHeartbeat, AgentRegistration

FLEETS = (10, 100, 1000)
MODELS = 20


def main() -> None:
    beats = int(os.environ.get("BEATS", "5000"))
    with tempfile.TemporaryDirectory() as tmp:
        for fleet in FLEETS:
            registry = Registry(AgentTable(ttl=15), SqliteStore(str(Path(tmp) / f"{fleet}.db")))
            names = [f"gpu{i}" for i in range(fleet)]
            for i, name in enumerate(names):
                model = f"local_m{i % MODELS}"
                registry.record(AgentRegistration(name=name, models=[model]), time.monotonic())
            heartbeats = [
                AgentHeartbeat(name=name, models=[f"local_m{i % MODELS}"], load=0.5)
                for i, name in enumerate(names)
            ]

            wall, cpu = time.perf_counter(), time.process_time()
            for k in range(beats):
                registry.record(heartbeats[k % fleet], time.monotonic())
            whole_wall = (time.perf_counter() - wall) / beats * 1e6
            whole_cpu = (time.process_time() - cpu) / beats * 1e6

            wall = time.perf_counter()
            for k in range(beats):
                registry.table.heartbeat(heartbeats[k % fleet], time.monotonic())
            table_wall = (time.perf_counter() - wall) / beats * 1e6
            registry.close()
            print(
                f"{fleet:5d} agents: heartbeat recorded {whole_wall:6.1f} us"
                f" ({whole_cpu:6.1f} us CPU); the table alone {table_wall:6.1f} us"
            )


if __name__ == "__main__":
    main()
