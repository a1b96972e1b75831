"""Splitting an upstream's SSE byte stream into events, without re-encoding them."""

from __future__ import annotations

DONE = b"[DONE]"


class SseSplitter:
    """Feed it bytes as they arrive; it returns every complete event, framed `...\\n\\n`.

    Line endings are normalised to `\\n` (the API relays events as they are). Comment-only
    events (`: keep-alive`) are dropped: the API sends its own pings. `done` turns true at the
    event whose data is `[DONE]` (`data: [DONE]` or `data:[DONE]`), which is not returned (the
    API writes its own on the end message).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            return []
        self._buffer += data
        if b"\r" in self._buffer:
            # Hold back a trailing \r: its \n may be in the next piece.
            keep = self._buffer.endswith(b"\r")
            text = self._buffer[:-1] if keep else self._buffer
            self._buffer = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (
                b"\r" if keep else b""
            )
        events: list[bytes] = []
        while not self.done:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                break
            raw = self._buffer[:end]
            self._buffer = self._buffer[end + 2 :]
            if event_data(raw).strip() == DONE:
                self.done = True
                self._buffer = b""
                break
            if is_comment(raw):
                continue
            events.append(raw + b"\n\n")
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete (a stream that ends here was cut)."""
        return self._buffer


def event_data(raw: bytes) -> bytes:
    """The data of one event, as the SSE spec reads it: its `data` fields' values (one space
    after the colon dropped, if there is one) joined with `\\n`."""
    values: list[bytes] = []
    for line in raw.split(b"\n"):
        name, _, value = line.partition(b":")
        if name == b"data":
            values.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(values)


def is_comment(raw: bytes) -> bool:
    lines = [line for line in raw.split(b"\n") if line]
    return all(line.startswith(b":") for line in lines)
