"""The load generator: C people chatting at once, each as the page does it.

`python -m bench.loadgen PLAN.json` (its own process). The plan names the servers, the users'
session cookies (with a CSRF secret) and Origin, and the expected token count. Protocol with the
orchestrator over stdin/stdout: it prints `{"ready": C}` and waits for a line on stdin; then
every user at once goes through a whole chat: create the conversation over HTTP (the app's
`POST /api/conversations/`; the relays have none), open the websocket (time to accept, time to
the first frame), send a message, wait for its end, send the second. It prints the result as one
JSON line and closes the sockets after one more stdin line.

Per token it records receive time minus the upstream's write time; per reply: time to first
token over the upstream's own, tokens lost, duplicated and out of order, seq gaps, frames.
"""

import asyncio
import json
import sys
import time

from bench import ws
from bench.util import percentile, raise_fd_limit


class Reply:
    __slots__ = (
        "tokens",
        "latencies",
        "seen",
        "next_index",
        "duplicated",
        "out_of_order",
        "seq",
        "seq_errors",
        "frames",
        "deltas",
        "sent_at",
        "ttft_over",
        "done",
        "error",
        "counting",
        "end_seq_gap",
    )

    def __init__(self, tokens: int, latencies: list[float]) -> None:
        self.tokens = tokens
        self.latencies = latencies
        self.seen: set[int] = set()
        self.next_index = 0
        self.duplicated = 0
        self.out_of_order = 0
        self.seq = 0
        self.seq_errors = 0
        self.frames = 0
        self.deltas = 0
        self.sent_at = 0.0
        self.ttft_over: float | None = None
        self.done = asyncio.get_running_loop().create_future()
        self.error = ""
        self.counting = False
        self.end_seq_gap = 0

    def on_text(self, text: str) -> None:
        now = time.monotonic()
        if not self.counting:
            return  # the connect-time state frame
        self.frames += 1
        frame = json.loads(text)
        kind = frame.get("type")
        if kind == "delta":
            self.deltas += 1
            if frame.get("seq") != self.seq + 1:
                self.seq_errors += 1
            self.seq = frame.get("seq", self.seq)
            request_at = None
            for piece in frame.get("text", "").split("|"):
                if not piece:
                    continue
                key, _, value = piece.partition("@")
                if key == "r":
                    request_at = float(value)
                    continue
                index, written = int(key), float(value)
                self.latencies.append(now - written)
                if index in self.seen:
                    self.duplicated += 1
                    continue
                if index != self.next_index:
                    self.out_of_order += 1
                self.seen.add(index)
                self.next_index = max(self.next_index, index + 1)
                if index == 0 and request_at is not None:
                    # Whole wait minus the upstream's own first-token time.
                    self.ttft_over = (now - self.sent_at) - (written - request_at)
        elif kind == "reply.end" and not self.done.done():
            final_seq = (frame.get("message") or {}).get("seq")
            if isinstance(final_seq, int) and final_seq != self.seq:
                self.seq_errors += 1  # deltas missing before the end (or after it)
                self.end_seq_gap = final_seq - self.seq
            self.done.set_result(None)
        elif kind == "error":
            self.error = frame.get("message", "error")
            if not self.done.done():
                self.done.set_result(None)


def summary(values: list[float]) -> dict:
    values.sort()
    ms = [v * 1000 for v in values]
    return {
        "count": len(ms),
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": ms[-1] if ms else None,
        "mean": sum(ms) / len(ms) if ms else None,
    }


class User:
    """One person's chat: create the conversation, open the socket, send `messages` messages
    back to back (each after the previous reply ended)."""

    def __init__(self, index: int, plan: dict, latencies: list[float]) -> None:
        self.index = index
        self.plan = plan
        self.latencies = latencies
        self.replies: list[Reply] = []
        self.current: Reply | None = None
        self.socket: ws.ClientProtocol | None = None
        self.create_s: float | None = None
        self.accept_s: float | None = None
        self.state_s: float | None = None
        self.first_frame = asyncio.get_running_loop().create_future()
        self.failure = ""

    def on_text(self, text: str) -> None:
        if not self.first_frame.done():
            self.first_frame.set_result(time.monotonic())
        if self.current is not None:
            self.current.on_text(text)

    async def run(self, http, gate: asyncio.Semaphore) -> None:
        plan, i = self.plan, self.index
        cookie = plan["cookies"][i]
        host, port = plan["targets"][i % len(plan["targets"])]
        # The page's origin is the server it was loaded from (behind a proxy: the one origin).
        headers = {"Origin": f"http://{host}:{port}"}
        if cookie:
            headers["Cookie"] = cookie
        try:
            async with gate:
                conversation_id = plan["conversations"][i]
                if plan.get("create_path"):
                    started = time.monotonic()
                    csrf = cookie.rsplit("csrftoken=", 1)[1].split(";")[0]
                    response = await http.post(
                        f"http://{host}:{port}{plan['create_path']}",
                        headers={**headers, "X-CSRFToken": csrf},
                    )
                    response.raise_for_status()
                    conversation_id = response.json()["id"]
                    self.create_s = time.monotonic() - started
                started = time.monotonic()
                self.socket = await asyncio.wait_for(
                    ws.connect(
                        host,
                        port,
                        plan["path"].format(id=conversation_id),
                        self.on_text,
                        headers=headers,
                    ),
                    60,
                )
                self.accept_s = time.monotonic() - started
                self.state_s = await asyncio.wait_for(self.first_frame, 60) - started
        except Exception as exc:
            self.failure = repr(exc)[:200]
            return
        for _ in range(plan["messages"]):
            reply = Reply(plan["tokens"], self.latencies)
            self.replies.append(reply)
            self.current = reply
            reply.counting = True
            reply.sent_at = time.monotonic()
            self.socket.send_text(json.dumps({"type": "send", "text": "Benchmark: please stream."}))
            try:
                await asyncio.wait_for(reply.done, plan["reply_timeout"])
            except TimeoutError:
                self.failure = "reply timed out"
                return


async def run(plan: dict) -> None:
    import httpx

    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    users = [User(i, plan, latencies) for i in range(len(plan["conversations"]))]
    print(json.dumps({"ready": len(users)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)

    started = time.monotonic()
    gate = asyncio.Semaphore(plan.get("open_concurrency", 100))
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(user.run(http, gate) for user in users))
    elapsed = time.monotonic() - started

    replies = [r for u in users for r in u.replies]
    expected = plan["tokens"] * plan["messages"] * len(users)
    received = sum(len(r.seen) for r in replies)
    ttfts = [r.ttft_over for r in replies if r.ttft_over is not None]
    ended = [u for u in users if not u.failure and all(r.done.done() for r in u.replies)]
    failures = [u.failure for u in users if u.failure]
    result = {
        "connections": len(users),
        "open": sum(u.socket is not None for u in users),
        "connect_failures": sum(u.socket is None for u in users),
        "chats_ok": sum(
            1
            for u in ended
            if len(u.replies) == plan["messages"] and not any(r.error for r in u.replies)
        ),
        "failures": sorted(set(failures))[:5],
        "timed_out": any(f == "reply timed out" for f in failures),
        "elapsed_s": elapsed,
        "sends": len(replies),
        "tokens_expected": expected,
        "tokens_received": received,
        "tokens_lost": expected - received,
        "tokens_duplicated": sum(r.duplicated for r in replies),
        "tokens_out_of_order": sum(r.out_of_order for r in replies),
        "seq_errors": sum(r.seq_errors for r in replies),
        "errors": sorted({r.error for r in replies if r.error})[:5],
        "incomplete": [
            {
                "received": len(r.seen),
                "next_index": r.next_index,
                "end_seq_gap": r.end_seq_gap,
                "deltas": r.deltas,
            }
            for r in replies
            if len(r.seen) != plan["tokens"]
        ][:5],
        "replies_ended": sum(r.done.done() and not r.error for r in replies),
        "frames_per_reply": sum(r.frames for r in replies) / max(1, len(replies)),
        "deltas_per_reply": sum(r.deltas for r in replies) / max(1, len(replies)),
        "latency_ms": summary(latencies),
        "ttft_over_ms": summary(ttfts),
        "accept_ms": summary([u.accept_s for u in users if u.accept_s is not None]),
        "state_ms": summary([u.state_s for u in users if u.state_s is not None]),
        "create_ms": summary([u.create_s for u in users if u.create_s is not None]),
    }
    print(json.dumps(result), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    for user in users:
        if user.socket is not None:
            user.socket.close()
    await asyncio.sleep(0.2)


def main() -> None:
    raise_fd_limit()
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    asyncio.run(run(plan))


if __name__ == "__main__":
    main()
