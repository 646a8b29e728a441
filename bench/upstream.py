"""The benchmark's fake model provider: an OpenAI-compatible SSE stream at a fixed pace.

`python -m bench.upstream --tokens T --rate R --ttft S` listens on an ephemeral loopback port and
prints it. Every POST to .../chat/completions gets a chunked, keep-alive SSE reply: after S
seconds, T content chunks at R per second, then finish + usage and [DONE].

Each token's text carries its index and the moment it was written (`<i>@<monotonic>|`), and
the first one also the moment the request arrived (`r@<monotonic>|`), so the receiving end
measures per-token added latency and time to first token over the upstream's own. Linux's
CLOCK_MONOTONIC is system wide, so the clocks of the two processes agree.
"""

import argparse
import asyncio
import json
import time

from bench.util import raise_fd_limit

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
PREFIX = (
    b'data: {"id":"bench","object":"chat.completion.chunk","created":0,"model":"bench",'
    b'"choices":[{"index":0,"delta":{"content":"'
)
SUFFIX = b'"},"finish_reason":null}]}\n\n'


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Stream:
    """One reply, written by timer callbacks (cheaper than a coroutine per stream)."""

    def __init__(self, writer: asyncio.StreamWriter, tokens: int, rate: float, ttft: float):
        self.writer = writer
        self.tokens = tokens
        self.interval = 1.0 / rate
        self.loop = asyncio.get_running_loop()
        self.arrived = time.monotonic()
        self.index = 0
        self.done = self.loop.create_future()
        writer.write(HEAD)
        self.start = self.loop.time() + ttft
        self.loop.call_at(self.start, self.tick)

    def tick(self) -> None:
        if self.writer.is_closing():
            self.done.set_result(None)
            return
        now = time.monotonic()
        text = f"{self.index}@{now:.6f}|"
        if self.index == 0:
            text = f"r@{self.arrived:.6f}|" + text
        self.writer.write(chunked(PREFIX + text.encode() + SUFFIX))
        self.index += 1
        if self.index < self.tokens:
            # Scheduled from the start, not from now: a late tick does not slow the whole stream.
            self.loop.call_at(self.start + self.index * self.interval, self.tick)
            return
        usage = {"prompt_tokens": 10, "completion_tokens": self.tokens}
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
        self.writer.write(chunked(b"data: " + json.dumps(end).encode() + b"\n\n"))
        self.writer.write(chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.done.set_result(None)


async def handle(reader, writer, *, tokens: int, rate: float, ttft: float) -> None:
    try:
        while True:  # keep-alive: the app's pooled client reuses connections
            line = await reader.readline()
            if not line:
                return
            length = 0
            while True:
                header = await reader.readline()
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            if b"/chat/completions" not in line:
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                continue
            await Stream(writer, tokens, rate, ttft).done
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(tokens: int, rate: float, ttft: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, tokens=tokens, rate=rate, ttft=ttft), "127.0.0.1", 0, backlog=4096
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--ttft", type=float, default=0.3)
    args = parser.parse_args()
    raise_fd_limit()
    asyncio.run(serve(args.tokens, args.rate, args.ttft))


if __name__ == "__main__":
    main()
