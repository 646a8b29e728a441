"""The screenshot workbench in real Chromium: mark up and redact before asking.

The proof that a redaction happens before upload is read from the outside: every request body
the page sends (HTTP and websocket frames), every file the server stored, and the image the
fake upstream received.
"""

import asyncio
import base64
import io
import random
import re
import threading
from urllib.parse import urlsplit

import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.browser.conftest import (
    SERVER_ENV,
    TIMEOUT_MS,
    _manage,
    assert_page_clean,
    log_in,
    screenshot,
    watch_page,
)
from tests.browser.test_chat_page import last_reply, send
from tests.fake_upstream import stream_reply

WIDTH, HEIGHT = 800, 500
BUTTON = (60, 60, 240, 110)  # a blue "button" the user circles
SECRET = (420, 300, 700, 340)  # a customer's e-mail address: noisy, unmistakable pixels
RECT = (40, 40, 260, 130)  # where the user drags the rectangle
REDACT = (400, 285, 720, 355)  # where the user drags the redaction (covers SECRET)
MARGIN = 6  # the rectangle's stroke and a pixel of pointer rounding


class RecordingProxy:
    """A TCP proxy in front of the app that keeps every byte the browser sends: the proof of
    what left the browser is read off the wire, not from the page's own account of it."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.sent = bytearray()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(5)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader, writer) -> None:
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            writer.close()  # shutting down; asyncio's stream callback would log a cancellation

    async def _relay(self, reader, writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)

        async def pump(source, sink, record: bool) -> None:
            try:
                while data := await source.read(65536):
                    if record:
                        self.sent.extend(data)
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        await asyncio.gather(
            pump(reader, upstream_writer, True), pump(upstream_reader, writer, False)
        )

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _shutdown(self) -> None:
        self._server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


@pytest.fixture
def wire(browser, app_server):
    """A page logged in through the recording proxy, and the proxy."""
    proxy = RecordingProxy(app_server)
    context = browser.new_context(base_url=proxy.url, viewport={"width": 1280, "height": 820})
    context.set_default_timeout(TIMEOUT_MS)
    page = watch_page(context.new_page())
    log_in(page)
    yield page, proxy
    context.close()
    proxy.close()
    assert_page_clean(page)


def original_screenshot() -> bytes:
    image = Image.new("RGB", (WIDTH, HEIGHT), (250, 250, 252))
    image.paste((40, 90, 200), BUTTON)
    image.paste((230, 230, 235), (0, 0, WIDTH, 30))
    rng = random.Random(7)
    x0, y0, x1, y1 = SECRET
    for y in range(y0, y1):
        for x in range(x0, x1):
            image.putpixel((x, y), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def paste(page, data: bytes, name: str) -> None:
    page.get_by_role("textbox", name="Message").focus()
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const file = new File([bytes], name, { type: "image/png" });
            const data = new DataTransfer();
            data.items.add(file);
            const event = new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true });
            document.getElementById("message").dispatchEvent(event);
        }""",
        [base64.b64encode(data).decode(), name],
    )


def drag(page, canvas, start: tuple[int, int], end: tuple[int, int]) -> None:
    """Drag in image pixels (the canvas is shown scaled to fit the dialog)."""
    box = canvas.bounding_box()

    def at(x, y):
        return box["x"] + x * box["width"] / WIDTH, box["y"] + y * box["height"] / HEIGHT

    page.mouse.move(*at(*start))
    page.mouse.down()
    page.mouse.move(*at((start[0] + end[0]) / 2, (start[1] + end[1]) / 2), steps=3)
    page.mouse.move(*at(*end), steps=3)
    page.mouse.up()


def click_at(page, canvas, x: int, y: int) -> None:
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + x * box["width"] / WIDTH, box["y"] + y * box["height"] / HEIGHT)


def canvas_pixel(page, selector_js: str, x: int, y: int) -> list[int]:
    return page.evaluate(
        f"""() => {{
            const source = {selector_js};
            const canvas = document.createElement("canvas");
            canvas.width = {WIDTH}; canvas.height = {HEIGHT};
            const ctx = canvas.getContext("2d");
            ctx.drawImage(source, 0, 0, {WIDTH}, {HEIGHT});
            return Array.from(ctx.getImageData({x}, {y}, 1, 1).data);
        }}"""
    )


def inside(x: int, y: int, box: tuple[int, int, int, int], margin: int = 0) -> bool:
    x0, y0, x1, y1 = box
    return x0 - margin <= x < x1 + margin and y0 - margin <= y < y1 + margin


def png_in(body: bytes) -> Image.Image | None:
    start = body.find(b"\x89PNG\r\n\x1a\n")
    return None if start < 0 else Image.open(io.BytesIO(body[start:])).convert("RGB")


def test_mark_up_and_redact_before_upload(wire, upstream, media_root):
    page, proxy = wire
    original = original_screenshot()
    # The app serves the whole browser session: only files stored by this test are its own.
    before = {path for path in media_root.rglob("*") if path.is_file()}
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: frames.append(payload)))

    paste(page, original, "customer-ticket.png")
    tray = page.get_by_role("list", name="Images to send")
    item = tray.get_by_role("listitem").filter(has_text="customer-ticket.png")
    # Before any upload the tray already says what will be sent, and that nothing has left yet.
    expect(
        item.get_by_text(re.compile(r"800×500 → 800×500, ≈ \d+ KB · uploads when sent"))
    ).to_be_visible()

    item.get_by_role("button", name="Edit customer-ticket.png").click()
    editor = page.get_by_role("dialog", name="Edit customer-ticket.png")
    expect(editor).to_be_visible()
    canvas = editor.get_by_role("img", name="Image being edited")
    # Rectangle (the default tool) around the button.
    drag(page, canvas, RECT[:2], RECT[2:])
    # A mistaken redaction, undone with the keyboard, redone, undone again.
    page.keyboard.press("x")
    expect(editor.get_by_role("button", name="Redact")).to_have_attribute("aria-pressed", "true")
    drag(page, canvas, (100, 400), (200, 450))
    page.keyboard.press("Control+z")
    page.keyboard.press("Control+Shift+z")
    page.keyboard.press("Control+z")
    # The real redaction over the e-mail address, and a numbered marker on the button.
    drag(page, canvas, REDACT[:2], REDACT[2:])
    page.keyboard.press("m")
    click_at(page, canvas, 300, 85)
    screenshot(page, "20-editor-redact")
    editor.get_by_role("button", name="Done").click()
    expect(editor).to_be_hidden()

    # The thumbnail is the edited version; nothing was uploaded yet.
    expect(page.locator(".attachment[data-edited=true]")).to_have_count(1)
    thumb = "document.querySelector('.attachment-thumb img')"
    page.wait_for_function(f"() => {thumb}.complete && {thumb}.naturalWidth === {WIDTH}")
    assert canvas_pixel(page, thumb, 560, 320)[:3] == [0, 0, 0]
    assert b"customer-ticket" not in proxy.sent
    expect(item.get_by_text(re.compile(r"edited · 800×500 → 800×500"))).to_be_visible()

    # "Edit" again reopens with the layers intact.
    item.get_by_role("button", name="Edit customer-ticket.png").click()
    expect(editor).to_be_visible()
    live = "document.querySelector('.editor-canvas')"
    assert canvas_pixel(page, live, 560, 320)[:3] == [0, 0, 0]
    assert canvas_pixel(page, live, 150, 420)[:3] == [250, 250, 252]  # the undone box is gone
    editor.get_by_role("button", name="Done").click()
    expect(editor).to_be_hidden()

    upstream.enqueue(stream_reply(["Marker 1 points at the blue button."]))
    send(page, "What does marker 1 point at?")
    expect(last_reply(page)).to_contain_text("Marker 1 points at the blue button.")

    # 1. The upstream got one image: the redaction uniform, every other pixel as it was.
    content = upstream.chat_requests()[-1].json["messages"][-1]["content"]
    images = [part for part in content if part["type"] == "image_url"]
    assert len(images) == 1
    url = images[0]["image_url"]["url"]
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    source = Image.open(io.BytesIO(original)).convert("RGB")
    assert sent.size == (WIDTH, HEIGHT)
    x0, y0, x1, y1 = REDACT
    redacted = sent.crop((x0 + 2, y0 + 2, x1 - 2, y1 - 2))
    assert redacted.getextrema() == ((0, 0), (0, 0), (0, 0))
    annotated = (RECT, REDACT, (300 - 20, 85 - 20, 300 + 20, 85 + 20))
    different = [
        (x, y)
        for y in range(0, HEIGHT, 2)
        for x in range(0, WIDTH, 2)
        if not any(inside(x, y, box, MARGIN) for box in annotated)
        and sent.getpixel((x, y)) != source.getpixel((x, y))
    ]
    assert different == []
    # The mark-up is described to the model after the image.
    texts = [part["text"] for part in content if part["type"] == "text"]
    assert texts[0] == "What does marker 1 point at?"
    assert "a numbered marker 1" in texts[-1] and "red rectangle" in texts[-1]
    assert "black box hides redacted content" in texts[-1]

    # 2. The original bytes are in nothing the browser sent (every byte on the wire to the
    # server; websocket frames before masking): exactly one image was uploaded, the edited PNG,
    # and its secret pixels are black.
    sent_bytes = bytes(proxy.sent)
    assert original not in sent_bytes
    assert original[8:200] not in sent_bytes  # not even its header and first chunk
    assert all("image" not in frame for frame in frames if isinstance(frame, str))
    assert sent_bytes.count(b'name="file"') == 1
    uploaded = png_in(sent_bytes[sent_bytes.index(b'name="file"') :])
    assert uploaded is not None and uploaded.size == (WIDTH, HEIGHT)
    assert uploaded.crop(SECRET).getextrema() == ((0, 0), (0, 0), (0, 0))

    # 3. No stored file is (or contains) the original, and every stored full-size image has
    # the secret region blacked out.
    stored = [path for path in media_root.rglob("*") if path.is_file()]
    assert original not in b"".join(path.read_bytes() for path in stored)
    mine = [path for path in stored if path not in before]
    assert len(mine) == 2  # the edited image and its thumbnail
    for path in mine:
        data = path.read_bytes()
        assert original not in data
        with Image.open(path) as image:
            if image.size == (WIDTH, HEIGHT):
                region = image.convert("RGB").crop(SECRET)
                assert region.getextrema() == ((0, 0), (0, 0), (0, 0)), path
    screenshot(page, "21-redacted-and-answered")


def test_editor_in_dark_mode_on_a_touch_screen(browser, app_server, upstream):
    context = browser.new_context(
        base_url=app_server,
        viewport={"width": 390, "height": 844},
        color_scheme="dark",
        has_touch=True,
        is_mobile=True,
    )
    page = watch_page(context.new_page())
    try:
        log_in(page)
        paste(page, original_screenshot(), "phone.png")
        page.get_by_role("button", name="Edit phone.png").click()
        editor = page.get_by_role("dialog", name="Edit phone.png")
        expect(editor).to_be_visible()
        canvas = editor.get_by_role("img", name="Image being edited")
        editor.get_by_role("button", name="Redact").tap()
        box = canvas.bounding_box()
        # A finger drag: pointer events of type "touch" on the canvas (touch-action: none).
        page.evaluate(
            """([x0, y0, x1, y1]) => {
                const canvas = document.querySelector(".editor-canvas");
                const fire = (type, x, y) => canvas.dispatchEvent(new PointerEvent(type, {
                    pointerId: 7, pointerType: "touch", isPrimary: true, clientX: x, clientY: y,
                    bubbles: true, cancelable: true, button: 0 }));
                fire("pointerdown", x0, y0);
                fire("pointermove", (x0 + x1) / 2, (y0 + y1) / 2);
                fire("pointermove", x1, y1);
                fire("pointerup", x1, y1);
            }""",
            [
                box["x"] + REDACT[0] * box["width"] / WIDTH,
                box["y"] + REDACT[1] * box["height"] / HEIGHT,
                box["x"] + REDACT[2] * box["width"] / WIDTH,
                box["y"] + REDACT[3] * box["height"] / HEIGHT,
            ],
        )
        live = "document.querySelector('.editor-canvas')"
        assert canvas_pixel(page, live, 560, 320)[:3] == [0, 0, 0]
        background = page.evaluate(
            "getComputedStyle(document.querySelector('.editor-dialog')).backgroundColor"
        )
        assert background == "rgb(20, 22, 27)"  # the dark theme's --bg
        screenshot(page, "22-editor-dark-touch")
        editor.get_by_role("button", name="Done").tap()
        expect(page.get_by_text(re.compile(r"edited · 800×500"))).to_be_visible()
        # Only the policy here: the test's synthetic touch events have no active pointer, so
        # the editor's setPointerCapture throws for them (a real finger has one).
        assert_page_clean(page, js_errors=False)
    finally:
        context.close()


def test_crop_arrow_highlight_and_label_reach_the_model(page, person, upstream):
    paste(page, original_screenshot(), "dropped.png")
    page.get_by_role("button", name="Edit dropped.png").click()
    editor = page.get_by_role("dialog", name="Edit dropped.png")
    canvas = editor.get_by_role("img", name="Image being edited")
    editor.get_by_role("button", name="Highlighter").click()
    drag(page, canvas, (60, 60), (240, 110))
    editor.get_by_role("button", name="Arrow").click()
    drag(page, canvas, (380, 200), (250, 100))
    page.keyboard.press("t")
    editor.get_by_role("textbox", name="Label text").fill("Login")
    click_at(page, canvas, 300, 160)
    page.keyboard.press("c")
    drag(page, canvas, (20, 40), (420, 240))
    editor.get_by_role("button", name="Done").click()
    expect(page.get_by_text(re.compile(r"edited · 400×200 → 400×200"))).to_be_visible()

    upstream.enqueue(stream_reply(["The arrow points at the Login button."]))
    send(page, "What does the arrow point at?")
    expect(last_reply(page)).to_contain_text("The arrow points at the Login button.")
    content = upstream.chat_requests()[-1].json["messages"][-1]["content"]
    (image,) = [part for part in content if part["type"] == "image_url"]
    sent = Image.open(io.BytesIO(base64.b64decode(image["image_url"]["url"].split(",", 1)[1])))
    assert sent.size == (400, 200)  # the crop, at its own pixels
    # The highlighter tints the blue button (40, 90, 200) towards yellow, without covering it.
    r, g, b = sent.convert("RGB").getpixel((150 - 20, 85 - 40))
    assert 100 < r < 150 and 100 < b < 150
    note = content[-1]["text"]
    assert "a red arrow" in note and "a highlighted region" in note
    assert 'text label "Login"' in note and "redacted" not in note


def test_drop_a_pdf_pick_pages_1_and_3_and_ask(page, person, upstream, tmp_path):
    from tests.media_factories import PAGE_COLOURS, coloured_pdf

    pdf = tmp_path / "diagram.pdf"
    pdf.write_bytes(coloured_pdf(3))
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Attach image").click()
    chooser.value.set_files(pdf)
    pages = page.get_by_role("group", name="Pages of diagram.pdf")
    # The first pages are picked by default; every page shows a thumbnail.
    for number in (1, 2, 3):
        expect(pages.get_by_role("button", name=f"Page {number}")).to_have_attribute(
            "aria-pressed", "true"
        )
    expect(pages.locator("img")).to_have_count(3)
    pages.get_by_role("button", name="Page 2").click()
    expect(pages.get_by_role("button", name="Page 2")).to_have_attribute("aria-pressed", "false")
    tray = page.get_by_role("list", name="Images to send")
    expect(
        tray.get_by_text(re.compile(r"2 of 3 pages \(1, 3\) · each sent as an image: 1700×2200"))
    ).to_be_visible()
    screenshot(page, "23-pdf-pages")

    upstream.enqueue(stream_reply(["Page 3 is blue."]))
    send(page, "What colour is page 3?")
    expect(last_reply(page)).to_contain_text("Page 3 is blue.")
    question = page.get_by_role("article", name="You said")
    expect(question.get_by_role("img", name="page 1 of diagram.pdf")).to_be_visible()
    expect(question.get_by_role("img", name="page 3 of diagram.pdf")).to_be_visible()
    expect(
        question.get_by_text(re.compile(r"page 3 of diagram.pdf: 1700×2200 → 1700×2200"))
    ).to_be_visible()
    content = upstream.chat_requests()[-1].json["messages"][-1]["content"]
    images = [part for part in content if part["type"] == "image_url"]
    assert len(images) == 2
    for part, colour in zip(images, (PAGE_COLOURS[0], PAGE_COLOURS[2]), strict=True):
        data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
        image = Image.open(io.BytesIO(data)).convert("RGB")
        assert image.size == (1700, 2200)
        assert image.getpixel((850, 1500)) == pytest.approx(colour, abs=4)
    assert [p["text"] for p in content if p["type"] == "text"][1:] == [
        "The image above is page 1 of diagram.pdf.",
        "The image above is page 3 of diagram.pdf.",
    ]


def test_an_encrypted_pdf_is_refused_and_blocks_the_send_until_removed(
    page, person, upstream, tmp_path
):
    from tests.media_factories import minimal_pdf

    pdf = tmp_path / "locked.pdf"
    pdf.write_bytes(minimal_pdf(2, encrypt=True))
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Attach image").click()
    chooser.value.set_files(pdf)
    tray = page.get_by_role("list", name="Images to send")
    expect(tray.get_by_role("alert")).to_have_text(re.compile(r"locked.pdf is encrypted"))
    send(page, "Summarise it")
    expect(page.get_by_role("alert").filter(has_text="Remove it to send")).to_be_visible()
    assert upstream.chat_requests() == []
    tray.get_by_role("button", name="Remove locked.pdf").click()
    expect(tray).to_be_hidden()


def test_drop_a_screen_recording_and_ask_a_model_without_video(page, person, upstream, tmp_path):
    from tests.media_factories import screen_recording

    clip = tmp_path / "bug.mp4"
    clip.write_bytes(screen_recording(5))
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Attach image").click()
    chooser.value.set_files(clip)
    tray = page.get_by_role("list", name="Images to send")
    # The composer says what will happen before sending: this model takes no video.
    expect(
        tray.get_by_text(
            re.compile(
                r"Sent as 5.0 s → 5 key frames with timestamps, \d+ KB \(fake-model takes no video\)"
            )
        )
    ).to_be_visible()
    screenshot(page, "24-recording-as-frames")

    upstream.enqueue(stream_reply(["The screen turns blue at 0:02."]))
    send(page, "What went wrong in this recording?")
    expect(last_reply(page)).to_contain_text("The screen turns blue at 0:02.")
    expect(
        page.get_by_role("article", name="You said").get_by_text("screen recording, 5.0 s")
    ).to_be_visible()
    content = upstream.chat_requests()[-1].json["messages"][-1]["content"]
    assert [p["type"] for p in content].count("image_url") == 5
    assert "video_url" not in [p["type"] for p in content]
    assert [p["text"] for p in content if p["type"] == "text"][1:3] == [
        "Frame at 0:00.0:",
        "Frame at 0:01.0:",
    ]


# A model that takes video, added by staff to the OpenAI-compatible provider (last in the picker,
# so the other scenarios' default stays `fake-model`).
ADD_VIDEO_MODEL = """
from chatapp.models import ModelConfig, Provider
provider = Provider.objects.get(name="OpenAI-compatible")
ModelConfig.objects.update_or_create(
    provider=provider,
    model_id="fake-video-model",
    defaults={"display_name": "Fake video model", "vision": True, "video": True,
              "sort_order": 60_000, "staff_overrides": ["sort_order", "video", "display_name"]},
)
"""


def test_a_recording_to_a_model_that_takes_video_is_one_video_part(
    page, person, upstream, tmp_path
):
    from tests.media_factories import screen_recording

    _manage(SERVER_ENV, "shell", "-c", ADD_VIDEO_MODEL)
    page.reload()
    clip = tmp_path / "bug.webm"
    clip.write_bytes(screen_recording(3, container="webm"))
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Attach image").click()
    chooser.value.set_files(clip)
    tray = page.get_by_role("list", name="Images to send")
    expect(tray.get_by_text(re.compile(r"Sent as 3.0 s → 3 key frames"))).to_be_visible()
    # Switching to a model that takes video changes what the composer says will happen.
    page.get_by_role("combobox", name="Model").select_option(label="Fake video model")
    expect(
        tray.get_by_text(re.compile(r"Sent as video: 3.0 s → video 640×400, \d+ KB"))
    ).to_be_visible()
    screenshot(page, "25-recording-as-video")

    upstream.enqueue(stream_reply(["The dialog closes too early."]))
    send(page, "What went wrong?")
    expect(last_reply(page)).to_contain_text("The dialog closes too early.")
    request = upstream.chat_requests()[-1]
    assert request.json["model"] == "fake-video-model"
    content = request.json["messages"][-1]["content"]
    assert [p["type"] for p in content] == ["text", "video_url", "text"]
    assert content[1]["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert request.headers["x-session-affinity"].startswith("ses_")
