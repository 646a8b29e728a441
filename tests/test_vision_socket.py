"""Images end to end: uploaded over HTTP, sent over the real websocket, received by the real
HTTP fake upstream as data URLs."""

import base64
import io
import json

import pytest
from channels.db import database_sync_to_async
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from PIL import Image

from chatapp.model_catalog import catalog_sync, reset_catalog_cache
from chatapp.models import Attachment, Message, ModelConfig
from tests import image_factories as f
from tests.conftest import connect, receive_until
from tests.factories import conversation_create, user_create

pytestmark = pytest.mark.django_db(transaction=True)

make_user = database_sync_to_async(user_create)
make_conversation = database_sync_to_async(conversation_create)


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def _upload(user, data: bytes, name: str) -> dict:
    client = Client()
    client.force_login(user)
    response = client.post(
        "/api/attachments/", {"file": SimpleUploadedFile(name, data, content_type="image/png")}
    )
    assert response.status_code == 201, response.content
    return response.json()


upload = database_sync_to_async(_upload)


async def send(ws, text: str, attachments: list[int]) -> list[dict]:
    await ws.send_json_to({"type": "send", "text": text, "attachments": attachments})
    return await receive_until(ws, "reply.end")


def decode_image_part(part: dict) -> Image.Image:
    assert part["type"] == "image_url"
    url = part["image_url"]["url"]
    header, _, payload = url.partition(",")
    assert header in {"data:image/png;base64", "data:image/jpeg;base64", "data:image/webp;base64"}
    return Image.open(io.BytesIO(base64.b64decode(payload)))


async def test_two_images_reach_the_upstream_in_order_as_clean_data_urls(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    photo = await upload(user, f.encode(f.photo(4000, 3000), "JPEG", quality=92), "photo.jpg")
    rotated = await upload(user, f.exif_rotated_jpeg(), "rotated.jpg")
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()

    frames = await send(ws, "What is in these?", [photo["id"], rotated["id"]])
    await ws.disconnect()

    sent = frames[0]
    assert sent["type"] == "message"
    shown = sent["message"]["attachments"]
    assert [a["id"] for a in shown] == [photo["id"], rotated["id"]]
    assert shown[0]["label"].startswith("4000×3000 → 3000×2250")
    assert shown[0]["thumbnail_url"] == photo["thumbnail_url"]
    assert frames[-1]["message"]["status"] == "complete"

    (request,) = fake_upstream.chat_requests()
    (user_turn,) = request.json["messages"]
    text, first, second = user_turn["content"]
    assert text == {"type": "text", "text": "What is in these?"}
    big, turned = decode_image_part(first), decode_image_part(second)
    assert big.size == (3000, 2250)
    assert turned.size == (100, 200)  # EXIF orientation 6 applied
    for im in (big, turned):
        assert not im.getexif()
        assert not {"exif", "xmp", "icc_profile", "comment"} & set(im.info)
    # The marker stored at the top-left lands top-right once rotated.
    assert turned.convert("RGB").getpixel((85, 10))[0] > 200


async def test_turn_two_resends_the_images_byte_identically(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    shot = await upload(user, f.encode(f.screenshot(1600, 900), "PNG"), "shot.png")
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await send(ws, "Read this", [shot["id"]])
    await send(ws, "And now?", [])
    await ws.disconnect()

    first, second = fake_upstream.chat_requests()
    turn1, turn2 = first.json["messages"], second.json["messages"]
    assert turn2[: len(turn1)] == turn1
    assert turn2[len(turn1)]["role"] == "assistant"
    assert turn2[-1] == {"role": "user", "content": "And now?"}
    # Byte for byte on the wire, up to the end of turn 1's messages.
    opening = json.dumps(turn1, ensure_ascii=False, separators=(",", ":"))[:-1]
    assert opening.encode() in first.body
    assert opening.encode() in second.body


async def test_image_only_message_is_allowed_and_titled_by_the_file(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    shot = await upload(user, f.encode(f.screenshot(400, 300), "PNG"), "diagram.png")
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    frames = await send(ws, "", [shot["id"]])
    await ws.disconnect()
    assert frames[0]["title"] == "diagram.png"
    (request,) = fake_upstream.chat_requests()
    (part,) = request.json["messages"][0]["content"]
    assert decode_image_part(part).size == (400, 300)


async def test_model_without_vision_is_refused_before_any_upstream_call(fake_upstream, settings):
    settings.OPENAI_COMPAT_MODELS = ["fake-model", "text-model:text"]
    reset_catalog_cache()
    await database_sync_to_async(catalog_sync)()
    text_model = await ModelConfig.objects.aget(model_id="text-model")
    assert text_model.vision is False
    user = await make_user()
    conversation = await make_conversation(owner=user, model=text_model)
    shot = await upload(user, f.encode(f.screenshot(400, 300), "PNG"), "shot.png")
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()

    await ws.send_json_to({"type": "send", "text": "What is this?", "attachments": [shot["id"]]})
    error = await ws.receive_json_from(timeout=5)
    await ws.disconnect()

    assert error["type"] == "error"
    assert error["code"] == "no_vision"
    assert "cannot see images" in error["message"]
    assert "fake-model" in error["message"]  # names the models that can
    assert fake_upstream.chat_requests() == []
    assert not await Message.objects.filter(conversation=conversation).aexists()
    assert (await Attachment.objects.aget(pk=shot["id"])).message_id is None


async def test_someone_elses_or_already_sent_images_are_refused(fake_upstream):
    user, other = await make_user(), await make_user()
    conversation = await make_conversation(owner=user)
    theirs = await upload(other, f.encode(f.screenshot(300, 200), "PNG"), "theirs.png")
    mine = await upload(user, f.encode(f.screenshot(320, 200), "PNG"), "mine.png")
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()

    await ws.send_json_to({"type": "send", "text": "look", "attachments": [theirs["id"]]})
    error = await ws.receive_json_from(timeout=5)
    assert error["code"] == "attachment_unavailable"
    await send(ws, "look", [mine["id"]])
    await ws.send_json_to({"type": "send", "text": "again", "attachments": [mine["id"]]})
    again = await ws.receive_json_from(timeout=5)
    assert again["code"] == "attachment_unavailable"
    await ws.send_json_to({"type": "send", "text": "x", "attachments": ["1"]})
    assert (await ws.receive_json_from(timeout=5))["code"] == "bad_frame"
    await ws.disconnect()
    assert len(fake_upstream.chat_requests()) == 1
    assert await Message.objects.filter(conversation=conversation).acount() == 2


async def test_per_message_limits_are_enforced_with_clear_messages(fake_upstream, settings):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    a = await upload(user, f.encode(f.screenshot(300, 200), "PNG"), "a.png")
    b = await upload(user, f.encode(f.screenshot(340, 200), "PNG"), "b.png")
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()

    settings.IMAGE_MAX_PER_MESSAGE = 1
    await ws.send_json_to({"type": "send", "text": "two", "attachments": [a["id"], b["id"]]})
    error = await ws.receive_json_from(timeout=5)
    assert error["code"] == "too_many_images"
    assert "at most 1 images" in error["message"]

    settings.IMAGE_MAX_PER_MESSAGE = 16
    settings.IMAGE_MAX_BYTES_PER_MESSAGE = 100
    await ws.send_json_to({"type": "send", "text": "two", "attachments": [a["id"], b["id"]]})
    error = await ws.receive_json_from(timeout=5)
    assert error.get("code") == "images_too_large", error
    assert "Send them in more than one message" in error["message"]
    await ws.disconnect()

    assert fake_upstream.chat_requests() == []
    assert not await Message.objects.filter(conversation=conversation).aexists()


async def test_the_page_shows_sent_images_in_the_users_message(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    shot = await upload(user, f.encode(f.screenshot(300, 200), "PNG"), "shot.png")
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await send(ws, "see", [shot["id"]])
    await ws.disconnect()

    def page():
        client = Client()
        client.force_login(user)
        return client.get(f"/c/{conversation.pk}/").content.decode()

    html = await database_sync_to_async(page)()
    data = html.split('<script id="page-data" type="application/json">')[1].split("</script>")[0]
    user_message = json.loads(data)["messages"][0]
    (shown,) = user_message["attachments"]
    assert shown["thumbnail_url"] == shot["thumbnail_url"]
    assert shown["label"].startswith("300×200 → 300×200, ")


async def test_a_tall_screenshot_reaches_the_model_as_ordered_full_width_tiles(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    tall = await upload(user, f.encode(f.tall_screenshot(1080, 8000), "PNG"), "scroll.png")
    assert " tiles " in tall["label"]
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await send(ws, "Summarise this page", [tall["id"]])
    await ws.disconnect()

    (request,) = fake_upstream.chat_requests()
    parts = request.json["messages"][0]["content"][1:]
    assert len(parts) == len(tall["part_urls"]) > 1
    tiles = [decode_image_part(part).convert("RGB") for part in parts]
    assert all(tile.width == 1080 for tile in tiles)  # legible: not squashed
    top_bands = [f.band_of(tile.getpixel((2, 1))) for tile in tiles]
    assert top_bands == sorted(top_bands) and top_bands[0] == 0
    bottom = tiles[-1]
    assert f.band_of(bottom.getpixel((2, bottom.height - 1))) == 7999 // 4


async def test_earlier_images_become_a_note_for_a_model_that_cannot_see(fake_upstream, settings):
    settings.OPENAI_COMPAT_MODELS = ["fake-model", "text-model:text"]
    reset_catalog_cache()
    await database_sync_to_async(catalog_sync)()
    text_model = await ModelConfig.objects.aget(model_id="text-model")
    user = await make_user()
    conversation = await make_conversation(owner=user)
    shot = await upload(user, f.encode(f.screenshot(300, 200), "PNG"), "shot.png")
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await send(ws, "what is this", [shot["id"]])
    await ws.send_json_to({"type": "send", "text": "and now?", "model": text_model.pk})
    await receive_until(ws, "reply.end")
    await ws.disconnect()

    second = fake_upstream.chat_requests()[1].json["messages"]
    assert second[0] == {
        "role": "user",
        "content": "what is this\n\n[1 image not shown: this model cannot see images]",
    }


async def test_the_editors_note_follows_its_image_and_is_cleaned(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)

    def upload_with_note() -> dict:
        client = Client()
        client.force_login(user)
        note = "The user marked up this image: it has numbered markers 1-3.\x00\n" + "x" * 900
        response = client.post(
            "/api/attachments/",
            {
                "file": SimpleUploadedFile("marked.png", f.encode(f.screenshot(320, 200), "PNG")),
                "note": note,
            },
        )
        assert response.status_code == 201, response.content
        return response.json()

    marked = await database_sync_to_async(upload_with_note)()
    plain = await upload(user, f.encode(f.screenshot(300, 200), "PNG"), "plain.png")
    assert marked["note"].startswith("The user marked up this image: it has numbered markers 1-3. ")
    assert len(marked["note"]) == 600 and "\x00" not in marked["note"]
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await send(ws, "What does marker 2 point at?", [marked["id"], plain["id"]])
    await ws.disconnect()

    (request,) = fake_upstream.chat_requests()
    parts = request.json["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url"]
    assert parts[2]["text"] == marked["note"]  # right after its own image, before the next


async def test_a_send_refused_for_its_images_writes_nothing_and_the_images_can_be_resent(
    fake_upstream,
):
    """The window check that counts images runs before the turn is committed: a refusal
    leaves no message (neither the user's nor an error reply) and the images unsent, so the
    same upload goes out with the next send."""
    user = await make_user()
    conversation = await make_conversation(owner=user)
    await ModelConfig.objects.filter(pk=conversation.model_id).aupdate(context_window=4_000)
    photo = await upload(user, f.encode(f.photo(1600, 1600), "JPEG", quality=90), "big.jpg")
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()

    await ws.send_json_to({"type": "send", "text": "What is this?", "attachments": [photo["id"]]})
    frames = await receive_until(ws, "error")
    assert frames[-1]["code"] == "context_full", frames[-1]
    assert not [f for f in frames if f["type"] == "message"]
    assert await Message.objects.filter(conversation=conversation).acount() == 0
    attachment = await Attachment.objects.aget(pk=photo["id"])
    assert attachment.message_id is None
    assert fake_upstream.chat_requests() == []

    await ModelConfig.objects.filter(pk=conversation.model_id).aupdate(context_window=262_144)
    frames = await send(ws, "What is this?", [photo["id"]])
    await ws.disconnect()
    assert frames[-1]["message"]["status"] == "complete"
    assert [a["id"] for a in frames[0]["message"]["attachments"]] == [photo["id"]]
    (request,) = fake_upstream.chat_requests()
    decode_image_part(request.json["messages"][0]["content"][1])
    assert await Message.objects.filter(conversation=conversation).acount() == 2
