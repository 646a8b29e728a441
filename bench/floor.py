"""The floor: a bare aiohttp websocket relay (aiohttp client in, aiohttp websocket out).

Nothing else: no framework, no database, no channel layer, no coalescing. One pooled
aiohttp.ClientSession reads the upstream's SSE body as it arrives and writes one websocket
frame per token. It speaks the app's frames ("send" in; "state" on connect, "delta" {message_id,
seq, text} and "reply.end" out) so the same load generator drives it; every other figure of the
benchmark is reported as a ratio to this one, measured in the same run.

`python -m bench.floor --upstream http://127.0.0.1:PORT/v1` prints the port it listens on.
"""

import argparse
import asyncio
import json
import socket

from aiohttp import ClientSession, ClientTimeout, TCPConnector, WSMsgType, web

from bench.util import raise_fd_limit


class Relay:
    def __init__(self, upstream: str) -> None:
        self.url = upstream.rstrip("/") + "/chat/completions"
        self.session: ClientSession | None = None
        self.next_id = 0
        self.tasks: set[asyncio.Task] = set()

    async def start(self, app: web.Application) -> None:
        self.session = ClientSession(
            connector=TCPConnector(limit=1000), timeout=ClientTimeout(total=None, connect=10)
        )

    async def stop(self, app: web.Application) -> None:
        await self.session.close()

    async def socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str('{"type":"state","reply":null}')
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if frame.get("type") == "send":
                self.next_id += 1
                task = asyncio.create_task(self.relay(ws, self.next_id, frame["text"]))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        return ws

    async def relay(self, ws: web.WebSocketResponse, message_id: int, text: str) -> None:
        body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": text}]}
        seq = 0
        buffer = b""
        async with self.session.post(self.url, json=body) as response:
            async for chunk in response.content.iter_any():
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
                        await ws.send_str(
                            json.dumps(
                                {
                                    "type": "delta",
                                    "message_id": message_id,
                                    "seq": seq,
                                    "text": content,
                                }
                            )
                        )
        await ws.send_str(json.dumps({"type": "reply.end", "message": {"id": message_id}}))


async def serve(upstream: str) -> None:
    relay = Relay(upstream)
    app = web.Application()
    app.router.add_get("/ws/conversations/{id}/", relay.socket)
    app.on_startup.append(relay.start)
    app.on_cleanup.append(relay.stop)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    print(sock.getsockname()[1], flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    raise_fd_limit()
    asyncio.run(serve(args.upstream))


if __name__ == "__main__":
    main()
