"""Responses in each provider's own wire format, for the real fake upstream (fake_upstream.py).

Written from ../shared/KIMI-PROTOCOL.md with the same quirks as the real services; the captured
OpenRouter / Avian streams in tests/fixtures/ are replayed verbatim (see fixture_stream).
"""

import json
import random
from pathlib import Path

from tests.fake_upstream import FakeResponse, sse

FIXTURES = Path(__file__).parent / "fixtures"
SSE_HEADERS = {"content-type": "text/event-stream"}
JSON_HEADERS = {"content-type": "application/json"}


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


def fixture_stream(name: str, *, seed: int = 7) -> FakeResponse:
    """A captured SSE body replayed verbatim, cut into uneven network chunks."""
    raw = (FIXTURES / name).read_bytes()
    rng = random.Random(seed)
    parts, at = [], 0
    while at < len(raw):
        size = rng.randint(1, 400)
        parts.append(raw[at : at + size])
        at += size
    return FakeResponse(headers=SSE_HEADERS, parts=parts)


def sse_fixture_events(name: str) -> list[dict]:
    """The JSON events of a captured stream (to compute the expected text)."""
    events = []
    for line in fixture_text(name).splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            events.append(json.loads(line[5:]))
    return events


# ---- Moonshot -------------------------------------------------------------------------------


def _moonshot_chunk(delta: dict, *, finish_reason=None, usage=None, model="kimi-k2.6") -> dict:
    choice: dict = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    if usage is not None:
        choice["usage"] = usage  # Moonshot: usage inside the choice, never at the top
    return {
        "id": "chatcmpl-6970b5d02fa474c1767e8767",
        "object": "chat.completion.chunk",
        "created": 1768994256,
        "model": model,
        "choices": [choice],
        "system_fingerprint": "fpv0_10a6da87",
    }


def moonshot_stream(
    tokens: list[str],
    *,
    reasoning: list[str] = (),
    prompt_tokens: int = 3000,
    cached_tokens: int = 2989,
    finish_reason: str = "stop",
    tool_calls: list[dict] | None = None,
    model: str = "kimi-k2.6",
) -> FakeResponse:
    """Role chunk with content "", reasoning_content deltas, the empty reasoning_content at the
    boundary, content deltas, then finish + usage inside the choice with cached tokens in both
    spellings, then [DONE]."""
    parts = [sse(_moonshot_chunk({"role": "assistant", "content": ""}, model=model))]
    parts += [sse(_moonshot_chunk({"reasoning_content": r}, model=model)) for r in reasoning]
    parts.append(sse(_moonshot_chunk({"reasoning_content": ""}, model=model)))
    parts += [sse(_moonshot_chunk({"content": t}, model=model)) for t in tokens]
    if tool_calls:
        parts.append(sse(_moonshot_chunk({"tool_calls": tool_calls}, model=model)))
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(tokens) + len(reasoning),
        "total_tokens": prompt_tokens + len(tokens) + len(reasoning),
        "cached_tokens": cached_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    parts.append(sse(_moonshot_chunk({}, finish_reason=finish_reason, usage=usage, model=model)))
    parts.append(sse("[DONE]"))
    return FakeResponse(headers=SSE_HEADERS, parts=parts)


def moonshot_error(status: int, error_type: str, message: str) -> FakeResponse:
    body = {"error": {"message": message, "type": error_type}}
    # Moonshot sends no Retry-After header, even on 429.
    return FakeResponse(status=status, headers=JSON_HEADERS, parts=[json.dumps(body).encode()])


# ---- Workers AI -----------------------------------------------------------------------------


def _pad(rng: random.Random) -> str:
    return "abcdefghijklmnopqrstuvwxyz0123456789"[: rng.randint(1, 30)]


def workers_ai_run_stream(
    tokens: list[str],
    *,
    reasoning: list[str] = (),
    prompt_tokens: int = 1200,
    cached_tokens: int = 1024,
    finish_reason: str = "stop",
) -> FakeResponse:
    """/ai/run stream: OpenAI chunks with the random `p` padding, `reasoning` and
    `reasoning_content` both carrying the same text (K2.5 via vLLM), `logprobs`/`token_ids`
    nulls, cumulative usage mid-stream without cached tokens, a `choices: []` usage chunk, then
    the native `{"response": "", "usage": {...cached_tokens}}` event and [DONE]."""
    rng = random.Random(3)

    def chunk(delta, finish=None, usage=None):
        body = {
            "id": "chatcmpl-9f1c",
            "object": "chat.completion.chunk",
            "created": 1774000000,
            "model": "@cf/moonshotai/kimi-k2.6",
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish,
                    "token_ids": None,
                }
            ],
            "p": _pad(rng),
        }
        if usage is not None:
            body["usage"] = usage
        return sse(body)

    completion = 0
    parts = [chunk({"role": "assistant", "content": ""})]
    for piece in reasoning:
        completion += 1
        parts.append(chunk({"reasoning": piece, "reasoning_content": piece, "content": None}))
    for index, token in enumerate(tokens):
        completion += 1
        usage = None
        if index == 0:  # cumulative usage mid-stream, no cached tokens in it
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            }
        parts.append(chunk({"content": token}, usage=usage))
    parts.append(chunk({}, finish=finish_reason))
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    parts.append(sse({"id": "chatcmpl-9f1c", "choices": [], "usage": usage, "p": _pad(rng)}))
    native = {**usage, "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    parts.append(sse({"response": "", "usage": native}))
    parts.append(sse("[DONE]"))
    return FakeResponse(headers=SSE_HEADERS, parts=parts)


def workers_ai_envelope_error(status: int, code: int, message: str) -> FakeResponse:
    body = {"result": None, "success": False, "errors": [{"code": code, "message": message}]}
    body["messages"] = []
    return FakeResponse(status=status, headers=JSON_HEADERS, parts=[json.dumps(body).encode()])


def workers_ai_envelope(result: dict, status: int = 200) -> FakeResponse:
    body = {"result": result, "success": True, "errors": [], "messages": []}
    return FakeResponse(status=status, headers=JSON_HEADERS, parts=[json.dumps(body).encode()])


# ---- vLLM / SGLang and resellers --------------------------------------------------------------


def vllm_stream(tokens: list[str], *, reasoning: list[str] = ()) -> FakeResponse:
    """vLLM >= 0.11: reasoning in `reasoning`, usage in a trailing `choices: []` chunk."""

    def chunk(delta, finish=None):
        return sse(
            {
                "id": "chatcmpl-vllm",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "moonshotai/Kimi-K2.6",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"reasoning": r}) for r in reasoning]
    parts += [chunk({"content": t}) for t in tokens]
    parts.append(chunk({}, finish="stop"))
    usage = {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59}
    parts.append(sse({"id": "chatcmpl-vllm", "choices": [], "usage": usage}))
    parts.append(sse("[DONE]"))
    return FakeResponse(headers=SSE_HEADERS, parts=parts)


def openrouter_error_after_200(code: int, message: str) -> FakeResponse:
    """OpenRouter: the stream starts (comment, a first chunk), then the error as a data event."""
    first = {
        "id": "gen-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    }
    error = {"error": {"code": code, "message": message}}
    return FakeResponse(
        headers=SSE_HEADERS,
        parts=[b": OPENROUTER PROCESSING\n\n", sse(first), sse(error), sse("[DONE]")],
    )
