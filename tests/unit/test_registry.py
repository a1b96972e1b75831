"""The agent registry: liveness by receive time, convergence from heartbeats, persistence."""

from __future__ import annotations

from pathlib import Path

from services.dispatcher.registry import AgentTable, Registry, SqliteStore
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
    table.stop_listening()
    assert table.view(10_000).warming_up
    table.start_listening(10_000)
    assert table.view(10_009).warming_up
    assert not table.view(10_011).warming_up
    assert table.view(10_011).known == {"local_a", "local_b"}
