"""Cloudflare Workers AI: the chat client (REST `/ai/run/{model}` or the OpenAI-compatible
`/ai/v1/chat/completions`) and the async batch client (`queueRequest: true`).

The provider's base URL is `{CLOUDFLARE_API_BASE}/accounts/{CLOUDFLARE_ACCOUNT_ID}/ai`: requests
go to `/run/{model}`; a base URL ending in `/ai/v1` uses the OpenAI-compatible endpoint instead.
Either way the shared StreamParser copes with what both can send (../shared/KIMI-PROTOCOL.md §2):
the `p` padding field, mid-stream cumulative usage, a `choices: []` usage chunk, the trailing
native `{"response": "", "usage": {...}}` event (the only place cached tokens appear), and the v4
envelope `{"result", "success", "errors", "messages"}` for non-stream answers and errors.

Request shape: thinking as `chat_template_kwargs.thinking` (K2.6; K2.5 is aliased to K2.6),
`max_completion_tokens`, sampling only when the user set it, reasoning echoed as `reasoning`.
"""

import asyncio
import json
import logging
from dataclasses import dataclass

import httpx

from . import errors
from .base import ChatRequest, ProviderError, StreamItem
from .openai_compat import OpenAICompatClient, StreamParser, check_images, dumps

log = logging.getLogger(__name__)

BATCH_MAX_BYTES = 10 * 1024 * 1024  # Cloudflare's documented cap for one batch payload


class WorkersAIClient(OpenAICompatClient):
    kind = "workers_ai"
    reasoning_fields = ("reasoning",)  # the field Workers AI (vLLM) reads on input
    echo_reasoning_details = False
    error_mapper = staticmethod(errors.from_workers_ai)

    @property
    def openai_endpoint(self) -> bool:
        return self.base_url.endswith("/v1")

    def url(self, request: ChatRequest) -> str:
        if self.openai_endpoint:
            return self.base_url + "/chat/completions"
        return f"{self.base_url}/run/{request.model}"

    def build_body(self, request: ChatRequest) -> dict:
        body = super().build_body(request)
        if not self.openai_endpoint:
            body.pop("model")  # /ai/run takes the model from the path
        return body


# ---- async batch ----------------------------------------------------------------------------


@dataclass
class BatchResult:
    id: int
    external_reference: str | None
    item: StreamItem | None  # content, reasoning, usage, finish_reason of a success
    error: ProviderError | None


class BatchPending(Exception):
    pass


class WorkersAIBatchClient:
    """Submit many chat requests at once, then poll until Cloudflare has run them all.

    `run()` returns one BatchResult per request, in submission order (Cloudflare may answer out
    of order: results are re-sorted by their `id`), each either an item or a typed error.
    """

    def __init__(self, *, base_url: str, api_key: str, http: httpx.AsyncClient) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.http = http

    def _url(self, model: str) -> str:
        return f"{self.base_url}/run/{model}"

    def _headers(self, affinity_id: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        if affinity_id:
            headers["x-session-affinity"] = affinity_id
        return headers

    async def _post(self, model: str, body: dict, affinity_id: str | None) -> dict:
        payload = dumps(body)
        if len(payload) >= BATCH_MAX_BYTES:
            raise errors.make(errors.RequestTooLarge, status=None, detail=f"{len(payload)} bytes")
        try:
            response = await self.http.post(
                self._url(model),
                params={"queueRequest": "true"},
                content=payload,
                headers=self._headers(affinity_id),
            )
        except httpx.TransportError as exc:
            raise errors.make(errors.UpstreamServerError, status=None, detail=repr(exc)) from None
        body_json = errors.parse_error_body(response.content)
        if response.status_code >= 400 or (
            isinstance(body_json, dict) and body_json.get("success") is False
        ):
            raise errors.from_workers_ai(
                body_json,
                status=response.status_code if response.status_code >= 400 else None,
                retry_after=errors.retry_after_header(response.headers.get("retry-after")),
            )
        if not isinstance(body_json, dict):
            raise errors.make(errors.UpstreamServerError, status=200, detail=str(body_json))
        # The REST API wraps answers in the v4 envelope; the binding's shape is bare.
        if "result" in body_json and ("success" in body_json or "errors" in body_json):
            body_json = body_json["result"] or {}
        return body_json

    async def submit(
        self, *, model: str, requests: list[dict], affinity_id: str | None = None
    ) -> str:
        """-> request_id. Each request is a chat body ({"messages": ...}, optional
        "external_reference")."""
        for request in requests:
            check_images(request.get("messages") or [])
        answer = await self._post(model, {"requests": requests}, affinity_id)
        request_id = answer.get("request_id")
        if not request_id:
            raise errors.make(errors.UpstreamServerError, status=200, detail=json.dumps(answer))
        return str(request_id)

    async def poll(self, *, model: str, request_id: str) -> list[BatchResult]:
        """The results when done; raises BatchPending while queued or running."""
        answer = await self._post(model, {"request_id": request_id}, None)
        if answer.get("status") in ("queued", "running") or "responses" not in answer:
            raise BatchPending(answer.get("status") or "pending")
        results = [self._result(raw) for raw in answer["responses"]]
        return sorted(results, key=lambda r: r.id)

    async def run(
        self,
        *,
        model: str,
        requests: list[dict],
        poll_interval: float = 5.0,
        timeout: float = 900.0,
        affinity_id: str | None = None,
    ) -> list[BatchResult]:
        request_id = await self.submit(model=model, requests=requests, affinity_id=affinity_id)
        async with asyncio.timeout(timeout):
            while True:
                try:
                    return await self.poll(model=model, request_id=request_id)
                except BatchPending:
                    await asyncio.sleep(poll_interval)

    @staticmethod
    def _result(raw: dict) -> BatchResult:
        index = int(raw.get("id", 0))
        reference = raw.get("external_reference")
        if raw.get("success") is False or raw.get("errors") or raw.get("internalCode"):
            found = raw.get("errors") or [
                {"code": raw.get("internalCode"), "message": raw.get("message", "")}
            ]
            status = raw.get("httpCode")
            error = errors.from_workers_ai(
                {"errors": found}, status=status if isinstance(status, int) else None
            )
            return BatchResult(index, reference, None, error)
        result = raw.get("result")
        # Legacy answers nest: {"result": {"result": {"response": ...}}}.
        while isinstance(result, dict) and "result" in result and "choices" not in result:
            result = result["result"]
        item = StreamParser(errors.from_workers_ai).event(json.dumps(result or {}))
        return BatchResult(index, reference, item or StreamItem(), None)
