"""The load generator: C websockets opened as the page opens them, one send on each at once.

`python -m bench.loadgen PLAN.json` (its own process). The plan names the servers, the
conversations, the session cookie and Origin, and the expected token count. Protocol with the
orchestrator over stdin/stdout: after every socket is open it prints `{"ready": ...}` and waits
for a line on stdin; then it sends on every socket in one go, waits (bounded) for every reply's
end and prints the result as one JSON line; it closes the sockets after one more stdin line.

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


async def run(plan: dict) -> None:
    loop = asyncio.get_running_loop()
    tokens = plan["tokens"]
    latencies: list[float] = []
    cookies = plan["cookies"]
    targets = plan["targets"]
    replies: list[Reply] = []
    sockets: list[ws.ClientProtocol | None] = []
    gate = asyncio.Semaphore(plan.get("open_concurrency", 50))
    failures: list[str] = []

    async def open_one(i: int, conversation_id: int) -> None:
        headers = {"Origin": plan["origin"]}
        if cookies[i]:
            headers["Cookie"] = cookies[i]
        host, port = targets[i % len(targets)]
        reply = Reply(tokens, latencies)
        replies.append(reply)
        async with gate:
            try:
                sockets.append(
                    await asyncio.wait_for(
                        ws.connect(
                            host,
                            port,
                            plan["path"].format(id=conversation_id),
                            reply.on_text,
                            headers=headers,
                        ),
                        30,
                    )
                )
            except (OSError, TimeoutError) as exc:
                failures.append(repr(exc))
                sockets.append(None)

    opened_at = time.monotonic()
    async with asyncio.timeout(plan["open_timeout"]):
        await asyncio.gather(*(open_one(i, c) for i, c in enumerate(plan["conversations"])))
    # Let the connect-time state frames arrive before counting.
    await asyncio.sleep(0.5)
    print(
        json.dumps(
            {
                "ready": sum(s is not None for s in sockets),
                "failed": failures[:5],
                "open_s": time.monotonic() - opened_at,
            }
        ),
        flush=True,
    )
    await loop.run_in_executor(None, sys.stdin.readline)

    started = time.monotonic()
    for sock, reply in zip(sockets, replies, strict=True):
        if sock is None:
            continue
        reply.counting = True
        reply.sent_at = time.monotonic()
        sock.send_text(json.dumps({"type": "send", "text": "Benchmark: please stream."}))
    live = [r.done for s, r in zip(sockets, replies, strict=True) if s is not None]
    timed_out = False
    if live:
        _, pending = await asyncio.wait(live, timeout=plan["reply_timeout"])
        timed_out = bool(pending)
    elapsed = time.monotonic() - started

    received = sum(len(r.seen) for r in replies)
    ttfts = [r.ttft_over for r in replies if r.ttft_over is not None]
    result = {
        "connections": len(replies),
        "open": sum(s is not None for s in sockets),
        "connect_failures": len(failures),
        "timed_out": timed_out,
        "elapsed_s": elapsed,
        "tokens_expected": tokens * len(replies),
        "tokens_received": received,
        "tokens_lost": tokens * len(replies) - received,
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
            if len(r.seen) != tokens
        ][:5],
        "replies_ended": sum(r.done.done() and not r.error for r in replies),
        "frames_per_reply": sum(r.frames for r in replies) / max(1, len(replies)),
        "deltas_per_reply": sum(r.deltas for r in replies) / max(1, len(replies)),
        "latency_ms": summary(latencies),
        "ttft_over_ms": summary(ttfts),
    }
    print(json.dumps(result), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    for sock in sockets:
        if sock is not None:
            sock.close()
    await asyncio.sleep(0.2)


def main() -> None:
    raise_fd_limit()
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    asyncio.run(run(plan))


if __name__ == "__main__":
    main()
