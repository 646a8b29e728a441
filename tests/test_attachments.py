"""Image uploads over HTTP: auth, CSRF, limits, every bad input, ownership, the private image
views, deduplication and deleting files with their last reference."""

import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from PIL import Image

from chatapp import attachments
from chatapp.conversations import history_for_request, turn_start
from chatapp.model_catalog import catalog_sync, reset_catalog_cache
from chatapp.models import Attachment, AttachmentPart, Message, ModelConfig, StoredImage
from tests import image_factories as f
from tests.factories import conversation_create, user_create

pytestmark = pytest.mark.django_db

UPLOAD = "/api/attachments/"


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def png(width=300, height=200) -> bytes:
    return f.encode(f.screenshot(width, height), "PNG")


def logged_in(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def post_image(client, data: bytes, name="shot.png", **extra):
    return client.post(
        UPLOAD, {"file": SimpleUploadedFile(name, data, content_type="image/png"), **extra}
    )


def truncated_png() -> bytes:
    data = png(400, 300)
    return data[: len(data) // 2]


# ---- auth and CSRF ---------------------------------------------------------------------------


def test_anonymous_upload_is_refused_and_nothing_is_saved(media_root):
    response = post_image(Client(), png())
    assert response.status_code == 401
    assert "Log in" in response.json()["message"]
    assert not Attachment.objects.exists()
    assert stored_files(media_root) == []


def test_upload_without_csrf_token_is_refused_with_a_clear_message(media_root):
    user = user_create()
    response = post_image(logged_in(user, enforce_csrf_checks=True), png())
    assert response.status_code == 403
    assert "security token" in response.json()["message"]
    assert not Attachment.objects.exists()
    assert stored_files(media_root) == []


def test_upload_with_csrf_token_in_the_header_is_accepted():
    user = user_create()
    client = logged_in(user, enforce_csrf_checks=True)
    client.get("/")  # sets the csrftoken cookie
    token = client.cookies["csrftoken"].value
    response = client.post(
        UPLOAD,
        {"file": SimpleUploadedFile("shot.png", png(), content_type="image/png")},
        HTTP_X_CSRFTOKEN=token,
    )
    assert response.status_code == 201, response.content


# ---- what a good upload returns -------------------------------------------------------------


def test_upload_returns_the_sent_size_label_and_a_private_thumbnail(media_root):
    user = user_create()
    client = logged_in(user)
    response = post_image(client, f.encode(f.photo(4000, 3000), "JPEG", quality=95), "cat.jpg")
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "cat.jpg"
    assert body["label"].startswith("4000×3000 → 3000×2250, ")
    assert body["label"].endswith(" KB") or body["label"].endswith(" MB")
    thumb = client.get(body["thumbnail_url"])
    assert thumb.status_code == 200
    assert thumb["Content-Type"] == "image/webp"
    assert "private" in thumb["Cache-Control"]
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    full = client.get(body["url"])
    assert Image.open(io.BytesIO(full.content)).size == (3000, 2250)
    # Stored under MEDIA_ROOT, content-addressed; the original upload is not kept.
    image = AttachmentPart.objects.get(attachment_id=body["id"]).image
    assert (media_root / image.path).read_bytes() == full.content
    assert image.sha256 in image.path


@pytest.mark.parametrize(
    ("name", "make", "check"),
    [
        (
            "anim.gif",
            f.animated_gif,
            lambda im, body: im.convert("RGB").getpixel((5, 5)) == f.MARKER,
        ),
        (
            "cmyk.jpg",
            f.cmyk_jpeg,
            lambda im, body: (
                im.convert("RGB").getpixel((5, 5))[1] > 150
                and im.convert("RGB").getpixel((60, 5))[0] > 150
            ),
        ),
        ("deep.png", f.grey16_png, lambda im, body: im.size == (32, 32)),
        ("pal.png", f.palette_png_with_transparency, lambda im, body: im.size == (32, 32)),
        (
            "rotated.jpg",
            f.exif_rotated_jpeg,
            lambda im, body: im.size == (100, 200) and not im.getexif(),
        ),
        (
            "iphone.heic",
            lambda: f.encode(f.photo(640, 480), "HEIF", quality=90),
            lambda im, body: im.size == (640, 480),
        ),
        (
            "tall.png",
            lambda: f.encode(f.tall_screenshot(1080, 8000), "PNG"),
            lambda im, body: len(body["part_urls"]) > 1 and " tiles " in body["label"],
        ),
    ],
)
def test_accepted_unusual_images(name, make, check):
    user = user_create()
    client = logged_in(user)
    response = post_image(client, make(), name)
    assert response.status_code == 201, response.content
    body = response.json()
    im = Image.open(io.BytesIO(client.get(body["url"]).content))
    assert check(im, body)
    assert "exif" not in im.info and "xmp" not in im.info and "icc_profile" not in im.info


# ---- bad input: a clear message, never a 500, nothing half-saved -----------------------------


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("truncated.png", truncated_png, "PNG, JPEG"),
        ("notes.png", lambda: b"hello, this is just text\n" * 20, "PNG, JPEG"),
        ("archive.png", f.zip_bytes, "PNG, JPEG"),
        ("evil.svg", lambda: f.SVG_WITH_SCRIPT, "PNG, JPEG"),
        ("bomb.png", lambda: f.bomb_png(30_000, 30_000), "pixels"),
        ("empty.png", lambda: b"", "empty"),
    ],
)
def test_bad_files_are_refused_clearly_and_nothing_is_saved(name, make, expected, media_root):
    user = user_create()
    response = post_image(logged_in(user), make(), name)
    assert response.status_code == 400
    body = response.json()
    assert expected in body["message"]
    assert body["code"] == "bad_image"
    assert not Attachment.objects.exists()
    assert not StoredImage.objects.exists()
    assert stored_files(media_root) == []


def test_too_large_upload_is_refused_with_the_limit(settings, media_root):
    settings.IMAGE_MAX_UPLOAD_BYTES = 50_000
    user = user_create()
    response = post_image(logged_in(user), f.encode(f.noise(400, 400), "PNG"))
    assert response.status_code == 413
    assert "upload limit" in response.json()["message"]
    assert not Attachment.objects.exists()
    assert stored_files(media_root) == []


async def test_an_oversized_upload_is_refused_before_its_body_is_read(settings):
    from asgiref.testing import ApplicationCommunicator

    from chatapp.asgi import application

    settings.IMAGE_MAX_UPLOAD_BYTES = 1000
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/api/attachments/",
        "raw_path": b"/api/attachments/",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"127.0.0.1"), (b"content-length", b"500000000")],
    }
    communicator = ApplicationCommunicator(application, scope)
    # No body is ever sent: the answer must come from the declared length alone.
    start = await communicator.receive_output(timeout=5)
    body = await communicator.receive_output(timeout=5)
    assert start["status"] == 413
    assert "upload limit" in json.loads(body["body"])["message"]
    await communicator.wait(timeout=5)


def test_a_request_without_a_file_is_refused():
    response = logged_in(user_create()).post(UPLOAD, {"conversation": ""})
    assert response.status_code == 400
    assert "Choose an image" in response.json()["message"]


def test_a_malformed_multipart_body_is_a_400_not_a_500():
    response = logged_in(user_create()).post(
        UPLOAD,
        data=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n',
        content_type="multipart/form-data; boundary=",
    )
    assert response.status_code == 400
    assert response.json()["code"] == "bad_upload"
    assert not Attachment.objects.exists()


def test_an_unexpected_decoder_failure_is_a_400_not_a_500(monkeypatch, media_root):
    def explode(*args, **kwargs):
        raise OSError("decoder broke")

    monkeypatch.setattr("chatapp.images.process_upload", explode)
    response = post_image(logged_in(user_create()), png())
    assert response.status_code == 400
    assert "could not be read as an image" in response.json()["message"]
    assert not Attachment.objects.exists()


def test_a_failed_save_leaves_no_rows_and_no_files(monkeypatch, media_root):
    def fail(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(AttachmentPart.objects, "create", fail)
    user = user_create()
    with pytest.raises(RuntimeError):
        attachments.attachment_create(
            owner=user,
            conversation=None,
            filename="x.png",
            processed=__import__("chatapp.images").images.process_upload(png()),
        )
    assert not Attachment.objects.exists()
    assert not StoredImage.objects.exists()
    assert stored_files(media_root) == []


# ---- ownership ---------------------------------------------------------------------------------


def test_upload_into_another_users_conversation_is_refused():
    owner, intruder = user_create(), user_create()
    conversation = conversation_create(owner=owner)
    response = post_image(logged_in(intruder), png(), conversation=str(conversation.pk))
    assert response.status_code == 404
    assert response.json()["message"] == "No such conversation."
    assert not Attachment.objects.exists()


def test_upload_into_own_conversation_is_bound_to_it():
    user = user_create()
    conversation = conversation_create(owner=user)
    response = post_image(logged_in(user), png(), conversation=str(conversation.pk))
    assert response.status_code == 201
    assert Attachment.objects.get(pk=response.json()["id"]).conversation == conversation


def test_image_views_refuse_other_users_and_anonymous():
    owner, other = user_create(), user_create()
    body = post_image(logged_in(owner), png()).json()
    for url in (body["url"], body["thumbnail_url"]):
        assert logged_in(owner).get(url).status_code == 200
        assert logged_in(other).get(url).status_code == 404
        assert Client().get(url).status_code == 404


def test_sent_images_follow_the_conversations_access_rule():
    owner, other = user_create(), user_create()
    conversation = conversation_create(owner=owner)
    body = post_image(logged_in(owner), png()).json()
    turn_start(conversation=conversation, text="look", user=owner, attachment_ids=[body["id"]])
    assert logged_in(owner).get(body["url"]).status_code == 200
    assert logged_in(other).get(body["url"]).status_code == 404
    assert logged_in(other).get("/attachments/999999/thumbnail/").status_code == 404


def test_removing_an_unsent_upload_deletes_its_files(
    media_root, django_capture_on_commit_callbacks
):
    user, other = user_create(), user_create()
    body = post_image(logged_in(user), png()).json()
    assert stored_files(media_root)
    assert logged_in(other).delete(f"{UPLOAD}{body['id']}/").status_code == 404
    with django_capture_on_commit_callbacks(execute=True):
        response = logged_in(user).delete(f"{UPLOAD}{body['id']}/")
    assert response.status_code == 200
    assert not Attachment.objects.exists()
    assert stored_files(media_root) == []


# ---- storage lifecycle -----------------------------------------------------------------------


def test_same_image_is_stored_once():
    user = user_create()
    client = logged_in(user)
    first = post_image(client, png()).json()
    second = post_image(client, png(), "again.png").json()
    assert first["id"] != second["id"]
    assert StoredImage.objects.count() == 2  # one processed image + one thumbnail


def test_deleting_a_conversation_keeps_images_another_message_still_uses(
    media_root, django_capture_on_commit_callbacks
):
    user = user_create()
    client = logged_in(user)
    shared, only_here = png(300, 200), png(500, 300)
    keep = conversation_create(owner=user)
    doomed = conversation_create(owner=user)
    a = post_image(client, shared).json()["id"]
    b = post_image(client, shared).json()["id"]
    c = post_image(client, only_here).json()["id"]
    turn_start(conversation=keep, text="one", user=user, attachment_ids=[a])
    Message.objects.filter(status="streaming").update(status="complete")
    turn_start(conversation=doomed, text="two", user=user, attachment_ids=[b, c])
    before = stored_files(media_root)
    assert len(before) == 4

    with django_capture_on_commit_callbacks(execute=True):
        attachments.conversation_delete(conversation=doomed)

    after = stored_files(media_root)
    assert len(after) == 2
    shared_image = AttachmentPart.objects.get(attachment_id=a).image
    assert media_root / shared_image.path in after
    assert logged_in(user).get(f"/attachments/{a}/image/0/").status_code == 200
    assert StoredImage.objects.count() == 2

    with django_capture_on_commit_callbacks(execute=True):
        attachments.conversation_delete(conversation=keep)
    assert stored_files(media_root) == []
    assert not StoredImage.objects.exists()


def test_unsent_uploads_expire(media_root, django_capture_on_commit_callbacks):
    user = user_create()
    post_image(logged_in(user), png())
    assert attachments.attachments_purge_unsent(older_than=timedelta(hours=1)) == 0
    with django_capture_on_commit_callbacks(execute=True):
        assert attachments.attachments_purge_unsent(older_than=timedelta(seconds=-1)) == 1
    assert stored_files(media_root) == []


def test_images_orphaned_by_other_deletes_are_swept_on_the_next_upload(
    media_root, django_capture_on_commit_callbacks
):
    user = user_create()
    client = logged_in(user)
    conversation = conversation_create(owner=user)
    first = post_image(client, png(300, 200)).json()["id"]
    turn_start(conversation=conversation, text="x", user=user, attachment_ids=[first])
    conversation.delete()  # as the admin or a deleted user's cascade would
    assert len(stored_files(media_root)) == 2
    with django_capture_on_commit_callbacks(execute=True):
        kept = post_image(client, png(500, 300)).json()["id"]
    assert len(stored_files(media_root)) == 2
    assert StoredImage.objects.count() == 2
    assert logged_in(user).get(f"/attachments/{kept}/image/0/").status_code == 200


# ---- request building ------------------------------------------------------------------------


def test_history_query_count_does_not_grow_with_image_turns():
    user = user_create()
    client = logged_in(user)
    conversation = conversation_create(owner=user)

    def image_turn(n):
        ids = [post_image(client, png(200 + n, 100)).json()["id"]]
        _, reply = turn_start(
            conversation=conversation, text=f"t{n}", user=user, attachment_ids=ids
        )
        Message.objects.filter(pk=reply.pk).update(status="complete", content=f"r{n}")
        return reply

    def queries(reply):
        with CaptureQueriesContext(connection) as ctx:
            history_for_request(conversation, before=reply)
        return len(ctx.captured_queries)

    short = queries(image_turn(1))
    for n in range(2, 6):
        last = image_turn(n)
    assert queries(last) == short


def test_text_only_model_from_the_environment_is_stored_without_vision(settings):
    settings.OPENAI_COMPAT_BASE_URL = "http://127.0.0.1:9/v1"
    settings.OPENAI_COMPAT_MODELS = ["kimi-k2.6", "deepseek-chat:text"]
    reset_catalog_cache()
    catalog_sync()
    flags = dict(ModelConfig.objects.values_list("model_id", "vision"))
    assert flags["kimi-k2.6"] is True
    assert flags["deepseek-chat"] is False
    assert ModelConfig.objects.get(model_id="kimi-k2.6").max_image_edge == 3000
