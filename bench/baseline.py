"""The bare minimum relay the app is measured against: httpx stream in, websocket out.

No Django, no database, no channel layer, no coalescing: one pooled httpx.AsyncClient reads the
upstream's raw bytes, splits SSE events itself (the lean way the app does it too) and writes one
websocket frame per token to the socket that asked. Speaks the app's frames ({"type": "send"}
in; "delta" {message_id, seq, text} and "reply.end" out) so the same load generator drives both.

`python -m bench.baseline --upstream http://127.0.0.1:PORT/v1` prints the port it listens on.
"""

import argparse
import asyncio
import json

import httpx

from bench.util import raise_fd_limit
from bench.ws import ServerProtocol


class Relay:
    def __init__(self, upstream: str) -> None:
        self.url = upstream.rstrip("/") + "/chat/completions"
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(120.0, connect=10.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        )
        self.next_id = 0
        self.tasks: set[asyncio.Task] = set()

    def on_text(self, conn: ServerProtocol, text: str) -> None:
        frame = json.loads(text)
        if frame.get("type") == "send":
            self.next_id += 1
            task = asyncio.create_task(self.relay(conn, self.next_id, frame["text"]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def relay(self, conn: ServerProtocol, message_id: int, text: str) -> None:
        body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": text}]}
        seq = 0
        buffer = b""
        async with self.http.stream("POST", self.url, json=body) as response:
            async for chunk in response.aiter_raw():
                events = (buffer + chunk).split(b"\n\n")
                buffer = events.pop()
                for event in events:
                    data = event[6:] if event.startswith(b"data: ") else b""
                    if not data or data == b"[DONE]":
                        continue
                    choices = json.loads(data).get("choices") or [{}]
                    content = (choices[0].get("delta") or {}).get("content")
                    if content:
                        seq += 1
                        conn.send_text(
                            json.dumps(
                                {
                                    "type": "delta",
                                    "message_id": message_id,
                                    "seq": seq,
                                    "text": content,
                                }
                            )
                        )
        conn.send_text(json.dumps({"type": "reply.end", "message": {"id": message_id}}))


async def serve(upstream: str) -> None:
    relay = Relay(upstream)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ServerProtocol(relay.on_text, '{"type":"state","reply":null}'),
        "127.0.0.1",
        0,
        backlog=4096,
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    raise_fd_limit()
    asyncio.run(serve(args.upstream))


if __name__ == "__main__":
    main()
