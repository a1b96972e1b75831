"""The heap a service settles into once started (shared.runner.settle_heap)."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from shared.runner import settle_heap
from tests.support.heap import collect_unheard


@pytest.fixture
def restored_gc() -> Iterator[None]:
    collect_unheard()  # settle_heap() collects: not other tests' garbage on this test's account
    yield
    gc.unfreeze()  # the test process's heap goes back under the collector


@pytest.mark.usefixtures("restored_gc")
def test_what_is_alive_at_start_is_no_longer_scanned() -> None:
    loaded = object.__new__(type("Loaded", (), {}))  # stands for a module-level object
    settle_heap()
    assert gc.get_freeze_count() > 0
    assert not any(o is loaded for o in gc.get_objects())  # frozen: out of the collector's sight


@pytest.mark.usefixtures("restored_gc")
def test_cycles_made_after_settling_are_still_collected_automatically() -> None:
    class Node:
        other: object = None

    thresholds = gc.get_threshold()
    settle_heap()
    assert gc.isenabled() and gc.get_threshold() == thresholds
    node = Node()
    node.other = node  # a cycle: reference counting alone never frees it
    gone = weakref.ref(node)
    del node
    # No gc.collect() here: it collects even with the collector off. Allocations kept alive
    # (freed ones lower the count again) bring on a young pass, which must free the cycle.
    kept: list[list[None]] = []
    deadline = time.monotonic() + 5
    while gone() is not None and len(kept) < 1_000_000 and time.monotonic() < deadline:
        kept.append([])
    assert gone() is None, f"no automatic collection after {len(kept)} allocations"
