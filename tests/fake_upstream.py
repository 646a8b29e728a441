"""A real local HTTP server that speaks the OpenAI chat-completions SSE format.

It runs on its own event loop in a thread, on an ephemeral port, so it serves the app under test
whatever loop the test uses (and daphne subprocesses too). It records every request (headers and
JSON body). Responses are scripted: queue them with `enqueue`; with none queued it streams a
default reply. A script can stream slowly, answer an HTTP error, stall, or drop the connection.
"""

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Pause:
    seconds: float


class Drop:
    """Abort the connection here (a reset mid-stream)."""


@dataclass
class Gate:
    """Hold the stream here until the test sets the event (at most `timeout` seconds)."""

    event: threading.Event
    timeout: float = 60.0


@dataclass
class FakeResponse:
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "text/event-stream"})
    # bytes are written as they are; Pause waits; Drop aborts the connection.
    parts: list = field(default_factory=list)
    # Seconds before the status line is sent (a server that accepts but does not answer).
    head_delay: float = 0.0


def sse(payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def chunk(
    *,
    content=None,
    reasoning=None,
    finish_reason=None,
    usage=None,
    model="fake-model",
    reasoning_field="reasoning_content",
    usage_in_choice=False,
) -> dict:
    delta: dict = {}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta[reasoning_field] = reasoning
    choice: dict = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    body: dict = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [choice],
    }
    if usage is not None:
        if usage_in_choice:
            choice["usage"] = usage
        else:
            body["usage"] = usage
    return body


def stream_reply(
    tokens: list[str],
    *,
    delay: float = 0.0,
    reasoning: list[str] = (),
    usage: dict | None = None,
    finish_reason: str = "stop",
) -> FakeResponse:
    """A normal streamed reply: role chunk, reasoning, tokens, finish + usage, [DONE]."""
    parts: list = [sse(chunk(content=""))]
    for piece in reasoning:
        if delay:
            parts.append(Pause(delay))
        parts.append(sse(chunk(reasoning=piece)))
    for token in tokens:
        if delay:
            parts.append(Pause(delay))
        parts.append(sse(chunk(content=token)))
    usage = usage or {
        "prompt_tokens": 11,
        "completion_tokens": len(tokens),
        "total_tokens": 11 + len(tokens),
    }
    parts.append(sse(chunk(finish_reason=finish_reason, usage=usage)))
    parts.append(sse("[DONE]"))
    return FakeResponse(parts=parts)


def error_response(
    status: int,
    message: str = "boom",
    error_type: str = "server_error",
    headers: dict | None = None,
) -> FakeResponse:
    body = json.dumps({"error": {"message": message, "type": error_type}}).encode()
    return FakeResponse(
        status=status, headers={"content-type": "application/json", **(headers or {})}, parts=[body]
    )


REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        # (monotonic time, bytes) of every body part written: what the app had been sent by when.
        self.sent: list[tuple[float, bytes]] = []
        self._queue: list[FakeResponse] = []
        # Optional: request -> response (or None for the queue / default), for tests whose
        # requests arrive in no fixed order (batch items answered by several lanes).
        self.responder = None
        self.default_tokens = ["Hello", " from", " the", " fake", " model", "."]
        # `GET .../models` answers this list (OpenAI shape) without touching the queue; None
        # answers 404, as a server without a model list does.
        self.models: list[str] | None = None
        self.models_status = 200
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(5)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    # ---- scripting -----------------------------------------------------------------------------

    def enqueue(self, *responses: FakeResponse) -> None:
        with self._lock:
            self._queue.extend(responses)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.responder = None
            self.requests.clear()
            self.sent.clear()
            self.models = None
            self.models_status = 200

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # ---- server --------------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._started.set()
        self._loop.run_forever()

    def close(self) -> None:
        # Cancel the connections still open (stalls, slow streams) before the loop stops, so
        # no handler is left pending when the loop is closed.
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _shutdown(self) -> None:
        self._server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            if not request_line:
                return
            method, path, _ = request_line.decode().split(" ", 2)
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            with self._lock:
                self.requests.append(RecordedRequest(method, path, headers, body))
                response = None
                if self.responder and not path.endswith("/models"):
                    response = self.responder(self.requests[-1])
                if response is not None:
                    pass
                elif method == "GET" and path.endswith("/models"):
                    response = self._model_list()
                else:
                    response = (
                        self._queue.pop(0) if self._queue else stream_reply(self.default_tokens)
                    )
            await self._respond(writer, response)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    def model_list_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/models")]

    def _model_list(self) -> FakeResponse:
        if self.models is None:
            body = {"error": {"message": "Not found", "type": "resource_not_found_error"}}
            status = 404
        else:
            body = {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1784160000, "owned_by": "moonshot"}
                    for m in self.models
                ],
            }
            status = self.models_status
        return FakeResponse(
            status=status,
            headers={"content-type": "application/json"},
            parts=[json.dumps(body).encode()],
        )

    async def _respond(self, writer: asyncio.StreamWriter, response: FakeResponse) -> None:
        if response.head_delay:
            await asyncio.sleep(response.head_delay)
        head = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}"]
        head += [f"{k}: {v}" for k, v in response.headers.items()]
        # Chunked framing: a dropped connection is then an error to the client, not a clean end.
        head += ["transfer-encoding: chunked", "connection: close", "", ""]
        writer.write("\r\n".join(head).encode())
        await writer.drain()
        for part in response.parts:
            if isinstance(part, Pause):
                await asyncio.sleep(part.seconds)
            elif isinstance(part, Drop):
                writer.transport.abort()
                return
            elif isinstance(part, Gate):
                await asyncio.to_thread(part.event.wait, part.timeout)
            else:
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                self.sent.append((time.monotonic(), part))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
