"""PDF pages as images: preview, pick, render, send; and every way a PDF is refused."""

import base64
import io
import time

import pytest
from channels.db import database_sync_to_async
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from PIL import Image

from chatapp import pdfs
from chatapp.models import Attachment, StoredImage
from tests.conftest import connect, receive_until
from tests.factories import conversation_create, user_create
from tests.media_factories import PAGE_COLOURS, coloured_pdf, minimal_pdf

UPLOAD = "/api/attachments/"
PREVIEW = "/api/attachments/pdf-preview/"


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def post(client, path: str, data: bytes, name="diagram.pdf", **fields):
    upload = SimpleUploadedFile(name, data, content_type="application/pdf")
    return client.post(path, {"file": upload, **fields})


def stored_files(root) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ---- the pipeline ----------------------------------------------------------------------------


def test_preview_lists_every_page_with_its_sent_size_and_a_thumbnail():
    preview = pdfs.pdf_preview(coloured_pdf(3))
    assert preview.page_count == 3
    assert [p.number for p in preview.pages] == [1, 2, 3]
    # Letter at 200 dpi: legible, and under the 3000 px edge, so sent as rendered.
    assert {p.send_size for p in preview.pages} == {"1700×2200"}
    thumbnail = Image.open(io.BytesIO(preview.pages[2].thumbnail))
    assert max(thumbnail.size) == pdfs.PREVIEW_EDGE
    assert thumbnail.convert("RGB").getpixel((80, 120)) == pytest.approx(PAGE_COLOURS[2], abs=12)


def test_pages_render_in_the_order_asked_through_the_image_pipeline():
    rendered = pdfs.pdf_render_pages(coloured_pdf(3), [3, 1])
    assert [page.number for page in rendered] == [3, 1]
    for page, colour in zip(rendered, [PAGE_COLOURS[2], PAGE_COLOURS[0]], strict=True):
        (part,) = page.processed.parts
        assert (part.width, part.height) == (1700, 2200)
        assert part.mime == "image/png"  # flat pages stay lossless
        image = Image.open(io.BytesIO(part.data)).convert("RGB")
        assert image.getpixel((850, 1500)) == pytest.approx(colour, abs=4)  # Pillow's PDF is JPEG
        assert image.getpixel((850, 50)) == (255, 255, 255)


def test_a_tall_page_is_tiled_not_shrunk_illegible():
    (page,) = pdfs.pdf_render_pages(coloured_pdf(1, inches=(8.5, 60)), [1])
    parts = page.processed.parts
    assert len(parts) > 1
    assert {p.width for p in parts} == {1700}
    preview = pdfs.pdf_preview(coloured_pdf(1, inches=(8.5, 60)))
    assert preview.pages[0].send_size.startswith(f"{len(parts)} tiles of up to 1700×")


def test_a_2000_page_pdf_is_refused_before_any_page_is_rendered(monkeypatch):
    def render(*args, **kwargs):
        raise AssertionError("rendered a page of a refused PDF")

    monkeypatch.setattr(pdfs, "_render", render)
    started = time.monotonic()
    with pytest.raises(pdfs.PdfError, match="has 2,000 pages; the limit is 200"):
        pdfs.pdf_preview(minimal_pdf(2000), max_pages=200)
    with pytest.raises(pdfs.PdfError, match="has 2,000 pages"):
        pdfs.pdf_render_pages(minimal_pdf(2000), [1], max_pages=200)
    assert time.monotonic() - started < 2


def test_a_page_too_large_to_render_is_refused_before_rendering(monkeypatch):
    # 8.5 × 200 inches (a very long receipt): 8.8 MP even at 72 dpi, over a 5 MP limit.
    long_page = minimal_pdf(1, size=(612, 14400))

    def render(*args, **kwargs):
        raise AssertionError("rendered a page over the pixel limit")

    monkeypatch.setattr(pdfs, "_render", render)
    with pytest.raises(pdfs.PdfError, match=r"Page 1 of x.pdf is too large to render \(8×200 in\)"):
        pdfs.pdf_render_pages(long_page, [1], name="x.pdf", max_page_pixels=5_000_000)
    preview = pdfs.pdf_preview(long_page, max_page_pixels=5_000_000)
    assert preview.pages[0].send_size == "too large to render"


def test_a_huge_page_renders_at_the_models_edge_and_a_long_one_within_the_pixel_limit():
    # A0 poster (33 × 47 in): rendered straight at the 3000 px edge, not at 200 dpi (62 MP).
    (page,) = pdfs.pdf_render_pages(coloured_pdf(1, inches=(33, 47)), [1])
    (part,) = page.processed.parts
    assert max(part.width, part.height) == 3000
    # 8.5 × 100 in: 34 MP at 200 dpi, over a 20 MP limit, so rendered at ~150 dpi and tiled.
    (page,) = pdfs.pdf_render_pages(
        coloured_pdf(1, inches=(8.5, 100)), [1], max_page_pixels=20_000_000
    )
    assert {p.width for p in page.processed.parts} == {1304}  # 153 dpi, tiled: legible


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (minimal_pdf(1, encrypt=True), "diagram.pdf is encrypted (password-protected)"),
        (b"%PDF-1.7\n" + b"\x00garbage" * 50, "diagram.pdf could not be read as a PDF"),
        (coloured_pdf(3)[:600], "diagram.pdf could not be read as a PDF"),
    ],
    ids=["encrypted", "corrupt", "truncated"],
)
def test_bad_pdfs_are_refused_clearly(data, message):
    with pytest.raises(pdfs.PdfError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pdfs.pdf_preview(data, name="diagram.pdf")


# ---- over HTTP ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_preview_over_http_offers_the_first_pages_and_stores_nothing(media_root):
    client = logged_in(user_create())
    response = post(client, PREVIEW, coloured_pdf(4))
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["page_count"] == 4
    assert body["default_pages"] == [1, 2, 3]
    assert body["max_pages"] == 10
    assert body["pages"][0]["thumbnail"].startswith("data:image/webp;base64,")
    assert body["pages"][3]["send_size"] == "1700×2200"
    assert stored_files(media_root) == []
    assert not Attachment.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("data", "fields", "status", "text"),
    [
        (minimal_pdf(1, encrypt=True), {"pages": "1"}, 400, "is encrypted"),
        (b"%PDF-1.4\nnot really", {"pages": "1"}, 400, "could not be read as a PDF"),
        (minimal_pdf(2000), {"pages": "1"}, 400, "has 2,000 pages; the limit is 200"),
        (coloured_pdf(3), {"pages": "4"}, 400, "has no page 4 (it has 3)"),
        (coloured_pdf(3), {}, 400, "Pick at least one page"),
        (coloured_pdf(3), {"pages": ",".join(map(str, range(1, 12)))}, 400, "at most 10 pages"),
    ],
    ids=[
        "encrypted",
        "corrupt",
        "too-many-pages",
        "no-such-page",
        "none-picked",
        "too-many-picked",
    ],
)
def test_bad_pdfs_and_picks_are_refused_over_http_and_nothing_is_saved(
    data, fields, status, text, media_root
):
    client = logged_in(user_create())
    response = post(client, UPLOAD, data, **fields)
    assert response.status_code == status
    assert text in response.json()["message"]
    assert not Attachment.objects.exists()
    assert stored_files(media_root) == []
    if "pages" in fields and fields["pages"] == "1":
        preview = post(client, PREVIEW, data)
        assert preview.status_code == 400 and text in preview.json()["message"]


@pytest.mark.django_db
def test_an_oversized_pdf_is_refused_with_the_pdf_limit(settings):
    settings.PDF_MAX_UPLOAD_BYTES = 1000
    client = logged_in(user_create())
    response = post(client, UPLOAD, coloured_pdf(1), pages="1")
    assert response.status_code == 413
    assert response.json()["message"] == "The file is too large; the upload limit is 1 KB."


@pytest.mark.django_db
def test_a_slow_render_ends_with_a_clear_message(settings, monkeypatch):
    settings.PDF_RENDER_TIMEOUT = 0.2
    real = pdfs.pdf_render_pages

    def slow(*args, **kwargs):
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(pdfs, "pdf_render_pages", slow)
    client = logged_in(user_create())
    response = post(client, UPLOAD, coloured_pdf(1), pages="1")
    assert response.status_code == 400
    assert "took longer than 0.2 seconds to render" in response.json()["message"]


# ---- end to end --------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_pick_pages_1_and_3_and_both_reach_the_upstream_in_order(fake_upstream, media_root):
    user = await database_sync_to_async(user_create)()
    conversation = await database_sync_to_async(conversation_create)(owner=user)
    pdf = coloured_pdf(3)

    def attach() -> dict:
        client = logged_in(user)
        assert post(client, PREVIEW, pdf).status_code == 200
        response = post(client, UPLOAD, pdf, pages="1,3", conversation=str(conversation.pk))
        assert response.status_code == 201, response.content
        return response.json()

    attached = (await database_sync_to_async(attach)())["attachments"]
    assert [a["name"] for a in attached] == ["page 1 of diagram.pdf", "page 3 of diagram.pdf"]
    assert attached[0]["label"].startswith("page 1 of diagram.pdf: 1700×2200 → 1700×2200, ")
    # The PDF itself is stored nowhere: only the rendered pages and their thumbnails.
    for path in stored_files(media_root):
        assert not path.read_bytes().startswith(b"%PDF")
    assert await StoredImage.objects.acount() == 4

    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to(
        {"type": "send", "text": "What is on page 3?", "attachments": [a["id"] for a in attached]}
    )
    frames = await receive_until(ws, "reply.end")
    await ws.disconnect()
    assert frames[-1]["message"]["status"] == "complete"

    (request,) = fake_upstream.chat_requests()
    parts = request.json["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert parts[2]["text"] == "The image above is page 1 of diagram.pdf."
    assert parts[4]["text"] == "The image above is page 3 of diagram.pdf."
    for part, colour in ((parts[1], PAGE_COLOURS[0]), (parts[3], PAGE_COLOURS[2])):
        data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
        image = Image.open(io.BytesIO(data)).convert("RGB")
        assert image.size == (1700, 2200)
        assert image.getpixel((850, 1500)) == pytest.approx(colour, abs=4)  # Pillow's PDF is JPEG
