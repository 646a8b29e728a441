"""OpenAI-style asynchronous batches (`/v1/files` + `/v1/batches`) on OpenAI-compatible servers.

Used for a batch when staff gave the model batch prices below its live prices (the declaration
that its server offers the Batch API, and that it is cheaper there). The flow, as OpenAI's Batch
API documents it: upload a JSONL file (purpose "batch") of chat-completion requests, each with a
`custom_id`; create the batch; poll it until `completed` (or failed, expired, cancelled); read the
output file's JSONL (and the error file's) back, matched to items by `custom_id`.

Same surface as WorkersAIBatchClient: `submit()` -> a request id, `poll()` -> results or
BatchPending, results as BatchResult (item or typed error) in submission order.
"""

import json

import httpx

from . import errors
from .base import ProviderError, StreamItem
from .openai_compat import StreamParser, check_images, dumps
from .workers_ai import BatchPending, BatchResult

PENDING = ("validating", "in_progress", "finalizing", "queued", "running")
ENDED_BADLY = ("failed", "expired", "cancelled", "cancelling")


class OpenAIBatchClient:
    def __init__(self, *, base_url: str, api_key: str, http: httpx.AsyncClient) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.http = http
        self._order: dict[str, list[str]] = {}

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = await self.http.request(
                method, self.base_url + path, headers=self._headers(), **kwargs
            )
        except httpx.TransportError as exc:
            raise errors.make(errors.UpstreamServerError, status=None, detail=repr(exc)) from None
        if response.status_code >= 400:
            raise errors.from_openai_body(
                errors.parse_error_body(response.content),
                status=response.status_code,
                retry_after=errors.retry_after_header(response.headers.get("retry-after")),
            )
        return response

    async def submit(
        self, *, model: str, requests: list[dict], affinity_id: str | None = None
    ) -> str:
        """-> the batch id. Each request is a chat body with "external_reference" (its item)."""
        lines = []
        for request in requests:
            check_images(request.get("messages") or [])
            body = {k: v for k, v in request.items() if k != "external_reference"}
            body["model"] = model
            lines.append(
                dumps(
                    {
                        "custom_id": str(request["external_reference"]),
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": body,
                    }
                ).decode()
            )
        upload = await self._call(
            "POST",
            "/files",
            data={"purpose": "batch"},
            files={
                "file": ("batch.jsonl", ("\n".join(lines) + "\n").encode(), "application/jsonl")
            },
        )
        file_id = upload.json().get("id")
        created = await self._call(
            "POST",
            "/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        batch_id = created.json().get("id")
        if not file_id or not batch_id:
            raise errors.make(errors.UpstreamServerError, status=200, detail=created.text)
        return str(batch_id)

    async def poll(self, *, model: str, request_id: str) -> list[BatchResult]:
        batch = (await self._call("GET", f"/batches/{request_id}")).json()
        status = batch.get("status")
        if status in PENDING:
            raise BatchPending(status)
        if status in ENDED_BADLY and not batch.get("output_file_id"):
            raise ProviderError(
                "The provider's batch ended without answers. Retry the failed items.",
                retryable=False,
                code=f"batch_{status}",
                detail=json.dumps(batch.get("errors") or {})[:2000],
            )
        results: list[BatchResult] = []
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                content = await self._call("GET", f"/files/{batch[key]}/content")
                for line in content.text.splitlines():
                    if line.strip():
                        results.append(self._result(len(results), json.loads(line)))
        return results

    @staticmethod
    def _result(index: int, raw: dict) -> BatchResult:
        reference = raw.get("custom_id")
        response = raw.get("response") or {}
        code = response.get("status_code") or 0
        if raw.get("error") or code >= 400:
            body = response.get("body") or {"error": raw.get("error") or {}}
            return BatchResult(
                index, reference, None, errors.from_openai_body(body, status=code or None)
            )
        item = StreamParser(errors.from_openai_body).event(json.dumps(response.get("body") or {}))
        return BatchResult(index, reference, item or StreamItem(), None)
