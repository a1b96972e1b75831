"""The agent registry: liveness by receive time, convergence from heartbeats, persistence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from services.dispatcher.registry import AgentRecord, AgentTable, Registry, SqliteStore
from shared.messages import AgentHeartbeat, AgentRegistration

REG = AgentRegistration(name="gpu1", endpoint="http://gpu1:5000", models=["local_a", "local_b"])


def test_registered_models_are_live_until_the_ttl() -> None:
    table = AgentTable(ttl=10)
    table.register(REG, now=100)
    assert table.view(105).live == {"local_a", "local_b"}
    assert table.view(111).live == set()
    assert table.view(111).known == {"local_a", "local_b"}


def test_heartbeat_keeps_alive_and_replaces_the_model_snapshot() -> None:
    table = AgentTable(ttl=10)
    table.register(REG, now=100)
    table.heartbeat(AgentHeartbeat(name="gpu1", models=["local_b"], load=3), now=108)
    view = table.view(115)
    assert view.live == {"local_b"}
    record = table.get("gpu1")
    assert record is not None and record.load == 3 and record.endpoint == "http://gpu1:5000"


def test_plain_heartbeat_keeps_models() -> None:
    table = AgentTable(ttl=10)
    table.register(REG, now=100)
    table.heartbeat(AgentHeartbeat(name="gpu1"), now=109)
    assert table.view(118).live == {"local_a", "local_b"}


def test_empty_dispatcher_converges_from_one_heartbeat() -> None:
    table = AgentTable(ttl=10)
    table.heartbeat(AgentHeartbeat(name="gpu2", models=["local_c"], load=0), now=50)
    assert table.view(51).live == {"local_c"}


def test_model_is_live_while_any_of_its_agents_is() -> None:
    table = AgentTable(ttl=10)
    table.register(REG, now=100)
    table.register(AgentRegistration(name="gpu2", models=["local_a"]), now=108)
    assert table.view(112).live == {"local_a"}


def test_registry_survives_a_restart_on_its_file(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    registry = Registry(AgentTable(ttl=10), SqliteStore(path))
    registry.record(REG, now=100)
    registry.record(AgentHeartbeat(name="gpu1", load=2), now=104)
    registry.close()

    reopened = Registry(AgentTable(ttl=10), SqliteStore(path))
    assert reopened.view(110).live == {"local_a", "local_b"}
    record = reopened.table.get("gpu1")
    assert record is not None and record.last_heartbeat == 104 and record.load == 2
    reopened.close()


def test_quotes_in_fields_are_stored_as_data(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "r.sqlite3"))
    registry = Registry(AgentTable(ttl=10), store)
    endpoint = "http://x/');DROP--"
    registry.record(AgentRegistration(name="gpu1", endpoint=endpoint, models=["local_a"]), now=1)
    assert [(r.name, r.endpoint) for r in store.load_all()] == [("gpu1", endpoint)]
    registry.close()


def test_an_agent_silent_past_forget_after_is_dropped_from_table_and_file(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "r.sqlite3")
    registry = Registry(AgentTable(ttl=10), SqliteStore(path), forget_after=100)
    registry.record(REG, now=0)  # local_a, local_b
    registry.record(AgentRegistration(name="gpu2", models=["local_a"]), now=0)
    registry.record(AgentHeartbeat(name="gpu2"), now=60)
    assert registry.view(99).known == {"local_a", "local_b"}  # dead, not yet forgotten: 503

    view = registry.view(101 + Registry.SWEEP_EVERY)  # gpu1 silent > 100 s; gpu2 too by now
    assert view.known == set()
    registry.record(AgentHeartbeat(name="gpu2", models=["local_a"]), now=170)  # back again
    assert registry.view(171).live == {"local_a"}
    registry.close()

    reopened = Registry(AgentTable(ttl=10), SqliteStore(path), forget_after=100)
    assert [r.name for r in reopened.table.records()] == ["gpu2"]
    reopened.close()


def test_forgetting_keeps_a_model_that_a_live_agent_serves(tmp_path: Path) -> None:
    registry = Registry(AgentTable(ttl=10), SqliteStore(str(tmp_path / "r")), forget_after=100)
    registry.record(REG, now=0)
    registry.record(AgentRegistration(name="gpu2", models=["local_a"]), now=150)
    view = registry.view(155)
    assert (view.known, view.live) == ({"local_a"}, {"local_a"})
    registry.close()


def test_a_dispatcher_warms_up_for_one_ttl_from_when_it_starts_listening() -> None:
    table = AgentTable(ttl=10)
    assert not table.view(0).warming_up  # a table nobody feeds: no warm-up
    table.start_listening(100)
    assert table.view(105).warming_up
    assert not table.view(111).warming_up


def test_a_dispatcher_cut_off_warms_up_until_one_ttl_after_it_listens_again() -> None:
    """However long the outage, and though its agents are still known: what was announced
    meanwhile never reached this table."""
    table = AgentTable(ttl=10)
    table.register(REG, now=100)
    table.start_listening(100)
    table.stop_listening(200)
    assert table.view(10_000).warming_up
    table.start_listening(10_000)
    assert table.view(10_009).warming_up
    assert not table.view(10_011).warming_up
    assert table.view(10_011).known == {"local_a", "local_b"}


def test_a_restarted_dispatcher_routes_the_models_live_when_it_stopped_until_it_has_heard(
    tmp_path: Path,
) -> None:
    """Its agents kept serving while it was away: the jobs that waited for it go to them,
    not to a 503, until one TTL after it listens again (their heartbeats take over)."""
    path = str(tmp_path / "r")
    registry = Registry(AgentTable(ttl=10), SqliteStore(path))
    registry.record(REG, now=100)  # local_a, local_b
    registry.record(AgentRegistration(name="old", models=["local_old"]), now=50)  # dead by 100
    registry.close()

    restarted = Registry(AgentTable(ttl=10), SqliteStore(path))
    restarted.table.start_listening(1_000)
    view = restarted.view(1_001)
    assert view.warming_up and view.live == {"local_a", "local_b"}
    assert "local_old" not in view.live and view.known == {"local_a", "local_b", "local_old"}
    restarted.record(AgentHeartbeat(name="gpu1", models=["local_a"]), now=1_005)
    assert restarted.view(1_011).live == {"local_a"}  # local_b's agent never came back
    restarted.close()


def test_a_dispatcher_cut_off_routes_the_models_live_when_it_lost_the_channel() -> None:
    table = AgentTable(ttl=10)
    table.register(REG, now=100)
    table.start_listening(100)
    table.register(AgentRegistration(name="gpu2", models=["local_c"]), now=150)
    table.stop_listening(155)  # local_a and local_b silent since 100: dead by then
    assert table.view(10_000).live == {"local_c"}
    table.start_listening(10_000)
    assert table.view(10_009).live == {"local_c"}
    assert table.view(10_011).live == set()


def test_a_leaving_agent_is_dead_at_once_and_its_models_stay_known() -> None:
    """503 until an agent serves them again, not 404; other agents of a model keep it live."""
    table = AgentTable(ttl=10)
    table.register(REG, now=100)  # local_a, local_b
    table.register(AgentRegistration(name="gpu2", models=["local_b"]), now=100)
    table.heartbeat(AgentHeartbeat(name="gpu1", leaving=True), now=101)
    view = table.view(101)
    assert view.live == {"local_b"} and view.known == {"local_a", "local_b"}
    table.heartbeat(AgentHeartbeat(name="gpu1", models=["local_a", "local_b"]), now=105)
    assert table.view(105).live == {"local_a", "local_b"}  # back after its restart


def test_a_replica_leaving_retires_only_its_own_process() -> None:
    """Replicas may share a name (and its token): a rolling restart, `--scale agent=N`. The
    leaving one marked the whole name dead, and the other's model answered 503 until its next
    heartbeat (review 2026-11-29)."""
    table = AgentTable(ttl=10)
    for instance in ("p1", "p2"):
        table.register(AgentRegistration(name="pool", models=["local_a"], instance=instance), 100)
    table.heartbeat(AgentHeartbeat(name="pool", instance="p1", leaving=True), now=101)
    assert table.view(101).live == {"local_a"}
    table.heartbeat(AgentHeartbeat(name="pool", instance="p2", leaving=True), now=102)
    assert table.view(102).live == set()


def test_replicas_of_one_name_serving_other_models_do_not_replace_each_others_snapshot() -> None:
    table = AgentTable(ttl=10)
    table.heartbeat(AgentHeartbeat(name="pool", instance="p1", models=["local_a"]), now=100)
    table.heartbeat(AgentHeartbeat(name="pool", instance="p2", models=["local_b"]), now=101)
    assert table.view(105).live == {"local_a", "local_b"}


def test_a_restarted_agent_retires_its_predecessors_record(tmp_path: Path) -> None:
    """A restart is a new instance: the old record kept a model the agent no longer serves
    known (503 "retry shortly") for AGENT_FORGET_AFTER, a day, instead of 404 (review
    2026-11-29)."""
    registry = Registry(AgentTable(ttl=10), SqliteStore(str(tmp_path / "r")))
    old = AgentRegistration(name="gpu1", models=["local_a"], instance="old")
    registry.record(old, now=100)
    registry.record(AgentHeartbeat(name="gpu1", instance="old", leaving=True), now=101)
    registry.record(AgentRegistration(name="gpu1", models=["local_b"], instance="new"), now=102)
    view = registry.view(103)
    assert (view.live, view.known) == ({"local_b"}, {"local_b"})
    assert [r.key for r in registry.store.load_all()] == [("gpu1", "new")]
    registry.close()


def test_a_crashed_agents_record_goes_once_its_successor_outlives_its_ttl() -> None:
    registry = Registry(AgentTable(ttl=10), SqliteStore(":memory:"))
    registry.record(AgentRegistration(name="gpu1", models=["local_a"], instance="old"), now=100)
    registry.record(AgentRegistration(name="gpu1", models=["local_b"], instance="new"), now=105)
    assert registry.view(106).known == {"local_a", "local_b"}  # it may still be alive
    registry.record(AgentHeartbeat(name="gpu1", instance="new"), now=111)  # "old" silent > TTL
    assert registry.view(112).known == {"local_b"}


def test_a_live_replica_of_the_same_name_is_kept() -> None:
    registry = Registry(AgentTable(ttl=10), SqliteStore(":memory:"))
    registry.record(AgentRegistration(name="pool", models=["local_a"], instance="p1"), now=100)
    registry.record(AgentRegistration(name="pool", models=["local_b"], instance="p2"), now=100)
    registry.record(AgentHeartbeat(name="pool", instance="p1"), now=105)
    assert registry.view(106).live == {"local_a", "local_b"}


def test_a_model_whose_last_agent_left_is_not_carried_into_a_restart(tmp_path: Path) -> None:
    """The warm-up carries the models live when the file was last written; one whose only
    agent had left was carried too, and its jobs waited out AGENT_QUEUE_TTL for a 503
    instead of getting `no_live_agent` at once (review 2026-11-29)."""
    path = str(tmp_path / "r")
    registry = Registry(AgentTable(ttl=10), SqliteStore(path))
    registry.record(REG, now=100)  # local_a, local_b
    registry.record(AgentRegistration(name="gpu2", models=["local_b"]), now=100)
    registry.record(AgentHeartbeat(name="gpu1", leaving=True), now=103)
    registry.close()
    reopened = Registry(AgentTable(ttl=10), SqliteStore(path))
    reopened.table.start_listening(104)
    view = reopened.view(104)
    assert view.warming_up and view.live == {"local_b"} and "local_a" in view.known
    reopened.close()


def test_a_file_written_before_instances_is_read_and_moved_over(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE agents (name TEXT PRIMARY KEY, endpoint TEXT NOT NULL, models TEXT "
            "NOT NULL, registered_at REAL NOT NULL, last_heartbeat REAL NOT NULL, load REAL)"
        )
        db.execute("INSERT INTO agents VALUES ('gpu1', 'http://g', '[\"local_a\"]', 1, 2, 0.5)")
    registry = Registry(AgentTable(ttl=10), SqliteStore(str(path)))
    assert registry.table.records() == [
        AgentRecord("gpu1", "http://g", ("local_a",), 1, 2, load=0.5, instance="", left=False)
    ]
    registry.record(AgentHeartbeat(name="gpu1"), now=5)  # the same agent, not yet restarted
    assert [r.last_heartbeat for r in registry.table.records()] == [5]
    registry.close()
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "agents" not in tables
    assert [r.key for r in SqliteStore(str(path)).load_all()] == [("gpu1", "")]


def test_a_file_written_again_by_an_older_dispatcher_keeps_the_newer_row(tmp_path: Path) -> None:
    """An older dispatcher sharing the file recreates `agents` and writes there: moved over
    again, its fresher row must win, not be dropped with the table (review 2026-11-29)."""
    path = tmp_path / "r.sqlite3"
    store = SqliteStore(str(path))
    store.save(AgentRecord("gpu1", "", ("local_a",), 1, 2))
    store.close()
    with sqlite3.connect(path) as db:  # the older dispatcher
        db.execute(
            "CREATE TABLE agents (name TEXT PRIMARY KEY, endpoint TEXT NOT NULL, models TEXT "
            "NOT NULL, registered_at REAL NOT NULL, last_heartbeat REAL NOT NULL, load REAL)"
        )
        db.execute("INSERT INTO agents VALUES ('gpu1', '', '[\"local_b\"]', 1, 9, NULL)")
    assert [(r.models, r.last_heartbeat) for r in SqliteStore(str(path)).load_all()] == [
        (("local_b",), 9)
    ]


def test_a_leaving_agent_is_forgotten_on_the_usual_schedule(tmp_path: Path) -> None:
    registry = Registry(AgentTable(ttl=10), SqliteStore(str(tmp_path / "r")), forget_after=100)
    registry.record(REG, now=0)
    registry.record(AgentHeartbeat(name="gpu1", leaving=True), now=50)
    assert registry.view(60).known == {"local_a", "local_b"}
    assert registry.view(150).known == set()


def test_a_model_dropped_by_its_last_agent_is_no_longer_live() -> None:
    table = AgentTable(ttl=10)
    table.register(REG, now=100)
    table.heartbeat(AgentHeartbeat(name="gpu1", models=["local_a"]), now=101)
    assert table.view(102).live == {"local_a"}
    assert table.view(102).known == {"local_a"}


# Agents, models and times small enough that agents overlap on models and records go back in
# time (a record loaded from the file, a registration after a later heartbeat).
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["gpu1", "gpu2", "gpu3"]),
        st.sampled_from(["", "p1", "p2"]),  # replicas of one name
        st.none() | st.lists(st.sampled_from(["local_a", "local_b", "local_c"]), max_size=3),
        st.sampled_from(["register", "heartbeat", "leave"]),
        st.integers(0, 40),
    ),
    max_size=30,
)


@given(_OPS, st.integers(0, 60))
def test_the_liveness_index_matches_a_scan_of_every_agent(
    ops: list[tuple[str, str, list[str] | None, str, int]], at: int
) -> None:
    """Heartbeats update the per-model index in place; after any sequence it must say what a
    scan of every agent's record says."""
    table = AgentTable(ttl=10)
    for name, instance, models, kind, now in ops:
        if kind == "register":
            registration = AgentRegistration(
                name=name, models=models or ["local_a"], instance=instance
            )
            record = table.register(registration, now=now)
        else:
            heartbeat = AgentHeartbeat(
                name=name, instance=instance, models=models, leaving=kind == "leave"
            )
            record = table.heartbeat(heartbeat, now=now)
        table.retire_dead_namesakes(record, now)  # as `Registry.record` does
    records = table.records()
    view = table.view(at)
    assert view.known == {m for r in records for m in r.models}
    assert view.live == {m for r in records for m in r.models if r.last_heartbeat >= at - 10}
