"""A broker restart or outage, as aio-pika and aiormq log it: no ERROR for what heals itself, no
line per connection per second, real errors kept (records shaped as aio-pika 10 / aiormq 7 emit
them: see their `robust_connection.py`, `tools.py` and `connection.py`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.exceptions import AMQPConnectionError, ConnectionClosed, ConnectionFrameError

from shared.amqp import Broker
from shared.logs import QuietReconnects

CONN = '"amqp://guest:******@127.0.0.1:5672/?heartbeat=15"'


def record(
    name: str, level: int, msg: str, *args: object, exc: BaseException | None = None
) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(name, level, "x.py", 1, msg, args, exc_info)


def forced_close() -> logging.LogRecord:
    return record(
        "aiormq.connection",
        logging.ERROR,
        'Unexpected connection close from remote "%s", '
        "Connection.Close(reply_code=%r, reply_text=%r)",
        CONN,
        320,
        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
    )


def reader_error(text: str, cause: BaseException | None = None) -> AMQPConnectionError:
    """What aiormq's frame reader raises when its socket fails: the socket's error chained."""
    try:
        raise AMQPConnectionError(text) from cause
    except AMQPConnectionError as exc:
        return exc


def reader_exited(exc: BaseException) -> logging.LogRecord:
    return record(
        "aiormq.connection",
        logging.WARNING,
        "Cancelling cause reader exited abnormally",
        exc=exc,
    )


class RobustChannel:  # its bound method's repr is what aio-pika's callback record shows
    def _on_close(self) -> None: ...


class OneShotCallback:
    def __repr__(self) -> str:
        return f"<OneShotCallback: cb={RobustChannel()._on_close!r}>"


def callback_error(exc: Exception) -> logging.LogRecord:
    return record(
        "aio_pika.tools",
        logging.ERROR,
        "Callback %r error: %s: %s",
        OneShotCallback(),
        type(exc).__name__,
        exc,
    )


def attempt_failed() -> logging.LogRecord:
    return record(
        "aio_pika.robust_connection",
        logging.WARNING,
        'Connection attempt to "%s" failed: %s. Reconnecting after %r seconds.',
        CONN,
        ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5672)"),
        1,
    )


@pytest.fixture
def at_info() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.setLevel(saved)


@pytest.mark.parametrize(
    "healed",
    [
        forced_close(),
        record(
            "aiormq.connection",
            logging.WARNING,
            "Cancelling cause reader exited abnormally",
            exc=ConnectionClosed(320, "CONNECTION_FORCED - restart"),
        ),
        record(
            "aiormq.connection",
            logging.WARNING,
            "Cancelling cause reader exited abnormally",
            exc=asyncio.IncompleteReadError(b"", 7),
        ),
        reader_exited(
            reader_error(
                "Server connection reset: ConnectionResetError(104, 'Connection reset by peer')",
                ConnectionResetError(104, "Connection reset by peer"),
            )
        ),
        reader_exited(
            reader_error(
                "Server connection unexpectedly closed. Read 0 bytes but 1 bytes expected",
                asyncio.IncompleteReadError(b"", 1),
            )
        ),
        callback_error(ChannelInvalidStateError("No active transport in channel")),
        callback_error(RuntimeError('<Connection: "amqp://guest:******@h/" at 0x7f> closed')),
    ],
    ids=[
        "forced-close",
        "reader-closed",
        "reader-eof",
        "reader-reset",
        "reader-eof-wrapped",
        "channel-invalid",
        "connection-closed",
    ],
)
def test_what_heals_itself_is_debug(at_info: None, healed: logging.LogRecord) -> None:
    assert not QuietReconnects().filter(healed)  # dropped at INFO
    assert healed.levelno == logging.DEBUG and healed.levelname == "DEBUG"
    logging.getLogger().setLevel(logging.DEBUG)
    assert QuietReconnects().filter(healed)  # shown at DEBUG


@pytest.mark.parametrize(
    "real",
    [
        record(
            "aiormq.connection",
            logging.ERROR,
            'Unexpected connection close from remote "%s", '
            "Connection.Close(reply_code=%r, reply_text=%r)",
            CONN,
            501,
            "FRAME_ERROR",
        ),
        record(
            "aiormq.connection",
            logging.WARNING,
            "Cancelling cause reader exited abnormally",
            exc=ConnectionFrameError("malformed frame"),
        ),
        reader_exited(reader_error("no socket error behind it")),
        callback_error(ValueError("a bug in a close callback")),
        record("aio_pika.robust_connection", logging.ERROR, "Reconnect attempt failed %s", CONN),
    ],
    ids=[
        "frame-error-close",
        "malformed-frame",
        "reader-error-uncaused",
        "callback-bug",
        "reconnect-failed",
    ],
)
def test_real_errors_stay(at_info: None, real: logging.LogRecord) -> None:
    level = real.levelno
    assert QuietReconnects().filter(real)
    assert real.levelno == level


def test_a_failed_reconnect_attempt_is_logged_once_a_minute(at_info: None) -> None:
    quiet = QuietReconnects(interval=60)
    # An outage of 10 s: two connections, each trying every second.
    shown = [quiet.filter(attempt_failed()) for _ in range(20)]
    assert shown == [True] + [False] * 19
    assert quiet.filter(forced_close()) is False  # other records are judged on their own
    quiet = QuietReconnects(interval=0)
    assert all(quiet.filter(attempt_failed()) for _ in range(3))  # past the interval: again


def test_a_broker_logs_one_lost_and_one_back_per_outage(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = Broker("amqp://guest:guest@127.0.0.1:5672/", name="api-1", publish_timeout=1)
    caplog.set_level(logging.INFO, "shared.amqp")
    restart = ConnectionClosed(320, "CONNECTION_FORCED - restart")
    broker._connection_closed(None, restart)  # both connections go
    broker._connection_closed(None, restart)
    broker._connection_restored()  # not connected: not back yet
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "api-1: lost the broker at 127.0.0.1:5672, vhost /" in caplog.records[0].getMessage()
    assert "CONNECTION_FORCED" in caplog.records[0].getMessage()
    monkeypatch.setattr(Broker, "is_connected", property(lambda _: True))
    broker._connection_restored()
    broker._connection_restored()
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
