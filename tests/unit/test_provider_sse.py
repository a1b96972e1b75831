"""Splitting an upstream SSE body into events, whatever the network's piece boundaries."""

from __future__ import annotations

import pytest

from services.dispatcher.providers.sse import SseEventTooLargeError, SseSplitter

EVENTS = [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b'data: {"c":"x\\ny"}\n\n']
BODY = b"".join(EVENTS) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(BODY)])
def test_events_come_out_whole_and_unchanged(size: int) -> None:
    splitter = SseSplitter()
    out: list[bytes] = []
    for i in range(0, len(BODY), size):
        out += splitter.feed(BODY[i : i + size])
    assert out == EVENTS
    assert splitter.done


def test_done_is_not_returned_and_nothing_after_it() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b'data: [DONE]\n\ndata: {"late":1}\n\n') == []
    assert splitter.done
    assert splitter.feed(b'data: {"later":1}\n\n') == []


def test_crlf_is_normalised_even_across_pieces() -> None:
    splitter = SseSplitter()
    out = splitter.feed(b'data: {"a":1}\r') + splitter.feed(b"\n\r\ndata: [DONE]\r\n\r\n")
    assert out == [b'data: {"a":1}\n\n']
    assert splitter.done


def test_comments_are_dropped_and_multiline_events_kept() -> None:
    splitter = SseSplitter()
    out = splitter.feed(b": keep-alive\n\nevent: x\ndata: {}\n\n: ping\n\n")
    assert out == [b"event: x\ndata: {}\n\n"]


def test_an_incomplete_event_stays_pending() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b'data: {"a":1}\n\ndata: {"b"') == [b'data: {"a":1}\n\n']
    assert splitter.pending == b'data: {"b"'
    assert not splitter.done


@pytest.mark.parametrize(
    "done",
    [b"data:[DONE]", b"data: [DONE]", b"event: end\ndata:[DONE]", b"data: [DONE] "],
)
def test_done_is_read_from_the_data_field_with_or_without_its_space(done: bytes) -> None:
    """The SSE spec drops one optional space after `data:`; OpenAI-compatible servers may
    write `data:[DONE]`."""
    splitter = SseSplitter()
    assert splitter.feed(b'data:{"a":1}\n\n' + done + b"\n\n") == [b'data:{"a":1}\n\n']
    assert splitter.done


def test_an_event_whose_data_only_mentions_done_is_an_event() -> None:
    splitter = SseSplitter()
    events = [b'data: "[DONE]"\n\n', b"data: [DONE]\ndata: more\n\n", b"[DONE]: x\n\n"]
    assert splitter.feed(b"".join(events)) == events
    assert not splitter.done


ERROR_EVENT = b'data: {"error":{"message":"The server had an error","type":"server_error"}}\n\n'


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_an_error_event_ends_the_stream_and_is_kept_for_the_caller(size: int) -> None:
    """Whatever follows an upstream's error event (a `[DONE]`, more data) is dropped."""
    body = EVENTS[0] + ERROR_EVENT + b'data: {"late":1}\n\ndata: [DONE]\n\n'
    splitter = SseSplitter()
    out: list[bytes] = []
    for i in range(0, len(body), size):
        out += splitter.feed(body[i : i + size])
    assert out == EVENTS[:1]
    assert splitter.done
    assert splitter.error == ERROR_EVENT[len(b"data: ") : -2]


def test_an_event_that_only_mentions_error_is_an_event() -> None:
    events = [
        b'data: {"choices":[{"delta":{"content":"\\"error\\""}}]}\n\n',
        b'data: {"choices":[{"finish_reason":"error"}],"x":{"error":1}}\n\n',
        b'data: ["error"]\n\n',
        b'data: {"error" oops\n\n',
        b'data: {"choices":[{"delta":{"content":"hi"}}],"error":null}\n\n',  # a compatible server
    ]
    splitter = SseSplitter()
    assert splitter.feed(b"".join(events)) == events
    assert not splitter.done and splitter.error is None


def test_a_large_event_in_small_pieces_comes_out_whole() -> None:
    """A megabyte event in 1 KiB reads (with `\\r\\n` endings split between reads) arrives
    as it was sent."""
    event = b"data: " + b"x" * 1_000_000 + b"\r\n\r\n"
    splitter = SseSplitter()
    out: list[bytes] = []
    for i in range(0, len(event), 1023):
        out += splitter.feed(event[i : i + 1023])
    assert out == [b"data: " + b"x" * 1_000_000 + b"\n\n"]
    assert splitter.pending == b""


def test_an_event_past_the_limit_raises_instead_of_growing() -> None:
    splitter = SseSplitter(max_event_bytes=100)
    assert splitter.feed(b"data: " + b"x" * 90 + b"\n\n") == [b"data: " + b"x" * 90 + b"\n\n"]
    splitter.feed(b"data: " + b"y" * 60)
    with pytest.raises(SseEventTooLargeError):
        splitter.feed(b"y" * 60)
