"""Reading a Server-Sent Events stream incrementally, as bytes (pure; no I/O).

Only `data:` fields matter to the router: an event's data lines are joined with `\\n` and the
event ends at a blank line. Comments (`: ping`), `event:`, `id:` and `retry:` fields are
ignored, and so is an event whose data is empty (`data:` alone): it carries nothing to relay,
and a client's SDK would fail to parse it. Lines may end in `\\n`, `\\r\\n` or `\\r`, and may be
split across network reads; an event comes out of the read that completes it.
"""

from __future__ import annotations


class SseEventTooLargeError(ValueError):
    """One line or event of the stream grew past the decoder's `max_event_bytes`."""


class SseDecoder:
    """Feed raw bytes, get the `data` payload of every event completed so far.

    Each byte is normalised and split once (a line's start is kept apart until its end
    arrives), so a multi-megabyte event arriving in many small reads costs time in proportion
    to its size, not to its size squared: the agent's loop, and every other stream on it,
    would stall behind it.
    """

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._pending = bytearray()  # the start of a line whose end has not arrived
        self._after_cr = False  # the last read ended in `\r`: a `\n` next is its second half
        self._data: list[bytes] = []
        self._size = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """Raises SseEventTooLargeError when one event grows past `max_event_bytes`."""
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # a `\r\n` split across reads: its `\r` already ended the line
            self._after_cr = False
        if chunk:
            self._after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        rest = lines.pop()
        events: list[bytes] = []
        if lines and self._pending:
            self._pending += lines[0]
            lines[0] = bytes(self._pending)
            self._pending.clear()
        for line in lines:
            self._line(line, events)
        self._pending += rest
        if len(self._pending) > self._max:
            raise SseEventTooLargeError("an SSE line is larger than the limit")
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            data = b"\n".join(self._data)
            if data:
                events.append(data)
            self._data.clear()
            self._size = 0
            return
        field, sep, value = line.partition(b":")
        if field != b"data" or not sep:
            return  # a comment, another field, or a field without a value
        if value.startswith(b" "):
            value = value[1:]
        self._size += len(value)
        if self._size > self._max:
            raise SseEventTooLargeError("an SSE event is larger than the limit")
        self._data.append(value)

    def close(self) -> list[bytes]:
        """The last event when the stream ended without its blank line."""
        events = self.feed(b"\n\n") if self._pending or self._data else []
        self._pending.clear()
        return events
