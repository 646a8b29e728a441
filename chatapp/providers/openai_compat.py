"""OpenAI-compatible chat completions over SSE: the shared wire code, and the client for any
OpenAI-compatible server (resellers such as AIsa / OpenRouter, self-hosted vLLM / SGLang).

The request is a streaming `POST {base}/chat/completions`; the response is parsed incrementally
from raw bytes by `StreamParser`, which copes with every format in ../shared/KIMI-PROTOCOL.md:
usage at the top level or inside the choice (last one wins), cached tokens in either spelling or
from the Workers AI trailing native event, reasoning from `reasoning_content` or `reasoning` (never
doubled), OpenRouter `reasoning_details`, the Workers AI `p` padding field, `choices: []` usage
chunks, and errors sent as a data event after a 200. Reading goes on after finish_reason until
`[DONE]` or EOF because usage can come last.

Subclasses (moonshot.py, workers_ai.py) change only the body, the URL and the error mapping.
"""

import base64
import json
import logging
import re
from collections.abc import AsyncIterator

import httpx
import orjson

from . import errors
from .base import ChatRequest, ProviderClient, ProviderError, StreamItem, Usage
from .sse import SSEParser

log = logging.getLogger(__name__)

# Kimi (and Moonshot) accept images only as base64 data URLs in these formats.
ALLOWED_IMAGE = re.compile(r"^data:image/(png|jpeg|webp|gif);base64,", re.IGNORECASE)
# Video (models whose ModelConfig.video is set): Moonshot's chat API takes a `video_url` part
# with a base64 data URL or an uploaded file's `ms://<file-id>`; its vision guide lists mp4,
# mpeg, mov, avi, x-flv, mpg, webm, wmv and 3gpp (../shared/KIMI-PROTOCOL.md §4).
VIDEO_MIME_TYPES = (
    "video/mp4",
    "video/mpeg",
    "video/quicktime",
    "video/x-msvideo",
    "video/x-flv",
    "video/webm",
    "video/x-ms-wmv",
    "video/3gpp",
)
ALLOWED_VIDEO = re.compile(
    r"^(data:(" + "|".join(re.escape(m) for m in VIDEO_MIME_TYPES) + r");base64,|ms://)",
    re.IGNORECASE,
)


def video_part(mime: str, data: bytes) -> dict:
    """The content part that sends a video clip to a model that takes video:
    `{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`."""
    if mime.lower() not in VIDEO_MIME_TYPES:
        raise ValueError(f"not a video type Kimi accepts: {mime}")
    encoded = base64.b64encode(data).decode("ascii")
    return {"type": "video_url", "video_url": {"url": f"data:{mime.lower()};base64,{encoded}"}}


def dumps(body: dict) -> bytes:
    """Compact, key-order-stable JSON: turn N+1's body starts with turn N's messages byte for
    byte, which is what the provider's prefix cache matches on."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def check_images(messages: list[dict]) -> None:
    """Refuse, before any call, an image part that is not a png/jpeg/webp/gif data URL."""
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "video_url":
                url = (part.get("video_url") or {}).get("url", "")
                if not isinstance(url, str) or not ALLOWED_VIDEO.match(url):
                    raise errors.make(
                        errors.UnsupportedImage,
                        status=None,
                        detail="refused video url",
                        message="The model cannot read this video (use MP4, WebM, MOV or MPEG).",
                    )
                continue
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            url = (part.get("image_url") or {}).get("url", "")
            if not isinstance(url, str) or not ALLOWED_IMAGE.match(url):
                shown = url[:40] if isinstance(url, str) else type(url).__name__
                raise errors.make(
                    errors.UnsupportedImage, status=None, detail=f"refused image url {shown!r}"
                )


# ---- parsing --------------------------------------------------------------------------------


def parse_usage(raw: dict) -> tuple[Usage, bool]:
    """-> (usage, whether the body reported cached tokens at all)."""
    details = raw.get("prompt_tokens_details") or {}
    cached = None
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        cached = details["cached_tokens"]
    elif raw.get("cached_tokens") is not None:
        cached = raw["cached_tokens"]
    usage = Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        cached_tokens=int(cached or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
    )
    return usage, cached is not None


class StreamParser:
    """Per-reply parsing state: the usage seen so far (last one wins, except that a usage
    without any cached-token field keeps the cached count an earlier one reported)."""

    __slots__ = ("usage", "_cached_known", "error_mapper")

    def __init__(self, error_mapper=errors.from_openai_body) -> None:
        self.usage: Usage | None = None
        self._cached_known = False
        self.error_mapper = error_mapper

    def _take_usage(self, raw: dict) -> Usage:
        usage, has_cached = parse_usage(raw)
        if has_cached:
            self._cached_known = True
        elif self.usage is not None and self._cached_known:
            usage.cached_tokens = self.usage.cached_tokens
        self.usage = usage
        return usage

    def event(self, data: str) -> StreamItem | None:
        """One `data:` payload -> a StreamItem, None for events that carry nothing we use."""
        try:
            event = orjson.loads(data)  # once per streamed chunk: ~2x the stdlib's speed
        except ValueError:
            log.warning("ignoring a non-JSON SSE event: %.200s", data)
            return None
        if not isinstance(event, dict):
            return None
        if event.get("error") or event.get("success") is False:
            # Resellers report failures after a 200 as a data event: an error, not text.
            raise self.error_mapper(event, status=None)
        item = StreamItem()
        usage = event.get("usage")
        choices = event.get("choices")
        if isinstance(choices, list) and choices:
            choice = choices[0] or {}
            delta = choice.get("delta") or choice.get("message") or {}
            content = delta.get("content")
            if isinstance(content, str):
                item.content = content
            # Workers AI K2.5 sends both fields with the same text: take one, never both.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str):
                item.reasoning = reasoning
            if isinstance(delta.get("reasoning_details"), list):
                item.reasoning_details = delta["reasoning_details"]
            if delta.get("tool_calls"):
                item.tool_calls = delta["tool_calls"]
            item.finish_reason = choice.get("finish_reason") or None
            if isinstance(event.get("model"), str):
                item.model = event["model"]
            if not isinstance(usage, dict):
                usage = choice.get("usage")
        elif isinstance(event.get("response"), str):
            # The Workers AI native format; its trailing event has response "" and the usage
            # with the cached tokens.
            item.content = event["response"]
        elif isinstance(event.get("result"), dict):
            # A v4 envelope around a whole completion (non-stream /ai/run).
            return self.event(json.dumps(event["result"]))
        if isinstance(usage, dict):
            item.usage = self._take_usage(usage)
        return item


def parse_event(data: str) -> StreamItem | None:
    """Stateless convenience for one event (tests and simple callers)."""
    return StreamParser().event(data)


def parse_completion(raw: bytes, error_mapper=errors.from_openai_body) -> StreamItem:
    """A non-stream body (bare or in a v4 envelope; OpenRouter may pad it with whitespace)."""
    item = StreamParser(error_mapper).event(raw.decode("utf-8", "replace").strip())
    if item is None:
        raise errors.make(errors.UpstreamServerError, status=200, detail=raw[:500].decode())
    return item


# ---- the client -----------------------------------------------------------------------------


class OpenAICompatClient(ProviderClient):
    kind = "openai_compat"
    # The field an assistant tool-call turn's reasoning is echoed in. Generic servers differ
    # (vLLM >= 0.11 reads `reasoning`, older vLLM and Avian-style resellers
    # `reasoning_content`), so both carry the same text; OpenRouter also gets its
    # `reasoning_details` back exactly as received.
    reasoning_fields: tuple[str, ...] = ("reasoning_content", "reasoning")
    echo_reasoning_details = True
    max_tokens_field = "max_completion_tokens"
    error_mapper = staticmethod(errors.from_openai_body)

    def __init__(
        self, *, base_url: str, api_key: str, http: httpx.AsyncClient, name: str = ""
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.http = http
        self.name = name or self.kind

    # ---- request -----------------------------------------------------------------------------

    def url(self, request: ChatRequest) -> str:
        return self.base_url + "/chat/completions"

    def wire_messages(self, messages: list[dict], *, echo_all: bool = False) -> list[dict]:
        """Stored history -> this provider's message shapes. Assistant tool-call turns (every
        assistant turn when the family asks for it) carry their reasoning exactly as received
        (even ""), content omitted when empty."""
        out = []
        for message in messages:
            if message.get("role") != "assistant" or "reasoning_content" not in message:
                out.append(message)
                continue
            if not echo_all and not message.get("tool_calls"):
                out.append({k: v for k, v in message.items() if k != "reasoning_content"})
                continue
            entry = {k: v for k, v in message.items() if k not in ("reasoning_content",)}
            details = entry.pop("reasoning_details", None)
            for field in self.reasoning_fields:
                entry[field] = message["reasoning_content"]
            if self.echo_reasoning_details and details:
                entry["reasoning_details"] = details
            if not entry.get("content"):
                entry.pop("content", None)
            out.append(entry)
        return out

    def build_body(self, request: ChatRequest) -> dict:
        body: dict = {
            "model": request.model,
            "messages": self.wire_messages(request.messages, echo_all=request.echo_all_reasoning),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.max_output_tokens:
            body[self.max_tokens_field] = request.max_output_tokens
        if request.temperature is not None and request.sampling_allowed:
            body["temperature"] = request.temperature
        thinking = request.thinking_param
        if thinking is not None:
            # vLLM / SGLang / Workers AI: the Kimi chat template's own kwarg. Families with a
            # thinking switch have no reasoning_effort, so the two never meet.
            body["chat_template_kwargs"] = {"thinking": thinking}
        effort = request.effort_param
        if effort is not None:
            body["reasoning_effort"] = effort  # K3: only a non-default value the family lists
        if request.response_format:
            body["response_format"] = request.response_format
        return body

    def headers(self, request: ChatRequest) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            # Raw bytes are read and split by us; no decompression layer in between.
            "Accept-Encoding": "identity",
            "x-session-affinity": request.affinity_id,
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    # ---- response ----------------------------------------------------------------------------

    def error_from_response(self, status: int, raw: bytes, headers: httpx.Headers) -> ProviderError:
        body = errors.parse_error_body(raw)
        error = self.error_mapper(
            body, status=status, retry_after=errors.retry_after_header(headers.get("retry-after"))
        )
        if isinstance(error, errors.InvalidKey):
            hint = f"…{self.api_key[-4:]}" if len(self.api_key) >= 12 else "(not set)"
            error.staff_message = (
                f"The provider key for {self.name} ({hint}) is invalid: "
                "check it in the admin or the environment."
            )
        return error

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        check_images(request.messages)
        body = dumps(self.build_body(request))
        parser = StreamParser(self.error_mapper)
        try:
            async with self.http.stream(
                "POST", self.url(request), content=body, headers=self.headers(request)
            ) as response:
                if response.status_code >= 400:
                    raw = await response.aread()
                    raise self.error_from_response(response.status_code, raw, response.headers)
                if "json" in response.headers.get("content-type", ""):
                    # A non-stream answer (some servers ignore stream: true, or an envelope).
                    yield parse_completion(await response.aread(), self.error_mapper)
                    return
                sse = SSEParser()
                finished = False  # a finish_reason arrived: usage may still follow, or EOF
                async for chunk in response.aiter_raw():
                    for data in sse.feed(chunk):
                        if data == "[DONE]":
                            return
                        item = parser.event(data)
                        if item is not None:
                            finished = finished or bool(item.finish_reason)
                            yield item
                for data in sse.close():
                    if data == "[DONE]":
                        return
                    item = parser.event(data)
                    if item is not None:
                        finished = finished or bool(item.finish_reason)
                        yield item
                if not finished:
                    # A clean close in the middle of a reply (a proxy timeout, a restarted
                    # server): the text so far is not the whole answer.
                    raise ProviderError(
                        TRUNCATED_MESSAGE,
                        retryable=True,
                        code="upstream_truncated",
                        detail="the stream ended without a finish_reason or [DONE]",
                    )
        except httpx.TransportError as exc:
            message, code = transport_failure(exc)
            raise ProviderError(message, retryable=True, code=code, detail=repr(exc)) from None


TRUNCATED_MESSAGE = (
    "The provider ended the reply before it was finished. The text so far is kept; "
    "press Retry to write it again."
)


def transport_failure(exc: httpx.TransportError) -> tuple[str, str]:
    """(user message, code) for a network failure; every one of them is worth a retry."""
    if isinstance(exc, httpx.ReadTimeout):  # no bytes for UPSTREAM_STALL_TIMEOUT
        return "The model stopped sending data; the reply was ended.", "upstream_stalled"
    if isinstance(exc, httpx.TimeoutException):
        return "Could not reach the model provider in time.", "upstream_timeout"
    return "The connection to the model provider failed.", "upstream_connection"


def merge_reasoning_details(merged: list[dict], deltas: list[dict]) -> None:
    """Fold streamed OpenRouter `reasoning_details` deltas into whole entries (by index and
    type), the shape the provider expects back on a tool-call turn."""
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        key = (delta.get("index", 0), delta.get("type"))
        for entry in merged:
            if (entry.get("index", 0), entry.get("type")) == key:
                break
        else:
            merged.append(dict(delta))
            continue
        for field, value in delta.items():
            if field in ("text", "summary", "data") and isinstance(value, str):
                entry[field] = (entry.get(field) or "") + value
            elif field not in entry or entry[field] is None:
                entry[field] = value
