"""Incremental SSE decoding: events survive any split of the byte stream."""

from __future__ import annotations

import pytest

from services.agent.sse import SseDecoder, SseEventTooLargeError

STREAM = (
    b'data: {"a":1}\n\n'
    b": ping\n\n"
    b'event: message\nid: 7\ndata: {"b":2}\n\n'
    b"data: line1\ndata: line2\n\n"
    b"data:nospace\n\n"
    b"data: [DONE]\n\n"
)
EVENTS = [b'{"a":1}', b'{"b":2}', b"line1\nline2", b"nospace", b"[DONE]"]


def decode_all(chunks: list[bytes]) -> list[bytes]:
    decoder = SseDecoder()
    events: list[bytes] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def test_whole_stream() -> None:
    assert decode_all([STREAM]) == EVENTS


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
def test_any_split(size: int) -> None:
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert decode_all(chunks) == EVENTS


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_other_line_endings(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    assert decode_all([stream]) == EVENTS
    assert decode_all([stream[i : i + 1] for i in range(len(stream))]) == EVENTS


def test_last_event_without_blank_line() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b'data: {"a":1}\n\ndata: {"b"') == [b'{"a":1}']
    assert decoder.feed(b":2}") == []
    assert decoder.close() == [b'{"b":2}']


def test_event_size_is_bounded() -> None:
    decoder = SseDecoder(max_event_bytes=10)
    with pytest.raises(SseEventTooLargeError):
        decoder.feed(b"data: " + b"x" * 20)
    decoder = SseDecoder(max_event_bytes=10)
    with pytest.raises(SseEventTooLargeError):
        decoder.feed(b"data: 123456\ndata: 123456\n")


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_an_event_comes_out_of_the_read_that_completes_it(newline: bytes) -> None:
    decoder = SseDecoder()
    first = b'data: {"a":1}' + newline * 2
    second = b"data: 2" + newline * 2
    assert decoder.feed(first) == [b'{"a":1}']
    assert decoder.feed(second) == [b"2"]
    assert decoder.close() == []


def test_a_crlf_split_across_reads_is_one_line_ending() -> None:
    decoder = SseDecoder()
    # `\r` | `\n`: the `\n` is not a blank line, so both data lines make one event.
    assert decoder.feed(b"data: 1\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: 2\r") == []
    assert decoder.feed(b"\n\r") == [b"1\n2"]  # the blank line's `\r` ends the event
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: 3\r\n\r\n") == [b"3"]


@pytest.mark.parametrize("empty", [b"data:\n\n", b"data: \n\n", b"data:\r\n\r\n"])
def test_an_event_with_empty_data_is_skipped(empty: bytes) -> None:
    stream = b'data: {"a":1}\n\n' + empty + b"data: [DONE]\n\n"
    assert decode_all([stream]) == [b'{"a":1}', b"[DONE]"]
    assert decode_all([stream[i : i + 1] for i in range(len(stream))]) == [b'{"a":1}', b"[DONE]"]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_a_large_event_in_small_reads_comes_out_whole(newline: bytes) -> None:
    """A multi-line megabyte event in 1 KiB reads arrives as it was sent (its line breaks,
    split between reads, included). Its cost is the bench's business, not this test's."""
    lines = [b"x" * 300_000, b"y" * 300_000, b"z" * 400_000]
    raw = b"".join(b"data: " + line + newline for line in lines) + newline
    decoder = SseDecoder()
    out: list[bytes] = []
    for i in range(0, len(raw), 1021):
        out += decoder.feed(raw[i : i + 1021])
    assert out == [b"\n".join(lines)]
    assert decoder.close() == []
