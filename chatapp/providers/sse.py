"""Incremental Server-Sent Events parsing over raw bytes.

Network chunks split lines anywhere (even inside a UTF-8 sequence), so bytes are buffered up to
the next newline before decoding. Comment lines (`: keep-alive`), `event:`/`id:` fields and
extra blank lines are skipped; `data:` is accepted with or without its space.
"""


class SSEParser:
    __slots__ = ("_buffer", "_data")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """Add bytes; return the data of every event completed by them."""
        lines = (self._buffer + chunk).split(b"\n")
        self._buffer = lines.pop()
        events: list[str] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                if value.startswith(b" "):
                    value = value[1:]
                self._data.append(value.decode("utf-8", errors="replace"))
        return events

    def close(self) -> list[str]:
        """At end of stream: whatever event was still open (a server may omit the last blank line)."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        self._buffer = b""
        return events
