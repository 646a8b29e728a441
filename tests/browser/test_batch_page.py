"""The Batch page in real Chromium: drop a zip and PDFs, start a batch, watch the table fill,
pause and resume, cancel, export.

The server runs its batch worker inside (BATCH_WORKER=embedded, as `manage.py start` does).
"""

import io
import json
import re
import zipfile

from playwright.sync_api import expect

from tests.browser.conftest import log_in, screenshot
from tests.fake_upstream import stream_reply
from tests.image_factories import encode
from tests.image_factories import screenshot as image
from tests.media_factories import coloured_pdf, minimal_pdf


def _zip(count: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            archive.writestr(f"receipt-{i:02}.png", encode(image(80 + i, 60), "PNG"))
    return buffer.getvalue()


def test_start_a_batch_watch_it_fill_cancel_and_export(page, upstream, tmp_path):
    def responder(request):
        # Slow answers: the table fills over a few seconds, and Cancel lands mid-batch.
        return stream_reply([json.dumps({"vendor": "Corner Shop", "total": 12.5})], delay=0.8)

    upstream.responder = responder
    log_in(page)
    page.get_by_role("link", name="Batch").click()
    expect(page.get_by_role("heading", name="New batch")).to_be_visible()
    archive = tmp_path / "receipts.zip"
    archive.write_bytes(_zip(24))
    scan = tmp_path / "scan.pdf"
    scan.write_bytes(coloured_pdf(2))
    locked = tmp_path / "locked.pdf"
    locked.write_bytes(minimal_pdf(1, encrypt=True))
    page.locator("#files").set_input_files([str(archive), str(scan), str(locked)])
    # The PDF became one image per page; the encrypted one is named, the rest kept.
    expect(page.get_by_role("status").filter(has_text="26 images")).to_be_visible()
    expect(page.locator("#form-error")).to_contain_text("locked.pdf is encrypted")
    page.get_by_label("Question").fill("Who sold this and for how much?")
    page.get_by_role("button", name="Add a field").click()
    page.get_by_label("Field name").last.fill("vendor")
    page.get_by_role("button", name="Add a field").click()
    page.get_by_label("Field name").last.fill("total")
    page.get_by_label("Field type").last.select_option("number")
    estimate = page.locator("#estimate")
    expect(estimate).to_contain_text(re.compile(r"26 images: about [\d,]+ prompt"))
    expect(estimate).to_contain_text("No team budget limit")
    screenshot(page, "batch-01-estimate")
    page.get_by_role("button", name="Start batch").click()

    expect(page).to_have_url(re.compile(r"/batches/\d+/$"))
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(26)
    expect(rows.filter(has_text="page 2 of scan.pdf")).to_have_count(1)
    done = page.locator('#results tbody tr[data-status="done"]')
    expect(done.first).to_be_visible()
    expect(done.first).to_contain_text("Corner Shop")
    expect(done.first).to_contain_text("12.5")
    expect(page.locator("#batch-status")).to_have_text("Running")
    screenshot(page, "batch-02-filling")
    # Pause: the items in flight finish, no new one starts; Resume runs it again.
    page.get_by_role("button", name="Pause").click()
    expect(page.locator("#batch-status")).to_have_text("Paused")
    expect(page.locator('#results tbody tr[data-status="running"]')).to_have_count(0)
    paused_at = done.count()
    page.wait_for_timeout(2000)  # several answers' time: nothing moves while paused
    assert done.count() == paused_at
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#batch-status")).to_have_text("Running")
    expect(done).not_to_have_count(paused_at)
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#batch-status")).to_have_text("Cancelled")
    expect(page.locator('#results tbody tr[data-status="cancelled"]').first).to_be_visible()
    finished = done.count()
    assert 0 < finished < 26
    screenshot(page, "batch-03-cancelled")

    with page.expect_download() as download_info:
        page.get_by_role("link", name="CSV", exact=True).click()
    text = download_info.value.path().read_text(encoding="utf-8")
    lines = text.strip().splitlines()
    assert lines[0].startswith("item,file,status,vendor,total,")
    assert len(lines) == 27
    assert sum(",page 2 of scan.pdf," in line for line in lines) == 1
    assert sum(",done,Corner Shop,12.5," in line for line in lines) >= finished
