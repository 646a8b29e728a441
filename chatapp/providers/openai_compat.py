"""OpenAI-compatible chat completions over SSE: Moonshot, resellers and self-hosted servers.

The request is a streaming `POST {base}/chat/completions`; the response is parsed incrementally
from raw bytes. Usage is read wherever real services put it (top level or inside the choice),
reasoning from `reasoning_content` or `reasoning`, and reading goes on after finish_reason until
`[DONE]` or EOF because usage can come last.
"""

import json
import logging
import re
from collections.abc import AsyncIterator

import httpx

from .base import ChatRequest, ProviderClient, ProviderError, StreamItem, Usage
from .sse import SSEParser

log = logging.getLogger(__name__)

# Moonshot pins these for kimi-k2.5 / k2.6 and answers 400 to any other value.
MOONSHOT_FIXED_SAMPLING_MODELS = ("kimi-k2.5", "kimi-k2.6")
RETRY_AFTER_TEXT = re.compile(r"after (\d+(?:\.\d+)?) ?s", re.IGNORECASE)


class OpenAICompatClient(ProviderClient):
    kind = "openai_compat"

    def __init__(self, *, base_url: str, api_key: str, http: httpx.AsyncClient) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.http = http

    def build_body(self, request: ChatRequest) -> dict:
        body: dict = {
            "model": request.model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.max_output_tokens:
            body["max_completion_tokens"] = request.max_output_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.thinking is not None:
            body["chat_template_kwargs"] = {"thinking": request.thinking}
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

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        # Compact, key-order-stable JSON: turn N+1's body starts with turn N's messages byte for
        # byte, which is what the provider's prefix cache matches on.
        body = json.dumps(self.build_body(request), ensure_ascii=False, separators=(",", ":"))
        try:
            async with self.http.stream(
                "POST", self.url, content=body.encode(), headers=self.headers(request)
            ) as response:
                if response.status_code >= 400:
                    raw = await response.aread()
                    raise error_from_response(response.status_code, raw, response.headers)
                parser = SSEParser()
                async for chunk in response.aiter_raw():
                    for data in parser.feed(chunk):
                        if data == "[DONE]":
                            return
                        item = parse_event(data)
                        if item is not None:
                            yield item
                for data in parser.close():
                    if data == "[DONE]":
                        return
                    item = parse_event(data)
                    if item is not None:
                        yield item
        except httpx.ReadTimeout as exc:
            raise ProviderError(
                "The model stopped sending data; the reply was ended.",
                retryable=True,
                code="upstream_stalled",
                detail=repr(exc),
            ) from None
        except httpx.TimeoutException as exc:
            raise ProviderError(
                "Could not reach the model provider in time.",
                retryable=True,
                code="upstream_timeout",
                detail=repr(exc),
            ) from None
        except httpx.TransportError as exc:
            raise ProviderError(
                "The connection to the model provider failed.",
                retryable=True,
                code="upstream_connection",
                detail=repr(exc),
            ) from None


class MoonshotClient(OpenAICompatClient):
    kind = "moonshot"

    def build_body(self, request: ChatRequest) -> dict:
        body = super().build_body(request)
        body.pop("chat_template_kwargs", None)
        if request.thinking is not None:
            body["thinking"] = {"type": "enabled" if request.thinking else "disabled"}
        if request.model.startswith(MOONSHOT_FIXED_SAMPLING_MODELS):
            for key in ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty"):
                body.pop(key, None)
        return body


def parse_usage(raw: dict) -> Usage:
    details = raw.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or raw.get("cached_tokens") or 0
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        cached_tokens=int(cached),
        completion_tokens=int(raw.get("completion_tokens") or 0),
    )


def parse_event(data: str) -> StreamItem | None:
    """One `data:` payload -> a StreamItem, None for events that carry nothing we use."""
    try:
        event = json.loads(data)
    except ValueError:
        log.warning("ignoring a non-JSON SSE event: %.200s", data)
        return None
    if not isinstance(event, dict):
        return None
    if "error" in event:
        # Resellers report failures after a 200 as a data event; it is an error, not text.
        raise error_from_body(event, status=None)
    item = StreamItem()
    usage = event.get("usage")
    choices = event.get("choices") or []
    if choices:
        choice = choices[0]
        delta = choice.get("delta") or choice.get("message") or {}
        content = delta.get("content")
        if isinstance(content, str):
            item.content = content
        # Some servers send both fields with the same text: take one, never both.
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str):
            item.reasoning = reasoning
        if delta.get("tool_calls"):
            item.tool_calls = delta["tool_calls"]
        item.finish_reason = choice.get("finish_reason") or None
        usage = usage or choice.get("usage")
    elif isinstance(event.get("response"), str):
        item.content = event["response"]
    if isinstance(usage, dict):
        item.usage = parse_usage(usage)
    return item


def _error_payload(body: object) -> tuple[str, str, object]:
    """-> (message, type, code) from the usual {"error": {...}} shapes."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return (
                str(error.get("message") or ""),
                str(error.get("type") or ""),
                error.get("code"),
            )
        if isinstance(error, str):
            return error, "", None
    return "", "", None


def error_from_body(
    body: object, *, status: int | None, retry_after: float | None = None
) -> ProviderError:
    message, error_type, code = _error_payload(body)
    if status is None and isinstance(code, int):
        status = code
    text = f"{error_type} {message}".lower()
    detail = json.dumps(body)[:2000] if body is not None else ""
    if retry_after is None:
        match = RETRY_AFTER_TEXT.search(message)
        retry_after = float(match.group(1)) if match else None

    if "quota" in text or "insufficient balance" in text or "recharge" in text or status == 402:
        return ProviderError(
            "The model provider account is out of credit. Ask an administrator to check billing.",
            status=status,
            code="billing",
            detail=detail,
        )
    if status == 401:
        return ProviderError(
            "The provider key is invalid. Ask an administrator to check it.",
            status=status,
            code="auth",
            detail=detail,
        )
    if status == 429:
        return ProviderError(
            "The model provider is busy (rate limit). Please try again shortly.",
            retryable=True,
            retry_after=retry_after,
            status=status,
            code="rate_limited",
            detail=detail,
        )
    if status is not None and status >= 500:
        return ProviderError(
            "The model provider had a server error. Please try again.",
            retryable=True,
            retry_after=retry_after,
            status=status,
            code="upstream_error",
            detail=detail,
        )
    shown = message or "The model provider refused the request."
    return ProviderError(
        f"The model provider refused the request: {shown}",
        status=status,
        code="bad_request",
        detail=detail,
    )


def error_from_response(status: int, raw: bytes, headers: httpx.Headers) -> ProviderError:
    try:
        body: object = json.loads(raw)
    except ValueError:
        body = {"error": {"message": raw.decode("utf-8", "replace")[:500]}}
    retry_after = None
    if headers.get("retry-after"):
        try:
            retry_after = float(headers["retry-after"])
        except ValueError:
            retry_after = None
    return error_from_body(body, status=status, retry_after=retry_after)
