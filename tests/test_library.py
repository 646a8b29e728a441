"""The conversation library over HTTP: search, rename, settings, delete, export; and editing an
earlier message over the socket (later turns replaced, the request rebuilt from the edit)."""

import json

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from chatapp.models import Conversation, Message, ModelConfig, Provider
from tests.conftest import connect, receive_until
from tests.factories import conversation_create, user_create
from tests.fake_upstream import stream_reply


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def say(conversation, role: str, content: str, **extra) -> Message:
    return Message.objects.create(conversation=conversation, role=role, content=content, **extra)


@pytest.mark.django_db
def test_search_finds_titles_and_message_text_of_my_conversations_only():
    me, other = user_create(), user_create()
    by_title = conversation_create(owner=me, title="Tax return 2025")
    by_text = conversation_create(owner=me, title="Misc")
    say(by_text, "user", "how do I file a TAX return with a long preamble " * 3)
    conversation_create(owner=me, title="Holiday")
    theirs = conversation_create(owner=other, title="tax secrets")
    client = logged_in(me)

    results = client.get("/api/conversations/search", {"q": "tax return"}).json()["results"]

    assert {r["id"] for r in results} == {by_title.pk, by_text.pk}
    assert theirs.pk not in {r["id"] for r in results}
    snippet = next(r["snippet"] for r in results if r["id"] == by_text.pk)
    assert "TAX return" in snippet
    assert client.get("/api/conversations/search", {"q": "  "}).json()["results"] == []


@pytest.mark.django_db
def test_rename_trims_refuses_empty_and_others_conversations():
    me = user_create()
    conversation = conversation_create(owner=me, title="old")
    client = logged_in(me)
    url = f"/api/conversations/{conversation.pk}/rename"

    assert client.post(url, {"title": "  New   name "}).json()["title"] == "New name"
    conversation.refresh_from_db()
    assert conversation.title == "New name"
    refused = client.post(url, {"title": "   "})
    assert (
        refused.status_code == 400 and refused.json()["message"] == "Give the conversation a name."
    )
    assert logged_in(user_create()).post(url, {"title": "mine"}).status_code == 404
    conversation.refresh_from_db()
    assert conversation.title == "New name"


@pytest.mark.django_db
def test_delete_removes_the_conversation_and_its_messages_only_for_the_owner():
    me = user_create()
    conversation = conversation_create(owner=me, title="bye")
    say(conversation, "user", "hello")
    url = f"/api/conversations/{conversation.pk}/delete"

    assert logged_in(user_create()).post(url).status_code == 404
    assert Conversation.objects.filter(pk=conversation.pk).exists()
    assert logged_in(me).get(url).status_code == 405
    assert logged_in(me).post(url).json() == {"deleted": conversation.pk}
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()


@pytest.mark.django_db
def test_export_markdown_and_json():
    me = user_create()
    conversation = conversation_create(owner=me, title="Sky colour", system_prompt="Be brief.")
    say(conversation, "user", "Why is the sky blue?")
    say(
        conversation,
        "assistant",
        "Rayleigh **scattering**.",
        reasoning="Short wavelengths scatter more.",
        prompt_tokens=10,
        cached_tokens=4,
        completion_tokens=3,
    )
    client = logged_in(me)

    md = client.get(f"/c/{conversation.pk}/export.md")
    assert md["Content-Disposition"] == 'attachment; filename="sky-colour.md"'
    text = md.content.decode()
    assert text.startswith("# Sky colour\n")
    assert "## You\n\nWhy is the sky blue?" in text
    assert "## Assistant" in text and "Rayleigh **scattering**." in text
    assert "> Short wavelengths scatter more." in text and "Be brief." in text

    document = json.loads(client.get(f"/c/{conversation.pk}/export.json").content)
    assert document["title"] == "Sky colour"
    assert document["settings"]["system_prompt"] == "Be brief."
    assert [(m["role"], m["content"]) for m in document["messages"]] == [
        ("user", "Why is the sky blue?"),
        ("assistant", "Rayleigh **scattering**."),
    ]
    assert document["messages"][1]["cached_tokens"] == 4
    assert logged_in(user_create()).get(f"/c/{conversation.pk}/export.json").status_code == 404


def kimi_on_moonshot() -> ModelConfig:
    provider = Provider.objects.create(name="Moonshot", kind=Provider.Kind.MOONSHOT)
    return ModelConfig.objects.create(
        provider=provider, model_id="kimi-k2.6", display_name="Kimi K2.6", reasoning=True
    )


@pytest.mark.django_db
def test_settings_are_validated_and_kimi_temperature_is_locked():
    me = user_create()
    kimi = kimi_on_moonshot()
    conversation = conversation_create(owner=me)
    client = logged_in(me)
    url = f"/api/conversations/{conversation.pk}/settings"

    saved = client.post(
        url,
        {
            "model": kimi.pk,
            "system_prompt": " Answer in French. ",
            "max_output_tokens": "2048",
            "thinking": "false",
            "temperature": "",
        },
    ).json()
    assert saved == {
        "model": kimi.pk,
        "system_prompt": "Answer in French.",
        "max_output_tokens": 2048,
        "thinking": False,
        "temperature": None,
        "reasoning_effort": "",
    }
    locked = client.post(url, {"model": kimi.pk, "temperature": "0.3"})
    assert locked.status_code == 400 and "sets its own temperature" in locked.json()["message"]
    bad = client.post(url, {"model": kimi.pk, "max_output_tokens": "lots"})
    assert bad.json()["message"] == "Max output tokens must be a whole number."
    conversation.refresh_from_db()
    assert (conversation.system_prompt, conversation.max_output_tokens) == (
        "Answer in French.",
        2048,
    )

    page = client.get(f"/c/{conversation.pk}/").content.decode()
    data = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    kimi_entry = next(m for m in data["models"] if m["id"] == kimi.pk)
    assert kimi_entry["fixed_temperature"] == {"thinking": 1.0, "instant": 0.6}
    assert kimi_entry["reasoning"] is True


@pytest.mark.django_db
def test_temperature_is_free_where_the_provider_allows_it(fake_upstream):
    me = user_create()
    conversation = conversation_create(owner=me)
    client = logged_in(me)
    saved = client.post(
        f"/api/conversations/{conversation.pk}/settings",
        {"model": conversation.model_id, "temperature": "0.2", "thinking": "true"},
    ).json()
    assert saved["temperature"] == 0.2
    assert saved["thinking"] is None  # fake-model has no thinking switch


make_user = database_sync_to_async(user_create)
make_conversation = database_sync_to_async(conversation_create)


@pytest.mark.django_db(transaction=True)
async def test_editing_an_earlier_message_replaces_later_turns_and_resends(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user, system_prompt="Be brief.")
    await Conversation.objects.filter(pk=conversation.pk).aupdate(
        max_output_tokens=321, temperature=0.4
    )
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    fake_upstream.enqueue(stream_reply(["one"]), stream_reply(["two"]), stream_reply(["edited"]))
    await ws.send_json_to({"type": "send", "text": "first question"})
    first = (await receive_until(ws, "reply.end"))[0]["message"]
    await ws.send_json_to({"type": "send", "text": "second question"})
    await receive_until(ws, "reply.end")

    await ws.send_json_to({"type": "edit", "message_id": first["id"], "text": "better question"})
    frames = await receive_until(ws, "reply.end")

    assert frames[0]["type"] == "message.edited"
    assert frames[0]["message"] == {**frames[0]["message"], "id": first["id"]}
    assert frames[0]["message"]["content"] == "better question"
    assert frames[-1]["message"]["content"] == "edited"
    rows = [(m.role, m.content) async for m in Message.objects.filter(conversation=conversation)]
    assert rows == [("user", "better question"), ("assistant", "edited")]
    body = fake_upstream.chat_requests()[-1].json
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "better question"},
    ]
    assert body["max_completion_tokens"] == 321 and body["temperature"] == 0.4

    await ws.send_json_to({"type": "edit", "message_id": frames[-1]["message"]["id"], "text": "x"})
    error = await receive_until(ws, "error")
    assert error[-1]["message"] == "That message is not in this conversation."
    await ws.disconnect()


@pytest.mark.django_db
def test_export_json_carries_images_as_data_urls_and_delete_removes_their_files(
    settings, tmp_path, django_capture_on_commit_callbacks
):
    import base64
    import io

    from django.core.files.uploadedfile import SimpleUploadedFile
    from PIL import Image

    from chatapp.conversations import turn_start
    from tests import image_factories as f

    settings.MEDIA_ROOT = tmp_path / "media"
    me = user_create()
    conversation = conversation_create(owner=me, title="Look")
    client = logged_in(me)
    png = f.encode(f.screenshot(320, 200), "PNG")
    upload = client.post(
        "/api/attachments/", {"file": SimpleUploadedFile("shot.png", png, content_type="image/png")}
    ).json()
    turn_start(
        conversation=conversation, text="what is this?", user=me, attachment_ids=[upload["id"]]
    )

    document = json.loads(client.get(f"/c/{conversation.pk}/export.json").content)
    (attachment,) = document["messages"][0]["attachments"]
    assert attachment["name"] == "shot.png"
    (url,) = attachment["data_urls"]
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        assert image.size == (320, 200)
    text = client.get(f"/c/{conversation.pk}/export.md").content.decode()
    assert "*Image: shot.png (320×200 → 320×200," in text

    assert any(p.is_file() for p in settings.MEDIA_ROOT.rglob("*"))
    with django_capture_on_commit_callbacks(execute=True):  # files go after the commit
        assert client.post(f"/api/conversations/{conversation.pk}/delete").status_code == 200
    assert not any(p.is_file() for p in settings.MEDIA_ROOT.rglob("*"))


@pytest.mark.django_db(transaction=True)
async def test_an_edit_keeps_the_edited_messages_images_and_deletes_the_dropped_turns_images(
    fake_upstream, settings, tmp_path
):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from chatapp.models import StoredImage
    from tests import image_factories as f

    settings.MEDIA_ROOT = tmp_path / "media"
    user = await make_user()
    conversation = await make_conversation(owner=user)
    client = await database_sync_to_async(logged_in)(user)

    def upload(width: int) -> int:
        png = f.encode(f.screenshot(width, 200), "PNG")
        file = SimpleUploadedFile(f"{width}.png", png, content_type="image/png")
        return client.post("/api/attachments/", {"file": file}).json()["id"]

    kept = await database_sync_to_async(upload)(300)
    dropped = await database_sync_to_async(upload)(500)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "one", "attachments": [kept]})
    first = (await receive_until(ws, "reply.end"))[0]["message"]
    await ws.send_json_to({"type": "send", "text": "two", "attachments": [dropped]})
    await receive_until(ws, "reply.end")
    files_before = {p for p in settings.MEDIA_ROOT.rglob("*") if p.is_file()}

    await ws.send_json_to({"type": "edit", "message_id": first["id"], "text": "one, again"})
    frames = await receive_until(ws, "reply.end")

    assert [a["name"] for a in frames[0]["message"]["attachments"]] == ["300.png"]
    files_after = {p for p in settings.MEDIA_ROOT.rglob("*") if p.is_file()}
    assert files_after < files_before  # the dropped turn's image (and thumbnail) are gone
    paths = {p async for p in StoredImage.objects.values_list("path", flat=True)}
    assert {str(p.relative_to(settings.MEDIA_ROOT)) for p in files_after} == paths
    content = fake_upstream.chat_requests()[-1].json["messages"][-1]["content"]
    assert content[0] == {"type": "text", "text": "one, again"}
    assert content[1]["type"] == "image_url"
    await ws.disconnect()
