"""A minimal RFC 6455 websocket for the benchmark: a client for the load generator and a server
for the bare baseline relay, both on plain asyncio protocols.

Text frames only, no extensions, no fragmentation beyond what a server may send (continuation
frames are joined). Kept tiny and cheap on purpose: the load generator's own per-frame cost is
part of every latency figure, for the app and the baseline alike.
"""

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x8, 0x9, 0xA


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def encode_frame(payload: bytes, opcode: int = OP_TEXT, *, mask: bool) -> bytes:
    head = bytearray([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 65536:
        head.append(bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(bit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    masked = _mask(payload, key)
    return bytes(head) + key + masked


class FrameReader:
    """Incremental frame parser: feed bytes, get (opcode, payload) for each complete message."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._parts: list[bytes] = []
        self._opcode = OP_TEXT

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        out = []
        buf = self.buffer
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n = struct.unpack_from("!H", buf, 2)[0]
                pos = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n = struct.unpack_from("!Q", buf, 2)[0]
                pos = 10
            masked = b1 & 0x80
            key = b""
            if masked:
                if len(buf) < pos + 4:
                    break
                key = bytes(buf[pos : pos + 4])
                pos += 4
            if len(buf) < pos + n:
                break
            payload = bytes(buf[pos : pos + n])
            del buf[: pos + n]
            if masked and n:
                payload = _mask(payload, key)
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode >= 0x8:  # control frames are never fragmented
                out.append((opcode, payload))
                continue
            if opcode != OP_CONT:
                self._opcode = opcode
            self._parts.append(payload)
            if fin:
                out.append((self._opcode, b"".join(self._parts)))
                self._parts = []
        return out


class ClientProtocol(asyncio.Protocol):
    """A websocket client connection; `on_text(str)` is called for every text message."""

    def __init__(self, request: bytes, on_text: Callable[[str], None]) -> None:
        self.request = request
        self.on_text = on_text
        self.handshake = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.reader = FrameReader()
        self._head = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.handshake.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self._head.split(b"\r\n", 1)[0]
            rest = self._head[end + 4 :]
            if b" 101 " not in status + b" ":
                self.handshake.set_exception(ConnectionError(status.decode(errors="replace")))
                self.transport.close()
                return
            self.handshake.set_result(None)
            data = rest
            if not data:
                return
        for opcode, payload in self.reader.feed(data):
            if opcode == OP_TEXT:
                self.on_text(payload.decode())
            elif opcode == OP_PING:
                self.transport.write(encode_frame(payload, OP_PONG, mask=True))
            elif opcode == OP_CLOSE:
                self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionError("closed during handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send_text(self, text: str) -> None:
        self.transport.write(encode_frame(text.encode(), mask=True))

    def close(self) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.write(encode_frame(b"\x03\xe8", OP_CLOSE, mask=True))
            self.transport.close()


async def connect(
    host: str, port: int, path: str, on_text: Callable[[str], None], *, headers: dict[str, str]
) -> ClientProtocol:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: ClientProtocol(request, on_text), host, port)
    await protocol.handshake
    return protocol


class ServerProtocol(asyncio.Protocol):
    """A websocket server connection: `handler(conn, text)` is called for every text message."""

    def __init__(
        self, handler: Callable[["ServerProtocol", str], None], greeting: str = ""
    ) -> None:
        self.handler = handler
        self.greeting = greeting  # a text frame sent as soon as the socket is open
        self.reader = FrameReader()
        self._head = b""
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            key = b""
            for line in self._head[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
            )
            self.open = True
            if self.greeting:
                self.send_text(self.greeting)
            data = self._head[end + 4 :]
            if not data:
                return
        for opcode, payload in self.reader.feed(data):
            if opcode == OP_TEXT:
                self.handler(self, payload.decode())
            elif opcode == OP_PING:
                self.transport.write(encode_frame(payload, OP_PONG, mask=False))
            elif opcode == OP_CLOSE:
                self.transport.close()

    def connection_lost(self, exc) -> None:
        self.open = False

    def send_text(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(text.encode(), mask=False))
