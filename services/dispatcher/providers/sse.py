"""Splitting an upstream's SSE byte stream into events, without re-encoding them."""

from __future__ import annotations

import orjson

from shared.messages import MAX_REPLY_BYTES

DONE = b"[DONE]"
MAX_EVENT_BYTES = MAX_REPLY_BYTES  # what one reply message carries (MAX_REPLY_BYTES)


class SseEventTooLargeError(ValueError):
    """An event grew past the splitter's `max_event_bytes` without ending."""


class SseSplitter:
    """Feed it bytes as they arrive; it returns every complete event, framed `...\\n\\n`.

    Line endings are normalised to `\\n` (the API relays events as they are). Comment-only
    events (`: keep-alive`) are dropped: the API sends its own pings. `done` turns true at the
    event whose data is `[DONE]` (`data: [DONE]` or `data:[DONE]`), which is not returned (the
    API writes its own on the end message). An event whose data is a JSON object with an
    `error` (an upstream failing mid-stream) ends the stream too: it is not returned either but
    kept as `error`, its data, for the caller to relay as the stream's last event.

    Each byte is normalised and searched once, so a large event arriving in many small reads
    costs time in proportion to its size, and an event past `max_event_bytes` raises
    SseEventTooLargeError instead of growing without bound.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # no event ends before this offset of the buffer
        self._cr_held = False  # the last piece ended in `\r`: its `\n` may come next
        self._max = max_event_bytes
        self.done = False
        self.error: bytes | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            return []
        if self._cr_held:
            data = b"\r" + data
            self._cr_held = False
        if b"\r" in data:
            if data.endswith(b"\r"):
                data = data[:-1]
                self._cr_held = True
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self._buffer += data
        events: list[bytes] = []
        while not self.done:
            end = self._buffer.find(b"\n\n", self._scanned)
            if end < 0:
                # A `\n` at the very end may be the first half of the next blank line.
                self._scanned = max(0, len(self._buffer) - 1)
                break
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            self._scanned = 0
            data = event_data(raw).strip()
            if data == DONE or is_error(data):
                self.error = None if data == DONE else data
                self.done = True
                self._buffer.clear()
                break
            if is_comment(raw):
                continue
            events.append(raw + b"\n\n")
        if len(self._buffer) > self._max:
            raise SseEventTooLargeError(f"a stream event larger than {self._max} bytes")
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete (a stream that ends here was cut)."""
        return bytes(self._buffer) + (b"\r" if self._cr_held else b"")


def event_data(raw: bytes) -> bytes:
    """The data of one event, as the SSE spec reads it: its `data` fields' values (one space
    after the colon dropped, if there is one) joined with `\\n`."""
    values: list[bytes] = []
    for line in raw.split(b"\n"):
        name, _, value = line.partition(b":")
        if name == b"data":
            values.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(values)


def is_error(data: bytes) -> bool:
    """Whether an event's data is a JSON object with a top-level `error`.

    Only data that names `"error"` at all is parsed: the chunks of a healthy stream are not.
    """
    if not data.startswith(b"{") or b'"error"' not in data:
        return False
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    # `"error": null` beside the choices, from some compatible servers, is no error.
    return isinstance(parsed, dict) and parsed.get("error") is not None


def is_comment(raw: bytes) -> bool:
    lines = [line for line in raw.split(b"\n") if line]
    return all(line.startswith(b":") for line in lines)
