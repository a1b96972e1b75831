"""Collecting garbage inside the shared test process without inheriting other tests' warnings."""

from __future__ import annotations

import gc
import sys


def collect_unheard() -> None:
    """`gc.collect()`, with the unraisable-exception hook silenced meanwhile.

    What earlier tests on this worker left unreachable is collected too, such as an aio-pika
    connection dropped unclosed, whose `__del__` makes a close coroutine no loop may run; pytest
    would report its warning against whichever test happened to collect it."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
