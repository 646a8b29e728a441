"""Batches end to end: the page's API, a real worker (django_tasks_db's Worker running the job),
the fake upstream over HTTP, the usage records, exports and the live socket."""

import asyncio
import csv
import io
import json
import threading
import time
import zipfile
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from chatapp import tasks
from chatapp.asgi import application
from chatapp.batch_runner import batch_run
from chatapp.models import Batch, BatchItem, ModelConfig, Provider, UsageRecord
from tests.conftest import HOST, ORIGIN, receive_until, session_cookie
from tests.factories import team_create, user_create
from tests.fake_upstream import FakeResponse, error_response, stream_reply
from tests.image_factories import encode, screenshot

pytestmark = pytest.mark.django_db(transaction=True)

FIELDS = [
    {"name": "vendor", "type": "text", "description": "who sold it"},
    {"name": "total", "type": "number", "description": "amount paid"},
    {"name": "date", "type": "date"},
]


def _png(i: int) -> bytes:
    # A different size per image: each item's request carries different image bytes.
    return encode(screenshot(64 + i, 48), "PNG")


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _upload(client: Client, count: int) -> list[int]:
    """One zip holding `count` images, through the Batch page's upload endpoint."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            archive.writestr(f"receipts/r{i:03}.png", _png(i))
        archive.writestr("__MACOSX/._r000.png", b"junk")
    response = client.post(
        "/api/batches/files",
        {"file": io.BytesIO(buffer.getvalue())},
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["errors"] == []
    return [image["id"] for image in body["images"]]


def _model(*, structured: str = "json_schema", limit: int = 0) -> ModelConfig:
    model = ModelConfig.objects.get(model_id="fake-model")
    model.structured_output = structured
    model.price_input = Decimal("1.00")
    model.price_cached_input = Decimal("0.10")
    model.price_output = Decimal("4.00")
    model.save()
    Provider.objects.filter(pk=model.provider_id).update(max_concurrency=limit)
    return ModelConfig.objects.select_related("provider").get(pk=model.pk)


def _json_reply(values: dict, *, prompt=1000, cached=800, completion=30):
    return stream_reply(
        [json.dumps(values)],
        usage={"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached},
    )


def _item_index(request, index_by_image: dict) -> int | None:
    body = request.json
    for message in body.get("messages", []):
        if isinstance(message.get("content"), list):
            for part in message["content"]:
                if part.get("type") == "image_url":
                    return index_by_image.get(part["image_url"]["url"][-200:])
    return None


def _index_by_image(batch: Batch) -> dict:
    from chatapp.attachments import read_image
    from chatapp.images import data_url

    out = {}
    for item in batch.items.select_related("attachment").all():
        part = item.attachment.parts.select_related("image").first()
        out[data_url(read_image(part.image), part.image.mime)[-200:]] = item.position
    return out


def run_worker_until_idle() -> None:
    """django_tasks_db's own Worker (as `manage.py batch_worker` runs it), in batch mode: every
    queued job, then return."""
    worker = tasks.make_worker(worker_id="test-worker", interval=0.05)
    worker.batch = True
    worker.run()


def _create(client: Client, **payload):
    return client.post("/api/batches/", json.dumps(payload), content_type="application/json")


def test_fifty_images_three_fields_complete_with_invalid_and_429(fake_upstream):
    user = user_create()
    client = _client(user)
    model = _model(structured="json_schema")
    ids = _upload(client, 50)
    assert len(ids) == 50
    estimate = client.post(
        "/api/batches/estimate",
        json.dumps(
            {"model": model.pk, "question": "Read the receipt.", "fields": FIELDS, "images": ids}
        ),
        content_type="application/json",
    ).json()
    assert estimate["items"] == 50 and estimate["fits_budget"] and estimate["prompt_tokens"] > 0
    response = _create(
        client, model=model.pk, question="Read the receipt.", fields=FIELDS, images=ids, name="R"
    )
    assert response.status_code == 201, response.content
    batch = Batch.objects.get(pk=response.json()["id"])
    index = _index_by_image(batch)
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def responder(request):
        position = _item_index(request, index)
        if position is None:
            return None
        with lock:
            seen[position] = seen.get(position, 0) + 1
            n = seen[position]
        if position == 7:  # invalid JSON twice
            return stream_reply(["{not json"], usage={"prompt_tokens": 900, "completion_tokens": 5})
        if position == 13 and n == 1:  # a 429, then an answer
            return error_response(429, "slow down", "rate_limit_reached_error")
        vendor = "=HYPERLINK(1)" if position == 5 else f"Shop {position}"
        return _json_reply({"vendor": vendor, "total": position + 0.5, "date": "2026-11-30"})

    fake_upstream.responder = responder
    run_worker_until_idle()

    batch.refresh_from_db()
    assert batch.status == Batch.Status.COMPLETE
    items = {i.position: i for i in batch.items.all()}
    assert items[7].status == BatchItem.Status.INVALID
    assert items[7].answer == "{not json"  # the raw answer is kept
    assert seen[7] == 2  # retried once with the validation error
    retry_body = [r.json for r in fake_upstream.chat_requests() if _item_index(r, index) == 7][-1]
    assert "not valid JSON" in retry_body["messages"][-1]["content"]
    assert items[13].status == BatchItem.Status.DONE and seen[13] == 2  # the 429 was retried
    assert all(items[p].status == BatchItem.Status.DONE for p in items if p != 7)
    assert items[3].values == {"vendor": "Shop 3", "total": 3.5, "date": "2026-11-30"}
    # The structured-output request: json_schema, question first, image last, one affinity id.
    body = fake_upstream.chat_requests()[0].json
    assert body["response_format"]["type"] == "json_schema"
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["vendor", "total", "date"]
    content = body["messages"][0]["content"]
    assert content[0]["type"] == "text" and content[0]["text"].startswith("Read the receipt.")
    assert content[-1]["type"] == "image_url"
    affinity = {r.headers.get("x-session-affinity") for r in fake_upstream.chat_requests()}
    assert affinity == {batch.affinity_id}
    # Exactly one usage record per item, charged as a batch.
    records = UsageRecord.objects.filter(batch=batch)
    assert records.count() == 50
    assert sorted(records.values_list("batch_item__position", flat=True)) == list(range(1, 51))
    # The CSV: 50 rows, the fields as columns.
    csv_response = client.get(f"/batches/{batch.pk}/export.csv")
    rows = list(csv.reader(io.StringIO(csv_response.content.decode())))
    assert rows[0][:6] == ["item", "file", "status", "vendor", "total", "date"]
    assert len(rows) == 51
    assert rows[3][:6] == ["3", "r002.png", "done", "Shop 3", "3.5", "2026-11-30"]
    assert rows[7][2] == "invalid" and rows[7][rows[0].index("raw_answer")] == "{not json"
    assert rows[5][3] == "=HYPERLINK(1)"
    excel = client.get(f"/batches/{batch.pk}/export-excel.csv").content
    assert excel.startswith("\ufeff".encode()) and b"\r\n" in excel
    # Excel-friendly: the same rows and columns, a cell a spreadsheet would run as a formula
    # quoted, numbers left as numbers.
    excel_rows = list(csv.reader(io.StringIO(excel.decode("utf-8-sig"))))
    assert excel_rows[0] == rows[0] and len(excel_rows) == 51
    assert excel_rows[5][3] == "'=HYPERLINK(1)" and excel_rows[3][4] == "3.5"
    jsonl = client.get(f"/batches/{batch.pk}/export.jsonl").content.decode().splitlines()
    assert len(jsonl) == 50 and json.loads(jsonl[2])["values"]["vendor"] == "Shop 3"
    # Progress: cache share and the money it saved (800 of 1,000 prompt tokens per answer).
    state = tasks.batches.batch_state(batch_id=batch.pk)["batch"]["progress"]
    assert 0.7 < state["cache_share"] < 0.9 and Decimal(state["cache_saved_usd"]) > 0
    # The usage page shows the batch as its own line beside chat.
    staff = _client(user_create(is_staff=True, is_superuser=True))
    usage = staff.get("/usage/").content.decode()
    assert f"Batch: R (#{batch.pk})" in usage


def test_json_object_model_gets_the_schema_in_the_prompt(fake_upstream):
    user = user_create()
    client = _client(user)
    model = _model(structured="json_object")
    ids = _upload(client, 2)
    fake_upstream.responder = lambda r: _json_reply({"vendor": "A", "total": "12.00", "date": None})
    response = _create(client, model=model.pk, question="Q?", fields=FIELDS, images=ids)
    run_worker_until_idle()
    batch = Batch.objects.get(pk=response.json()["id"])
    body = fake_upstream.chat_requests()[0].json
    assert body["response_format"] == {"type": "json_object"}
    assert "- total: number" in body["messages"][0]["content"][0]["text"]
    assert [i.values for i in batch.items.all()] == [
        {"vendor": "A", "total": 12.0, "date": None}
    ] * 2


def test_text_answers_and_follow_up_conversation(fake_upstream):
    user = user_create()
    client = _client(user)
    model = _model()
    ids = _upload(client, 3)
    response = _create(client, model=model.pk, question="Describe it.", images=ids)
    run_worker_until_idle()
    batch = Batch.objects.get(pk=response.json()["id"])
    item = batch.items.first()
    assert item.status == "done" and item.answer == "Hello from the fake model."
    assert "response_format" not in fake_upstream.chat_requests()[0].json
    opened = client.post(f"/api/batches/{batch.pk}/items/{item.pk}/open")
    assert opened.status_code == 201
    page = client.get(opened.json()["url"])
    assert page.status_code == 200
    assert "Describe it." in page.content.decode()
    assert "Hello from the fake model." in page.content.decode()


def test_over_budget_is_refused_and_crossing_it_pauses(fake_upstream):
    user = user_create()
    team = team_create(members=[user], monthly_budget_usd=Decimal("0.01"))
    client = _client(user)
    model = _model()
    ids = _upload(client, 30)
    refused = _create(client, model=model.pk, question="Q?", fields=FIELDS, images=ids)
    assert refused.status_code == 400
    assert refused.json()["code"] == "budget_exceeded"
    assert "not started" in refused.json()["message"]
    assert not Batch.objects.exists()
    # Budget enough for the estimate, but each answer costs far more than estimated.
    team.monthly_budget_usd = Decimal("1.00")
    team.save()
    fake_upstream.responder = lambda r: _json_reply(
        {"vendor": "A", "total": 1, "date": None}, prompt=100_000, cached=0, completion=10
    )
    response = _create(client, model=model.pk, question="Q?", fields=FIELDS, images=ids[:20])
    assert response.status_code == 201, response.content
    run_worker_until_idle()
    batch = Batch.objects.get(pk=response.json()["id"])
    assert batch.status == Batch.Status.BUDGET
    done = batch.items.filter(status="done").count()
    assert 0 < done < 20
    assert batch.items.filter(status="pending").count() == 20 - done
    # Resuming while the budget is still used up is refused with a clear message.
    resumed = client.post(f"/api/batches/{batch.pk}/resume")
    assert resumed.status_code == 400 and "budget" in resumed.json()["message"]
    # The page's status line says why it stopped.
    status_text = tasks.batches.batch_state(batch_id=batch.pk)["batch"]["status_text"]
    assert status_text.startswith("Paused: the team's monthly budget is used up")
    # The runner's pause is in the audit log (and the refused resume is not).
    from chatapp.models import AuditEntry

    entries = AuditEntry.objects.filter(object_id=str(batch.pk), object_type="chatapp.batch")
    assert list(entries.order_by("id").values_list("action", "actor_name")) == [
        ("batch.started", user.username),
        ("batch.paused", "batch runner"),
    ]


def test_cancel_retry_and_delete(fake_upstream, settings):
    user = user_create()
    client = _client(user)
    model = _model()
    ids = _upload(client, 4)
    fake_upstream.responder = lambda r: error_response(400, "bad image", "invalid_request_error")
    response = _create(client, model=model.pk, question="Q?", images=ids)
    run_worker_until_idle()
    batch = Batch.objects.get(pk=response.json()["id"])
    assert set(batch.items.values_list("status", flat=True)) == {"failed"}
    fake_upstream.responder = None
    retried = client.post(f"/api/batches/{batch.pk}/retry")
    assert retried.status_code == 200
    run_worker_until_idle()
    assert set(batch.items.values_list("status", flat=True)) == {"done"}
    cancelled = client.post(f"/api/batches/{batch.pk}/cancel")
    assert cancelled.status_code == 400  # already complete
    attachment_ids = list(batch.items.values_list("attachment_id", flat=True))
    assert client.post(f"/api/batches/{batch.pk}/delete").status_code == 200
    from chatapp.models import Attachment, StoredImage

    assert not Attachment.objects.filter(pk__in=attachment_ids).exists()
    assert not StoredImage.objects.exists()  # the images went with the batch
    # The records stay (the spend happened): each item's failed run ($0) and its answer.
    kept = UsageRecord.objects.filter(batch_item__isnull=True, batch_name__gt="")
    assert sorted(kept.values_list("status", flat=True)) == ["done"] * 4 + ["failed"] * 4
    assert all(r.cost_usd == 0 for r in kept.filter(status="failed"))


async def test_socket_streams_progress_and_cancel_stops(fake_upstream):
    user = await database_sync_to_async(user_create)()
    client = await database_sync_to_async(_client)(user)
    model = await database_sync_to_async(_model)(limit=1)
    ids = await database_sync_to_async(_upload)(client, 6)
    fake_upstream.responder = lambda r: stream_reply(["slow"], delay=0.3)
    response = await database_sync_to_async(_create)(
        client, model=model.pk, question="Q?", images=ids
    )
    batch_id = response.json()["id"]
    cookie = await database_sync_to_async(session_cookie)(user)
    ws = WebsocketCommunicator(
        application, f"/ws/batches/{batch_id}/", headers=[HOST, ORIGIN, (b"cookie", cookie)]
    )
    connected, _ = await ws.connect()
    assert connected
    state = await ws.receive_json_from()
    assert state["type"] == "batch.state" and len(state["items"]) == 6
    run = asyncio.create_task(batch_run(batch_id=batch_id))
    done = []
    async with asyncio.timeout(10):
        while len(done) < 2:
            frame = await ws.receive_json_from(timeout=5)
            if frame["type"] == "batch.item" and frame["item"]["status"] == "done":
                done.append(frame["item"]["id"])
    assert frame["batch"]["progress"]["counts"]["done"] == 2
    cancel = await database_sync_to_async(client.post)(f"/api/batches/{batch_id}/cancel")
    assert cancel.status_code == 200
    await asyncio.wait_for(run, 10)
    frames = await receive_until(ws, "batch.status")
    assert frames[-1]["batch"]["status"] == "cancelled"
    statuses = await database_sync_to_async(
        lambda: sorted(BatchItem.objects.filter(batch_id=batch_id).values_list("status", flat=True))
    )()
    assert statuses.count("done") >= 2 and "pending" not in statuses and "running" not in statuses
    await ws.disconnect()


async def test_chat_goes_ahead_of_a_200_item_batch(fake_upstream):
    """Provider limit 2, a 200-item batch running: a chat send is admitted ahead of the queued
    batch items (it waits for one slot to free up, not for the whole line)."""
    from tests.conftest import connect

    user = await database_sync_to_async(user_create)()
    client = await database_sync_to_async(_client)(user)
    model = await database_sync_to_async(_model)(limit=2)

    def upload_many():
        from chatapp.attachments import attachment_create
        from chatapp.images import process_upload

        return [
            attachment_create(
                owner=user,
                conversation=None,
                filename=f"{i}.png",
                processed=process_upload(_png(i % 40)),
            ).pk
            for i in range(200)
        ]

    ids = await database_sync_to_async(upload_many)()
    item_seconds = 0.25

    def responder(request):
        if request.json["messages"][0].get("role") == "user" and isinstance(
            request.json["messages"][0]["content"], list
        ):
            return stream_reply(["item"], delay=item_seconds)
        return stream_reply(["chat", " reply"])

    fake_upstream.responder = responder
    response = await database_sync_to_async(_create)(
        client, model=model.pk, question="Q?", images=ids
    )
    batch_id = response.json()["id"]
    run = asyncio.create_task(batch_run(batch_id=batch_id))
    await asyncio.sleep(1.0)  # the batch holds both slots with a long line behind them
    from tests.factories import conversation_create

    conversation = await database_sync_to_async(conversation_create)(owner=user, model=model)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    started = time.monotonic()
    await ws.send_json_to({"type": "send", "text": "hi"})
    frames = await receive_until(ws, "reply.end", timeout=10)
    waited = time.monotonic() - started
    assert frames[-1]["status"] == "complete"
    # Two slots, items of 0.25 s: the chat waits for one slot to free up (well under a second
    # on a quiet machine); behind the line of ~190 queued items it would wait ~24 s. The bound
    # leaves room for a loaded machine and still tells the two apart.
    assert waited < 8.0, waited
    pending = await database_sync_to_async(
        lambda: BatchItem.objects.filter(batch_id=batch_id, status="pending").count()
    )()
    assert pending > 100  # the batch was still far from done
    await database_sync_to_async(client.post)(f"/api/batches/{batch_id}/cancel")
    await asyncio.wait_for(run, 10)
    await ws.disconnect()


def test_upload_refuses_non_images_in_a_zip(fake_upstream):
    user = user_create()
    client = _client(user)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", _png(1))
        archive.writestr("notes.txt", b"hello")
    body = client.post("/api/batches/files", {"file": io.BytesIO(buffer.getvalue())}).json()
    assert len(body["images"]) == 1
    assert body["errors"][0]["name"] == "notes.txt"


def _envelope(result: dict, status: int = 200):
    from tests.fake_upstream import FakeResponse

    body = json.dumps({"result": result, "success": True, "errors": [], "messages": []})
    return FakeResponse(
        status=status, headers={"content-type": "application/json"}, parts=[body.encode()]
    )


def test_workers_ai_async_batch_queued_running_done_with_one_failure(_upstream_server, settings):
    """Workers AI's queueRequest: submitted once, polled (queued -> running -> done), results
    answered out of order and put back by id, the failed item retryable."""
    from chatapp.model_catalog import catalog_sync, reset_catalog_cache

    fake = _upstream_server
    fake.reset()
    settings.CLOUDFLARE_ACCOUNT_ID = "acct1"
    settings.CLOUDFLARE_API_TOKEN = "cf-token-test"
    settings.CLOUDFLARE_API_BASE = fake.base_url
    settings.BATCH_POLL_INTERVAL = 0.05
    reset_catalog_cache()
    catalog_sync()
    model = ModelConfig.objects.select_related("provider").get(
        provider__kind="workers_ai", model_id="@cf/moonshotai/kimi-k2.6"
    )
    model.price_batch_input, model.price_batch_output = Decimal("0.50"), Decimal("2.00")
    model.staff_overrides = ["price_batch_input", "price_batch_output"]  # kept by the sync
    model.save()
    user = user_create()
    client = _client(user)
    ids = _upload(client, 4)
    polls = []
    submitted = []

    def answer(i: int, reference: str) -> dict:
        return {
            "id": i,
            "success": True,
            "external_reference": reference,
            "result": {
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": json.dumps(
                                {"vendor": f"V{i}", "total": i, "date": "2026-01-0" + str(i + 1)}
                            ),
                        },
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 500,
                    "completion_tokens": 20,
                    "total_tokens": 520,
                    "prompt_tokens_details": {"cached_tokens": 400},
                },
            },
        }

    def responder(request):
        body = request.json
        if "requests" in body:
            assert "queueRequest=true" in request.path
            submitted.append(body["requests"])
            return _envelope({"status": "queued", "request_id": "req-1"})
        polls.append(body["request_id"])
        if len(polls) == 1:
            return _envelope({"status": "queued", "request_id": "req-1"})
        if len(polls) == 2:
            return _envelope({"status": "running", "request_id": "req-1"})
        references = [r["external_reference"] for r in submitted[0]]
        failed = {
            "id": 2,
            "success": False,
            "external_reference": references[2],
            "errors": [{"code": 3040, "message": "Capacity temporarily exceeded"}],
        }
        # Out of order: Cloudflare does not promise the submission order.
        return _envelope(
            {
                "status": "done",
                "request_id": "req-1",
                "responses": [
                    answer(3, references[3]),
                    failed,
                    answer(0, references[0]),
                    answer(1, references[1]),
                ],
            }
        )

    fake.responder = responder
    response = _create(client, model=model.pk, question="Read it.", fields=FIELDS, images=ids)
    assert response.status_code == 201, response.content
    batch = Batch.objects.get(pk=response.json()["id"])
    assert batch.mode == "workers_ai"
    run_worker_until_idle()
    assert len(submitted) == 1 and len(submitted[0]) == 4
    assert submitted[0][0]["response_format"]["type"] == "json_schema"
    assert polls == ["req-1"] * 3
    items = list(batch.items.order_by("position"))
    assert [i.status for i in items] == ["done", "done", "failed", "done"]
    assert [i.values["vendor"] if i.values else None for i in items] == ["V0", "V1", None, "V3"]
    # The failure in the app's own words, never the provider's text verbatim.
    assert items[2].error and "Capacity temporarily exceeded" not in items[2].error
    assert items[0].cost_usd == Decimal("0.000290")  # 500 x $0.50 + 20 x $2.00, per million
    # The failed item is retryable: it runs again and only it is submitted.
    fake.responder = lambda r: (
        _envelope({"status": "queued", "request_id": "req-2"})
        if "requests" in r.json
        else _envelope({"status": "done", "responses": [answer(0, r.json.get("request_id"))]})
    )
    assert client.post(f"/api/batches/{batch.pk}/retry").status_code == 200
    run_worker_until_idle()
    items = list(batch.items.order_by("position"))
    assert [i.status for i in items] == ["done"] * 4
    # One record per item run: the failure's (nothing spent) and then its answer.
    records = UsageRecord.objects.filter(batch=batch)
    assert sorted(records.values_list("status", flat=True)) == ["done"] * 4 + ["failed"]
    assert records.get(status="failed").cost_usd == 0


def test_openai_batches_api_where_it_is_cheaper(fake_upstream, settings):
    """An OpenAI-compatible model with batch prices below its live ones goes through
    /v1/files + /v1/batches: one JSONL upload, polls until completed, answers by custom_id."""
    from tests.fake_upstream import FakeResponse

    settings.BATCH_POLL_INTERVAL = 0.05
    user = user_create()
    client = _client(user)
    model = _model()
    model.price_batch_input, model.price_batch_output = Decimal("0.50"), Decimal("2.00")
    model.staff_overrides = ["price_batch_input", "price_batch_output"]
    model.save()
    ids = _upload(client, 3)
    uploaded: list[list[dict]] = []
    polls = []

    def json_response(payload: dict, status: int = 200):
        return FakeResponse(
            status=status,
            headers={"content-type": "application/json"},
            parts=[json.dumps(payload).encode()],
        )

    def responder(request):
        path = request.path.split("?")[0]
        if path.endswith("/files") and request.method == "POST":
            text = request.body.decode("utf-8", "replace")
            lines = [
                json.loads(line) for line in text.splitlines() if line.startswith('{"custom_id"')
            ]
            uploaded.append(lines)
            return json_response({"id": "file-in", "object": "file", "purpose": "batch"})
        if path.endswith("/batches") and request.method == "POST":
            assert request.json["input_file_id"] == "file-in"
            assert request.json["endpoint"] == "/v1/chat/completions"
            return json_response({"id": "batch_1", "status": "validating"})
        if path.endswith("/batches/batch_1"):
            polls.append(1)
            if len(polls) < 3:
                return json_response({"id": "batch_1", "status": "in_progress"})
            return json_response(
                {
                    "id": "batch_1",
                    "status": "completed",
                    "output_file_id": "file-out",
                    "error_file_id": "file-err",
                }
            )
        if path.endswith("/files/file-out/content"):
            lines = []
            for line in reversed(uploaded[0][:2]):  # out of order
                lines.append(
                    json.dumps(
                        {
                            "custom_id": line["custom_id"],
                            "response": {
                                "status_code": 200,
                                "body": {
                                    "choices": [
                                        {
                                            "index": 0,
                                            "finish_reason": "stop",
                                            "message": {
                                                "role": "assistant",
                                                "content": f"item {line['custom_id']}",
                                            },
                                        }
                                    ],
                                    "usage": {"prompt_tokens": 1000, "completion_tokens": 10},
                                },
                            },
                        }
                    )
                )
            return FakeResponse(
                headers={"content-type": "application/jsonl"}, parts=["\n".join(lines).encode()]
            )
        if path.endswith("/files/file-err/content"):
            line = uploaded[0][2]
            return FakeResponse(
                headers={"content-type": "application/jsonl"},
                parts=[
                    json.dumps(
                        {
                            "custom_id": line["custom_id"],
                            "response": {
                                "status_code": 500,
                                "body": {"error": {"message": "internal", "type": "server_error"}},
                            },
                        }
                    ).encode()
                ],
            )
        return None

    fake_upstream.responder = responder
    # The estimate is at the batch prices (half the live ones here), and says which API.
    payload = {"model": model.pk, "question": "Describe.", "images": ids}
    guess = client.post(
        "/api/batches/estimate", json.dumps(payload), content_type="application/json"
    ).json()
    assert guess["mode"] == "openai_batch"
    at_batch_prices = (
        Decimal(guess["prompt_tokens"]) * Decimal("0.50")
        + Decimal(guess["completion_tokens"]) * Decimal("2.00")
    ) / Decimal(1_000_000)
    assert Decimal(guess["cost_usd"]) == at_batch_prices.quantize(Decimal("0.000001")) > 0
    response = _create(client, model=model.pk, question="Describe.", images=ids)
    batch = Batch.objects.get(pk=response.json()["id"])
    assert batch.mode == "openai_batch"
    run_worker_until_idle()
    assert len(uploaded) == 1 and len(uploaded[0]) == 3
    assert uploaded[0][0]["body"]["model"] == "fake-model"
    assert uploaded[0][0]["url"] == "/v1/chat/completions"
    assert not fake_upstream.chat_requests()  # nothing went through the live API
    items = list(batch.items.order_by("position"))
    assert [i.status for i in items] == ["done", "done", "failed"]
    assert items[0].answer == f"item {items[0].pk}" and items[1].answer == f"item {items[1].pk}"
    assert items[0].cost_usd == Decimal("0.000520")  # batch prices: 1000 x 0.50 + 10 x 2.00


def test_pdfs_become_one_item_per_page_and_bad_ones_are_reported(fake_upstream, settings):
    """A dropped PDF is expanded to one image per page (the workbench's renderer); in a zip, an
    encrypted and a broken PDF are reported by name while everything else is kept."""
    from PIL import Image

    from chatapp.attachments import read_image
    from tests.media_factories import PAGE_COLOURS, coloured_pdf, minimal_pdf

    user = user_create()
    client = _client(user)
    model = _model()
    direct = client.post(
        "/api/batches/files", {"file": SimpleUploadedFile("report.pdf", coloured_pdf(3))}
    )
    assert direct.status_code == 201, direct.content
    pages = direct.json()["images"]
    assert [p["name"] for p in pages] == [f"page {n} of report.pdf" for n in (1, 2, 3)]
    assert direct.json()["errors"] == []
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("scans/a.png", _png(1))
        archive.writestr("scans/locked.pdf", minimal_pdf(2, encrypt=True))
        archive.writestr("scans/broken.pdf", coloured_pdf(2)[:600])
        archive.writestr("scans/two.pdf", coloured_pdf(2))
    mixed = client.post("/api/batches/files", {"file": io.BytesIO(buffer.getvalue())}).json()
    assert [i["name"] for i in mixed["images"]] == [
        "a.png",
        "page 1 of two.pdf",
        "page 2 of two.pdf",
    ]
    problems = {e["name"]: e["message"] for e in mixed["errors"]}
    assert "locked.pdf is encrypted" in problems["locked.pdf"]
    assert "broken.pdf could not be read as a PDF" in problems["broken.pdf"]
    # A PDF over the page cap is refused before any page is rendered; nothing stored.
    settings.PDF_MAX_PAGES = 4
    long_pdf = client.post(
        "/api/batches/files", {"file": SimpleUploadedFile("long.pdf", minimal_pdf(9))}
    ).json()
    assert (
        long_pdf["images"] == []
        and "has 9 pages; the limit is 4" in long_pdf["errors"][0]["message"]
    )
    # More pages than a batch takes: the first ones are kept, the rest named as left out.
    settings.BATCH_MAX_ITEMS = 2
    capped = client.post(
        "/api/batches/files", {"file": SimpleUploadedFile("three.pdf", coloured_pdf(3))}
    ).json()
    assert [i["name"] for i in capped["images"]] == ["page 1 of three.pdf", "page 2 of three.pdf"]
    assert "Pages 3–3 of three.pdf left out" in capped["errors"][0]["message"]
    settings.BATCH_MAX_ITEMS = 500
    # A page that cannot be rendered is reported by page; the upload still answers.
    settings.PDF_MAX_PAGE_PIXELS = 1000
    huge = client.post(
        "/api/batches/files", {"file": SimpleUploadedFile("huge.pdf", coloured_pdf(2))}
    ).json()
    assert huge["images"] == []
    assert [e["name"] for e in huge["errors"]] == ["page 1 of huge.pdf", "page 2 of huge.pdf"]
    assert "too large to render" in huge["errors"][0]["message"]

    ids = [p["id"] for p in pages] + [i["id"] for i in mixed["images"]]
    response = _create(client, model=model.pk, question="What colour?", images=ids)
    assert response.status_code == 201, response.content
    run_worker_until_idle()
    batch = Batch.objects.get(pk=response.json()["id"])
    items = list(batch.items.order_by("position").select_related("attachment"))
    assert [i.filename for i in items] == [
        "page 1 of report.pdf",
        "page 2 of report.pdf",
        "page 3 of report.pdf",
        "a.png",
        "page 1 of two.pdf",
        "page 2 of two.pdf",
    ]
    assert {i.status for i in items} == {"done"}
    assert len(fake_upstream.chat_requests()) == 6
    # Each page item carries that page's own rendering (page N is PAGE_COLOURS[N-1]).
    for item, colour in zip(items[:3], PAGE_COLOURS, strict=False):
        part = item.attachment.parts.select_related("image").first()
        image = Image.open(io.BytesIO(read_image(part.image))).convert("RGB")
        pixel = image.getpixel((image.width // 2, image.height // 2))
        assert all(abs(a - b) < 40 for a, b in zip(pixel, colour, strict=True)), pixel


def _workers_ai_model(fake, settings) -> ModelConfig:
    from chatapp.model_catalog import catalog_sync, reset_catalog_cache

    fake.reset()
    settings.CLOUDFLARE_ACCOUNT_ID = "acct1"
    settings.CLOUDFLARE_API_TOKEN = "cf-token-test"
    settings.CLOUDFLARE_API_BASE = fake.base_url
    settings.BATCH_POLL_INTERVAL = 0.05
    reset_catalog_cache()
    catalog_sync()
    return ModelConfig.objects.select_related("provider").get(
        provider__kind="workers_ai", model_id="@cf/moonshotai/kimi-k2.6"
    )


def _answers_for_schema_retry(batch: Batch):
    """-> answer(item_id, round): the first item right away, the second right on its retry,
    the third wrong twice."""
    first, second, third = batch.items.order_by("position").values_list("pk", flat=True)

    def answer(item_id: int, round_: int) -> str:
        if item_id == first or (item_id == second and round_ == 2):
            return json.dumps({"vendor": f"V{item_id}", "total": 2, "date": "2026-01-02"})
        return "{nope" if round_ == 1 else "still not json"

    return answer


def _assert_schema_retry(batch: Batch, rounds: list[list[dict]]) -> None:
    """Round 1 has every item; round 2 only the two wrong ones, each with its own first answer
    and the validation error; the third is kept invalid with its raw (second) answer."""
    items = list(batch.items.order_by("position"))
    assert len(rounds) == 2 and len(rounds[0]) == 3 and len(rounds[1]) == 2
    for body in rounds[1]:
        assert body["messages"][-2] == {"role": "assistant", "content": "{nope"}
        assert "not valid JSON" in body["messages"][-1]["content"]
        assert body["messages"][0]["content"][-1]["type"] == "image_url"
    assert [i.status for i in items] == ["done", "done", "invalid"]
    assert items[1].values["vendor"] == f"V{items[1].pk}" and items[1].attempts == 2
    assert items[2].answer == "still not json" and items[2].attempts == 2
    assert "not valid JSON" in items[2].error
    # Both rounds are paid for: each wrong item's usage is its two answers'.
    assert items[1].prompt_tokens == 2 * items[0].prompt_tokens > 0
    records = UsageRecord.objects.filter(batch=batch).order_by("batch_item__position")
    assert [r.prompt_tokens for r in records] == [i.prompt_tokens for i in items]


def test_workers_ai_async_schema_failures_are_asked_once_more(_upstream_server, settings):
    """queueRequest path: answers that fail the schema go back through the async API once with
    the validation error, then stay invalid with the raw answer kept."""
    fake = _upstream_server
    model = _workers_ai_model(fake, settings)
    user = user_create()
    client = _client(user)
    ids = _upload(client, 3)
    response = _create(client, model=model.pk, question="Read it.", fields=FIELDS, images=ids)
    batch = Batch.objects.get(pk=response.json()["id"])
    assert batch.mode == "workers_ai"
    answer = _answers_for_schema_retry(batch)
    rounds: list[list[dict]] = []

    def result(i: int, reference: str, round_: int) -> dict:
        content = answer(int(reference), round_)
        message = {"role": "assistant", "content": content}
        return {
            "id": i,
            "success": True,
            "external_reference": reference,
            "result": {
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 500, "completion_tokens": 20, "total_tokens": 520},
            },
        }

    def responder(request):
        body = request.json
        if "requests" in body:
            rounds.append(body["requests"])
            return _envelope({"status": "queued", "request_id": f"req-{len(rounds)}"})
        round_ = int(body["request_id"].split("-")[1])
        references = [r["external_reference"] for r in rounds[round_ - 1]]
        responses = [result(i, ref, round_) for i, ref in enumerate(references)]
        return _envelope({"status": "done", "responses": responses[::-1]})

    fake.responder = responder
    run_worker_until_idle()
    batch.refresh_from_db()
    assert batch.status == Batch.Status.COMPLETE
    _assert_schema_retry(batch, rounds)


def test_openai_batches_schema_failures_are_asked_once_more(fake_upstream, settings):
    """/v1/batches path: the same schema retry, as a second batch of just the wrong items."""
    from tests.fake_upstream import FakeResponse

    settings.BATCH_POLL_INTERVAL = 0.05
    user = user_create()
    client = _client(user)
    model = _model()
    model.price_batch_input, model.price_batch_output = Decimal("0.50"), Decimal("2.00")
    model.staff_overrides = ["price_batch_input", "price_batch_output"]
    model.save()
    ids = _upload(client, 3)
    response = _create(client, model=model.pk, question="Read it.", fields=FIELDS, images=ids)
    batch = Batch.objects.get(pk=response.json()["id"])
    assert batch.mode == "openai_batch"
    answer = _answers_for_schema_retry(batch)
    rounds: list[list[dict]] = []

    def json_response(payload: dict):
        return FakeResponse(
            headers={"content-type": "application/json"}, parts=[json.dumps(payload).encode()]
        )

    def responder(request):
        path = request.path.split("?")[0]
        if path.endswith("/files") and request.method == "POST":
            text = request.body.decode("utf-8", "replace")
            lines = [json.loads(x) for x in text.splitlines() if x.startswith('{"custom_id"')]
            rounds.append(lines)
            return json_response({"id": f"file-{len(rounds)}", "purpose": "batch"})
        if path.endswith("/batches") and request.method == "POST":
            return json_response({"id": request.json["input_file_id"].replace("file", "batch")})
        if "/batches/batch-" in path:
            number = path.rsplit("-", 1)[1]
            return json_response({"status": "completed", "output_file_id": f"out-{number}"})
        if "/files/out-" in path:
            round_ = int(path.split("/files/out-")[1].split("/")[0])
            lines = []
            for line in rounds[round_ - 1]:
                content = answer(int(line["custom_id"]), round_)
                body = {
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": content},
                        }
                    ],
                    "usage": {"prompt_tokens": 1000, "completion_tokens": 10},
                }
                lines.append(
                    json.dumps(
                        {
                            "custom_id": line["custom_id"],
                            "response": {"status_code": 200, "body": body},
                        }
                    )
                )
            return FakeResponse(
                headers={"content-type": "application/jsonl"}, parts=["\n".join(lines).encode()]
            )
        return None

    fake_upstream.responder = responder
    run_worker_until_idle()
    batch.refresh_from_db()
    assert batch.status == Batch.Status.COMPLETE
    assert not fake_upstream.chat_requests()
    _assert_schema_retry(batch, [[line["body"] for line in r] for r in rounds])
    # Priced at the batch prices, both answers of a retried item.
    item = batch.items.get(position=2)
    assert item.cost_usd == Decimal("0.001040")  # 2 x (1000 x 0.50 + 10 x 2.00) per million


def test_batch_runs_are_audited(fake_upstream):
    """Started, paused, resumed, cancelled, retried, exported, deleted: one audit entry each,
    written with the change (a refused action writes none)."""
    from chatapp.models import AuditEntry

    user = user_create()
    client = _client(user)
    model = _model()
    ids = _upload(client, 3)
    batch_id = _create(client, model=model.pk, question="Q?", images=ids).json()["id"]

    def actions():
        return list(
            AuditEntry.objects.filter(object_type="chatapp.batch", object_id=str(batch_id))
            .order_by("id")
            .values_list("action", flat=True)
        )

    assert actions() == ["batch.started"]
    started = AuditEntry.objects.get(action="batch.started")
    assert started.actor == user and started.address == "127.0.0.1"
    assert started.changes["items"] == 3
    assert client.post(f"/api/batches/{batch_id}/pause").status_code == 200
    assert client.post(f"/api/batches/{batch_id}/resume").status_code == 200
    assert AuditEntry.objects.get(action="batch.resumed").changes["status"] == [
        "paused",
        "queued",
    ]
    fake_upstream.responder = lambda r: error_response(400, "bad image", "invalid_request_error")
    run_worker_until_idle()
    fake_upstream.responder = None
    assert client.post(f"/api/batches/{batch_id}/retry").status_code == 200
    run_worker_until_idle()
    assert client.post(f"/api/batches/{batch_id}/cancel").status_code == 400  # complete
    assert client.get(f"/batches/{batch_id}/export.csv").status_code == 200
    assert client.get(f"/batches/{batch_id}/export.jsonl").status_code == 200
    assert actions() == [
        "batch.started",
        "batch.paused",
        "batch.resumed",
        "batch.retried",
        "batch.exported",
        "batch.exported",
    ]
    assert [e.changes["format"] for e in AuditEntry.objects.filter(action="batch.exported")] == [
        "jsonl",
        "csv",
    ]  # newest first
    assert client.post(f"/api/batches/{batch_id}/delete").status_code == 200
    assert actions()[-1] == "batch.deleted"
    other = _create(client, model=model.pk, question="Q2?", images=_upload(client, 2)).json()
    assert client.post(f"/api/batches/{other['id']}/cancel").status_code == 200
    cancelled = AuditEntry.objects.get(action="batch.cancelled")
    assert cancelled.object_id == str(other["id"]) and cancelled.changes["status"] == [
        "queued",
        "cancelled",
    ]


def test_team_admin_sees_a_batchs_spend_never_its_contents(fake_upstream):
    """Charged to the team it ran under: the team admin's page counts its cost in the member's
    spend, while the batch, its items, exports and images stay its owner's."""
    member, admin = user_create(), user_create()
    team_create(members=[member], admins=[admin])
    client = _client(member)
    model = _model()
    ids = _upload(client, 3)
    fake_upstream.responder = lambda r: _json_reply(
        {"vendor": "Secret Vendor", "total": 1, "date": None}, prompt=10_000, cached=0
    )
    response = _create(
        client, model=model.pk, question="Private receipts question", fields=FIELDS, images=ids
    )
    run_worker_until_idle()
    batch = Batch.objects.get(pk=response.json()["id"])
    assert batch.status == Batch.Status.COMPLETE and batch.team is not None
    cost = sum(i.cost_usd for i in batch.items.all())
    assert cost > 0
    assert UsageRecord.objects.filter(batch=batch, team=batch.team).count() == 3
    admin_client = _client(admin)
    team_page = admin_client.get("/team/").content.decode()
    assert f"${cost:.4f}" in team_page  # the member's row: this batch's spend
    assert "Private receipts question" not in team_page and "Secret Vendor" not in team_page
    item = batch.items.first()
    for url in (
        f"/batches/{batch.pk}/",
        f"/batches/{batch.pk}/export.csv",
        f"/attachments/{item.attachment_id}/thumbnail/",
    ):
        assert admin_client.get(url).status_code == 404, url
    assert admin_client.post(f"/api/batches/{batch.pk}/items/{item.pk}/open").status_code == 404


def test_workers_ai_payloads_are_split_under_the_size_cap(_upstream_server, settings, monkeypatch):
    """Items go to Workers AI in payloads under its per-batch cap: with a cap smaller than two
    items, every item is its own submission, each polled by its own request id."""
    from chatapp import batch_runner

    fake = _upstream_server
    model = _workers_ai_model(fake, settings)
    monkeypatch.setattr(batch_runner, "BATCH_MAX_BYTES", 1)
    client = _client(user_create())
    ids = _upload(client, 3)
    submitted: list[list[dict]] = []

    def responder(request):
        body = request.json
        if "requests" in body:
            submitted.append(body["requests"])
            return _envelope({"status": "queued", "request_id": f"req-{len(submitted)}"})
        number = int(body["request_id"].split("-")[1])
        (sent,) = submitted[number - 1]
        message = {"role": "assistant", "content": f"answer {sent['external_reference']}"}
        return _envelope(
            {
                "status": "done",
                "responses": [
                    {
                        "id": 0,
                        "success": True,
                        "external_reference": sent["external_reference"],
                        "result": {"choices": [{"index": 0, "message": message}]},
                    }
                ],
            }
        )

    fake.responder = responder
    batch_id = _create(client, model=model.pk, question="Q?", images=ids).json()["id"]
    run_worker_until_idle()
    assert [len(s) for s in submitted] == [1, 1, 1]
    items = list(BatchItem.objects.filter(batch_id=batch_id).order_by("position"))
    assert [i.answer for i in items] == [f"answer {i.pk}" for i in items]
    assert {i.request_id for i in items} == {"req-1", "req-2", "req-3"}


START_SETUP = """
from chatapp import tasks
from chatapp.attachments import attachment_create
from chatapp.images import process_upload
from chatapp.models import ModelConfig
from django.contrib.auth import get_user_model
from tests.test_batches import _png

user = get_user_model().objects.create_user(username="asker", password="pw-12345678")
ids = [
    attachment_create(
        owner=user, conversation=None, filename=f"{i}.png", processed=process_upload(_png(i))
    ).pk
    for i in range(6)
]
model = ModelConfig.objects.get(model_id="fake-model")
tasks.batch_start(user=user, model=model, question="Q?", fields_raw=[], attachment_ids=ids)
"""


def test_manage_py_start_runs_a_batch_worker_inside_the_server(fake_upstream, tmp_path):
    """The README's first command: `manage.py start` serves with one batch worker inside, so a
    queued batch runs with no other process (started by the server's first request). Killed
    mid-batch and started again, the server finishes it: every item answered exactly once."""
    import os
    import signal
    import socket
    import sqlite3
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "SQLITE_PATH", "BATCH_WORKER")
    }
    env.update(
        DATA_DIR=str(tmp_path / "data"),
        STATIC_ROOT=str(tmp_path / "static"),
        OPENAI_COMPAT_BASE_URL=fake_upstream.base_url,
        OPENAI_COMPAT_API_KEY="test-key",
        OPENAI_COMPAT_MODELS="fake-model",
        DJANGO_SUPERUSER_PASSWORD="admin-pw-12345678",
        BATCH_CONCURRENCY="2",
        BATCH_LEASE_SECONDS="2",
        PYTHONUNBUFFERED="1",
    )
    database = tmp_path / "data" / "db.sqlite3"

    def query(sql: str) -> list:
        with sqlite3.connect(database, timeout=30) as db:
            return db.execute(sql).fetchall()

    subprocess.run(
        [sys.executable, "manage.py", "start", "--no-serve"], cwd=root, env=env, check=True
    )
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", START_SETUP], cwd=root, env=env, check=True
    )
    assert query("SELECT status FROM chatapp_batch") == [("queued",)]  # no server yet
    fake_upstream.responder = lambda r: stream_reply(["answer"], delay=0.6)
    deadline = time.monotonic() + 240

    def serve(log_name: str):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log = tmp_path / log_name
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [sys.executable, "manage.py", "start", "--port", str(port)],
                cwd=root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        while True:  # its first request starts the worker
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
                return server, log
            except OSError:
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                assert server.poll() is None, log.read_text(errors="replace")
                time.sleep(0.5)

    def wait(condition, log) -> None:
        while not condition():
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.3)

    done = "SELECT count(*) FROM chatapp_batchitem WHERE status = 'done'"
    server, log = serve("first.log")
    try:
        wait(lambda: query(done)[0][0] >= 2, log)
        server.send_signal(signal.SIGKILL)  # mid-batch: items in flight
        server.wait(30)
        assert query(done)[0][0] < 3 * 2
    finally:
        if server.poll() is None:
            server.kill()
    server, log = serve("second.log")
    try:
        wait(lambda: query("SELECT status FROM chatapp_batch") == [("complete",)], log)
    finally:
        server.terminate()
        server.wait(30)
    items = query("SELECT id, status FROM chatapp_batchitem")
    assert len(items) == 6 and {status for _, status in items} == {"done"}
    records = query("SELECT batch_item_id FROM chatapp_usagerecord")
    assert sorted(r for (r,) in records) == sorted(pk for pk, _ in items)  # once each


def test_a_runner_taking_over_async_items_knows_which_answers_are_second(
    _upstream_server, settings
):
    """A worker died with two items at Workers AI: one in its first round, one already asked
    again after failing the schema. The runner that takes over polls their request ids (sends
    nothing again): the first-round item that fails the schema gets its one retry; the
    second-round item's answer is final, its two answers' usage added up."""
    import datetime

    from asgiref.sync import async_to_sync
    from django.utils import timezone

    fake = _upstream_server
    model = _workers_ai_model(fake, settings)
    user = user_create()
    client = _client(user)
    ids = _upload(client, 2)
    batch_id = _create(client, model=model.pk, question="Q?", fields=FIELDS, images=ids).json()[
        "id"
    ]
    first_round, second_round = BatchItem.objects.filter(batch_id=batch_id).order_by("position")
    past = timezone.now() - datetime.timedelta(minutes=5)
    Batch.objects.filter(pk=batch_id).update(status="running", lease_expires_at=past)
    BatchItem.objects.filter(pk=first_round.pk).update(
        status="submitted", claim="dead:1", request_id="req-a", lease_expires_at=past
    )
    BatchItem.objects.filter(pk=second_round.pk).update(
        status="submitted",
        claim="dead:1",
        request_id="req-b",
        lease_expires_at=past,
        answer="{nope",
        error="The answer is not valid JSON.",
        prompt_tokens=500,
        completion_tokens=20,
    )
    good = json.dumps({"vendor": "V", "total": 1, "date": None})
    submitted = []

    def done(item_id: int, content: str) -> FakeResponse:
        message = {"role": "assistant", "content": content}
        usage = {"prompt_tokens": 500, "completion_tokens": 20, "total_tokens": 520}
        return _envelope(
            {
                "status": "done",
                "responses": [
                    {
                        "id": 0,
                        "success": True,
                        "external_reference": str(item_id),
                        "result": {"choices": [{"index": 0, "message": message}], "usage": usage},
                    }
                ],
            }
        )

    def responder(request):
        body = request.json
        if "requests" in body:
            submitted.append(body["requests"])
            return _envelope({"status": "queued", "request_id": "req-c"})
        return {
            "req-a": done(first_round.pk, "not json either"),
            "req-b": done(second_round.pk, good),
            "req-c": done(first_round.pk, good),
        }[body["request_id"]]

    fake.responder = responder
    async_to_sync(batch_run)(batch_id=batch_id)
    first_round.refresh_from_db()
    second_round.refresh_from_db()
    # Only the first-round item was sent again, with its validation error.
    assert len(submitted) == 1 and len(submitted[0]) == 1
    assert submitted[0][0]["messages"][-2]["content"] == "not json either"
    assert second_round.status == "done" and second_round.prompt_tokens == 1000
    assert first_round.status == "done" and first_round.prompt_tokens == 1000
    assert first_round.request_id == "req-c"
    assert Batch.objects.get(pk=batch_id).status == Batch.Status.COMPLETE
    assert UsageRecord.objects.filter(batch_id=batch_id).count() == 2


async def test_an_opened_item_takes_a_follow_up_about_its_image(fake_upstream):
    """ "Ask more": the item becomes a normal conversation; a follow-up sent there carries the
    item's image, the batch's question and its answer as the history."""
    from chatapp.models import Conversation
    from tests.conftest import connect

    user = await database_sync_to_async(user_create)()
    client = await database_sync_to_async(_client)(user)
    model = await database_sync_to_async(_model)()
    ids = await database_sync_to_async(_upload)(client, 2)
    fake_upstream.responder = lambda r: stream_reply(["A blue receipt."])
    response = await database_sync_to_async(_create)(
        client, model=model.pk, question="Describe it.", images=ids
    )
    batch_id = response.json()["id"]
    await batch_run(batch_id=batch_id)
    item = await database_sync_to_async(
        lambda: BatchItem.objects.select_related("attachment").get(batch_id=batch_id, position=2)
    )()
    opened = await database_sync_to_async(client.post)(
        f"/api/batches/{batch_id}/items/{item.pk}/open"
    )
    assert opened.status_code == 201
    conversation = await database_sync_to_async(Conversation.objects.latest)("id")
    assert opened.json()["url"].rstrip("/").endswith(str(conversation.pk))
    fake_upstream.responder = lambda r: stream_reply(["It costs 3."])
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "And what does it cost?"})
    frames = await receive_until(ws, "reply.end", timeout=10)
    assert frames[-1]["status"] == "complete"
    await ws.disconnect()
    messages = fake_upstream.chat_requests()[-1].json["messages"]
    users = [m for m in messages if m["role"] == "user"]
    first = users[0]["content"]
    texts = (
        [p["text"] for p in first if p.get("type") == "text"]
        if isinstance(first, list)
        else [first]
    )
    assert any("Describe it." in t for t in texts)
    images = [p for p in first if isinstance(first, list) and p.get("type") == "image_url"]
    assert len(images) == 1  # the item's own image
    index = await database_sync_to_async(lambda: _index_by_image(Batch.objects.get(pk=batch_id)))()
    assert index[images[0]["image_url"]["url"][-200:]] == 2
    assert {"role": "assistant", "content": "A blue receipt."}.items() <= next(
        m for m in messages if m["role"] == "assistant"
    ).items()
    assert "And what does it cost?" in json.dumps(users[-1]["content"])
