"""Provider text never reaches users verbatim, and no configured key is stored or logged.

A real HTTP fake upstream answers 400 with a body that repeats the request's Authorization
header (as some proxies do). The key must appear in no frame, page, export, database row or log
line; users get our own wording, staff the upstream's reason with the key scrubbed.
"""

import json
import logging

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.test import Client

from chatapp.model_catalog import catalog_sync, reset_catalog_cache
from chatapp.models import Conversation, Message, ModelConfig, Provider
from chatapp.providers.scrub import scrub
from tests.conftest import connect, receive_until
from tests.factories import user_create
from tests.fake_upstream import FakeResponse

pytestmark = pytest.mark.django_db(transaction=True)

ENV_KEY = "envkey-Q7pL2mZx9R4t"  # the env-seeded provider's key (OPENAI_COMPAT_API_KEY)
ROW_KEY = "rowkey-J8vN3kWq5Y1s"  # a provider staff added in the admin (encrypted in its row)


def echo_authorization(request) -> FakeResponse:
    """A 400 quoting the request's headers back, Authorization included."""
    auth = request.headers.get("authorization", "")
    body = {
        "error": {
            "message": f"Invalid request: unexpected header Authorization: {auth} (model x)",
            "type": "invalid_request_error",
            "request_headers": {"authorization": auth, "host": "upstream"},
        }
    }
    return FakeResponse(
        status=400, headers={"content-type": "application/json"}, parts=[json.dumps(body).encode()]
    )


def all_rows_text() -> str:
    """Every row of every table, as the database holds it (raw SQL: no decrypting field)."""
    chunks = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            chunks.append(repr(cursor.fetchall()))
    return "\n".join(chunks)


@database_sync_to_async
def chat_on_row_provider(*, staff: bool, base_url: str) -> Conversation:
    provider, _ = Provider.objects.get_or_create(
        name="Staff proxy",
        defaults={"kind": Provider.Kind.OPENAI_COMPAT, "base_url": base_url, "api_key": ROW_KEY},
    )
    model, _ = ModelConfig.objects.get_or_create(
        provider=provider,
        model_id="proxy-model",
        defaults={"display_name": "Proxy model", "enabled": True},
    )
    return Conversation.objects.create(owner=user_create(is_staff=staff), model=model)


async def send_and_fail(conversation) -> list[dict]:
    owner = await database_sync_to_async(lambda: conversation.owner)()
    ws = await connect(owner, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "Hello?"})
    frames = await receive_until(ws, "reply.end", timeout=15)
    await ws.disconnect()
    return frames


def pages_text(conversation) -> str:
    client = Client()
    client.force_login(conversation.owner)
    texts = []
    for url in (
        f"/c/{conversation.pk}/",
        f"/c/{conversation.pk}/export.md",
        f"/c/{conversation.pk}/export.json",
    ):
        response = client.get(url)
        assert response.status_code == 200, url
        texts.append(response.content.decode())
    return "\n".join(texts)


async def test_a_key_echoed_by_the_upstream_is_in_no_frame_page_export_row_or_log(
    fake_upstream, settings, caplog, capfd
):
    settings.OPENAI_COMPAT_API_KEY = ENV_KEY
    reset_catalog_cache()
    await database_sync_to_async(catalog_sync)()  # the env provider now holds ENV_KEY
    caplog.set_level(logging.DEBUG)
    fake_upstream.responder = echo_authorization
    conversations, frames = [], []
    for staff in (False, True):
        env_model = await ModelConfig.objects.aget(model_id="fake-model")
        conversation = await database_sync_to_async(Conversation.objects.create)(
            owner=await database_sync_to_async(user_create)(is_staff=staff), model=env_model
        )
        row = await chat_on_row_provider(staff=staff, base_url=fake_upstream.base_url)
        for each in (conversation, row):
            frames += await send_and_fail(each)
            conversations.append(each)

    # The upstream really did echo both keys: the test can fail.
    sent = [r.headers.get("authorization", "") for r in fake_upstream.chat_requests()]
    assert any(ENV_KEY in a for a in sent) and any(ROW_KEY in a for a in sent)

    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 4
    user_errors, staff_errors = errors[:2], errors[2:]
    for error in user_errors:  # our own wording, nothing of the upstream's
        assert error["message"].startswith("The model provider refused the request.")
        assert "unexpected header" not in error["message"]
    for error in staff_errors:  # the upstream's reason, scrubbed
        assert "unexpected header Authorization: [redacted]" in error["message"]

    shown = json.dumps(frames)
    shown += "".join([await database_sync_to_async(pages_text)(c) for c in conversations])
    stored = await database_sync_to_async(all_rows_text)()
    assert await Message.objects.filter(status="error").acount() == 4
    captured = capfd.readouterr()
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    logged += captured.err + captured.out
    assert "refused" in logged or "failed" in logged  # the failure was logged
    for key in (ENV_KEY, ROW_KEY):
        assert key not in shown
        assert key not in stored
        assert key not in logged


def test_scrub_removes_configured_keys_and_credential_shapes(settings, caplog):
    settings.MOONSHOT_API_KEY = "moon-Z9y8X7w6V5u4"
    text = (
        'key moon-Z9y8X7w6V5u4; "Authorization": "Bearer abc.def-123"; '
        "Authorization: Basic dXNlcjpwYXNz; curl -H 'x-api-key: k-123456'; sk-proj-AbC123dEf456; "
        "cf token 1x2y3zABCDEFGHIJKLMNOPQRSTUVWXYZabcdefgh; sha 3f786850e387550fdab836ed7e6dc881de23001b"
    )
    clean = scrub(text)
    for secret in (
        "moon-Z9y8X7w6V5u4",
        "abc.def-123",
        "dXNlcjpwYXNz",
        "k-123456",
        "AbC123dEf456",
        "1x2y3zABCDEFGHIJKLMNOPQRSTUVWXYZabcdefgh",
    ):
        assert secret not in clean, secret
    assert "3f786850e387550fdab836ed7e6dc881de23001b" in clean  # a digest is not a secret
    # The log backstop: a record logging the raw text holds only the scrubbed text.
    with caplog.at_level(logging.INFO):
        logging.getLogger("chatapp.anything").warning("upstream said %s", text)
    (record,) = [r for r in caplog.records if r.name == "chatapp.anything"]
    assert record.getMessage() == f"upstream said {clean}"
