"""Splitting an upstream's SSE byte stream into events, without re-encoding them."""

from __future__ import annotations

import orjson

DONE = b"[DONE]"


class SseSplitter:
    """Feed it bytes as they arrive; it returns every complete event, framed `...\\n\\n`.

    Line endings are normalised to `\\n` (the API relays events as they are). Comment-only
    events (`: keep-alive`) are dropped: the API sends its own pings. `done` turns true at the
    event whose data is `[DONE]` (`data: [DONE]` or `data:[DONE]`), which is not returned (the
    API writes its own on the end message). An event whose data is a JSON object with an
    `error` (an upstream failing mid-stream) ends the stream too: it is not returned either but
    kept as `error`, its data, for the caller to relay as the stream's last event.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.done = False
        self.error: bytes | None = None

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
            data = event_data(raw).strip()
            if data == DONE or is_error(data):
                self.error = None if data == DONE else data
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
