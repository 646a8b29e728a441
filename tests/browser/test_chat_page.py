"""The chat page in real Chromium: what a person sees and does, end to end."""

import re
from pathlib import Path

from playwright.sync_api import expect

from tests.browser.conftest import assert_page_clean, log_in, screenshot, watch_page
from tests.fake_upstream import error_response, stream_reply

CODE = 'def greet(name):\n    return f"Hello, {name}!"'
RICH_REPLY = [
    "Here is a comparison:\n\n",
    "| Planet | Moons |\n",
    "| --- | --- |\n",
    "| Earth | 1 |\n",
    "| Mars | 2 |\n\n",
    "> Data from NASA.\n\n",
    "```python\n",
    CODE + "\n",
    "```\n\n",
    "Euler: $e^{i\\pi} + 1 = 0$ and\n\n",
    "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$\n",
]


def send(page, text: str) -> None:
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")


def last_reply(page):
    return page.get_by_role("article", name="Assistant replied").last


def test_log_in(page, upstream):
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login/"))
    page.get_by_label("Username").fill("person-nobody")
    page.get_by_label("Password").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("correct username and password")
    name = log_in(page)
    expect(page.get_by_role("heading", name="New chat")).to_be_visible()
    expect(page.get_by_text(name)).to_be_visible()
    expect(page.get_by_role("combobox", name="Model")).to_have_value(re.compile(r"\d+"))
    screenshot(page, "01-logged-in")


def test_new_chat_streams_a_table_code_with_copy_and_math(page, person, upstream):
    upstream.enqueue(
        stream_reply(
            RICH_REPLY,
            delay=0.15,
            # Long enough to be seen: thinking shows live before the answer starts.
            reasoning=["The user wants ", "a table, code ", "and maths."] + ["."] * 20,
            usage={
                "prompt_tokens": 1200,
                "completion_tokens": 96,
                "total_tokens": 1296,
                "prompt_tokens_details": {"cached_tokens": 1024},
            },
        )
    )
    send(page, "Compare Earth and Mars, show code and maths")

    expect(page).to_have_url(re.compile(r"/c/\d+/$"))
    reply = last_reply(page)
    # While thinking streams, the block is open and says so.
    expect(reply.get_by_text("Thinking…")).to_be_visible()
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(reply.get_by_role("cell", name="Mars")).to_be_visible()
    expect(reply.get_by_role("button", name="Copy python code")).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="Reply finished.")).to_have_count(1)

    expect(reply.get_by_role("table")).to_be_visible()
    expect(reply.get_by_role("row")).to_have_count(3)
    expect(reply.get_by_role("blockquote")).to_have_text("Data from NASA.")
    # KaTeX was loaded on demand and typeset both formulas (MathML for screen readers).
    expect(reply.get_by_role("math")).to_have_count(2)
    expect(reply.locator(".katex-display")).to_have_count(1)
    # Thinking folded to its duration once the answer started.
    expect(reply.get_by_text(re.compile(r"^Thought for \d+ s$"))).to_be_visible()
    expect(reply.get_by_text(re.compile("^The user wants a table"))).to_be_hidden()
    # Discreet stats under the reply.
    expect(
        reply.get_by_text(re.compile(r"fake-model · 1200 in · 1024 cached · 96 out"))
    ).to_be_visible()
    expect(reply.get_by_text(re.compile(r"first token \d+\.\d\d s"))).to_be_visible()
    # The conversation got its title in the header and in the sidebar.
    title = "Compare Earth and Mars, show code and maths"
    expect(page.get_by_role("heading", name=title)).to_be_visible()
    expect(page.get_by_role("navigation").get_by_role("link", name=title)).to_be_visible()

    reply.get_by_role("button", name="Copy python code").click()
    expect(reply.get_by_role("button", name="Copy python code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == CODE + "\n"
    reply.get_by_role("button", name="Copy message").click()
    assert page.evaluate("navigator.clipboard.readText()") == "".join(RICH_REPLY)
    screenshot(page, "02-streamed-reply")


def test_stop_keeps_the_partial_reply_and_reload_shows_history(page, person, upstream):
    words = [f"Line {i} of a long answer.\n\n" for i in range(300)]
    upstream.enqueue(stream_reply(words, delay=0.1))
    send(page, "Count slowly")
    reply = last_reply(page)
    expect(reply).to_contain_text("Line 3 of")
    # The view follows new text until the person scrolls up; then "Jump to latest" brings it back.
    jump = page.get_by_role("button", name="Jump to latest")
    expect(jump).to_be_hidden()
    expect(reply).to_contain_text("Line 40 of")
    history = page.get_by_role("region", name="Chat history")
    history.hover()
    page.mouse.wheel(0, -3000)
    expect(jump).to_be_visible()
    jump.click()
    expect(jump).to_be_hidden()
    page.keyboard.press("Escape")  # Esc stops
    expect(reply.get_by_text(re.compile("stopped"))).to_be_visible()
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    partial = reply.locator(".body").inner_text().strip()
    assert partial.startswith("Line 0 of a long answer.") and "Line 299 of" not in partial
    expect(reply.get_by_role("button", name="Retry")).to_be_visible()

    page.reload()
    expect(page.get_by_role("article", name="You said")).to_have_text(re.compile("Count slowly"))
    reply = last_reply(page)
    expect(reply.locator(".body")).to_have_text(partial)
    expect(reply.get_by_text(re.compile("stopped"))).to_be_visible()
    screenshot(page, "03-stopped-then-reloaded")


def test_reload_shows_history_then_edit_and_regenerate(page, person, upstream):
    upstream.enqueue(
        stream_reply(["**Paris** is the capital."]),
        stream_reply(["About 2.1 million people."]),
    )
    send(page, "Capital of France?")
    expect(last_reply(page)).to_contain_text("Paris is the capital.")
    send(page, "How many people live there?")
    expect(last_reply(page)).to_contain_text("About 2.1 million")

    page.reload()
    questions = page.get_by_role("article", name="You said")
    expect(questions).to_have_count(2)
    expect(page.get_by_role("article", name="Assistant replied")).to_have_count(2)
    expect(
        page.get_by_role("article", name="Assistant replied").first.locator("strong")
    ).to_have_text("Paris")

    # Regenerate exists on the last reply only.
    expect(page.get_by_role("button", name="Regenerate")).to_have_count(1)
    upstream.enqueue(stream_reply(["Roughly 2.1 million."]))
    page.get_by_role("button", name="Regenerate").click()
    expect(last_reply(page)).to_contain_text("Roughly 2.1 million.")
    expect(page.get_by_role("article", name="Assistant replied")).to_have_count(2)

    # Edit the first question: the later turns go, after a warning about the prefix cache.
    questions.first.hover()
    questions.first.get_by_role("button", name="Edit message").click()
    page.get_by_role("textbox", name="Edit message text").fill("Capital of Italy?")
    page.get_by_role("button", name="Save and send").click()
    dialog = page.get_by_role("dialog", name="Edit and resend?")
    expect(dialog).to_contain_text("prefix cache is lost from this point")
    upstream.enqueue(stream_reply(["Rome."]))
    dialog.get_by_role("button", name="Replace and send").click()
    expect(last_reply(page)).to_contain_text("Rome.")
    expect(questions).to_have_count(1)
    expect(questions.first).to_have_text(re.compile("Capital of Italy?"))
    expect(page.get_by_text("million")).to_have_count(0)
    sent = upstream.chat_requests()[-1].json["messages"]
    assert sent == [{"role": "user", "content": "Capital of Italy?"}]
    screenshot(page, "04-history-edit-regenerate")


def test_model_output_cannot_run_script_or_embed_content(page, person, upstream):
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    hostile = (
        "Hi <img src=x onerror=\"window.__pwned='img';alert('img')\">\n\n"
        "<script>window.__pwned='script';alert('script')</script>\n\n"
        "[click me](javascript:window.__pwned='link';alert('link'))\n\n"
        "[data link](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)\n\n"
        "<iframe src=\"javascript:alert('frame')\"></iframe>\n\n"
        '<a href="https://example.com/docs" onclick="window.__pwned=\'click\'">the docs</a>'
    )
    upstream.enqueue(stream_reply([hostile[i : i + 40] for i in range(0, len(hostile), 40)]))
    send(page, "Say something nasty")
    reply = last_reply(page)
    expect(reply.get_by_text("the docs")).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="Reply finished.")).to_have_count(1)

    reply.get_by_text("click me").click()
    reply.get_by_text("data link").click()
    assert reply.get_by_text("click me").get_attribute("href") is None
    assert reply.get_by_text("data link").get_attribute("href") is None
    expect(reply.get_by_role("img")).to_have_count(0)
    assert reply.locator("iframe, script, img").count() == 0
    docs = reply.get_by_role("link", name="the docs")
    expect(docs).to_have_attribute("rel", "noopener noreferrer")
    expect(docs).to_have_attribute("target", "_blank")
    assert docs.get_attribute("onclick") is None
    page.wait_for_timeout(500)  # give any injected handler a chance to fire
    assert page.evaluate("window.__pwned") is None
    assert dialogs == []
    assert len(page.context.pages) == 1  # no link opened anything
    screenshot(page, "05-hostile-output-inert")
    # The sanitiser parses the hostile markup in an inert document, where the img's error event
    # fires: the Content-Security-Policy blocks its inline handler (the second wall, holding).
    # Expected here, for inline handlers only; any other violation still fails the test.
    handlers = [v for v in page.csp_violations if "event handler" in v or "script-src-attr" in v]
    assert handlers == page.csp_violations
    page.csp_violations.clear()


def test_rename_search_and_delete(page, person, upstream):
    upstream.enqueue(
        stream_reply(["Photosynthesis turns light into sugar."]),
        stream_reply(["Use a sourdough starter."]),
    )
    send(page, "Explain how plants eat")
    expect(last_reply(page)).to_contain_text("Photosynthesis")
    page.keyboard.press("Control+Shift+O")  # new chat
    expect(page.get_by_role("heading", name="New chat")).to_be_visible()
    send(page, "Bread tips")
    expect(last_reply(page)).to_contain_text("sourdough")

    page.get_by_role("button", name="Conversation actions").click()
    page.get_by_role("button", name="Rename").click()
    dialog = page.get_by_role("dialog", name="Rename conversation")
    dialog.get_by_role("textbox", name="Conversation name").fill("Baking notes")
    dialog.get_by_role("button", name="Save").click()
    expect(page.get_by_role("heading", name="Baking notes")).to_be_visible()
    sidebar = page.get_by_role("navigation", name="Conversations")
    expect(sidebar.get_by_role("link", name="Baking notes")).to_be_visible()

    page.keyboard.press("Control+k")
    search = page.get_by_role("searchbox", name="Search conversations")
    expect(search).to_be_focused()
    search.fill("photosynthesis")  # found by content, not title
    results = page.get_by_role("list", name="Search results")
    expect(results.get_by_role("link")).to_have_count(1)
    expect(results.get_by_role("link")).to_contain_text("Explain how plants eat")
    expect(results).to_contain_text("Photosynthesis turns light")
    search.fill("baking")  # found by the new title
    expect(results.get_by_role("link")).to_have_count(1)
    expect(results.get_by_role("link")).to_contain_text("Baking notes")
    search.fill("quantum")
    expect(results).to_contain_text("No conversations match.")
    screenshot(page, "06-search")
    search.fill("")
    expect(results).to_be_hidden()

    page.get_by_role("button", name="Conversation actions").click()
    page.get_by_role("button", name="Delete").click()
    confirm = page.get_by_role("dialog", name="Delete this conversation?")
    expect(confirm).to_contain_text("Baking notes")
    confirm.get_by_role("button", name="Delete").click()
    expect(page).to_have_url(re.compile(r":\d+/$"))
    expect(sidebar.get_by_role("link", name="Baking notes")).to_have_count(0)
    expect(sidebar.get_by_role("link", name="Explain how plants eat")).to_be_visible()
    screenshot(page, "07-after-delete")


def test_export_markdown_and_json(page, person, upstream):
    upstream.enqueue(stream_reply(["A **bold** answer."]))
    send(page, "Export me")
    expect(last_reply(page)).to_contain_text("A bold answer.")
    page.get_by_role("button", name="Conversation actions").click()
    with page.expect_download() as md:
        page.get_by_role("link", name="Export as Markdown").click()
    text = Path(md.value.path()).read_text(encoding="utf-8")
    assert md.value.suggested_filename == "export-me.md"
    assert "## You\n\nExport me" in text and "A **bold** answer." in text
    page.get_by_role("button", name="Conversation actions").click()
    with page.expect_download() as js:
        page.get_by_role("link", name="Export as JSON").click()
    assert '"content": "A **bold** answer."' in Path(js.value.path()).read_text(encoding="utf-8")


def test_settings_reach_the_provider_and_errors_offer_retry(page, person, upstream):
    page.get_by_role("button", name="Conversation settings").click()
    dialog = page.get_by_role("dialog", name="Conversation settings")
    dialog.get_by_role("textbox", name="System prompt").fill("Answer like a pirate.")
    dialog.get_by_role("spinbutton", name="Max output tokens").fill("300")
    dialog.get_by_role("checkbox", name="provider default").uncheck()
    dialog.get_by_role("slider", name=re.compile("Temperature")).fill("0.3")
    screenshot(page, "08-settings")
    dialog.get_by_role("button", name="Save settings").click()
    expect(dialog).to_be_hidden()

    upstream.enqueue(error_response(400, "model overloaded", "invalid_request_error"))
    send(page, "Ahoy?")
    reply = last_reply(page)
    expect(reply.get_by_role("alert")).to_be_visible()
    body = upstream.chat_requests()[-1].json
    assert body["messages"][0] == {"role": "system", "content": "Answer like a pirate."}
    assert body["max_completion_tokens"] == 300 and body["temperature"] == 0.3
    upstream.enqueue(stream_reply(["Arr, ahoy!"]))
    reply.get_by_role("button", name="Retry").click()
    expect(last_reply(page)).to_contain_text("Arr, ahoy!")
    expect(page.get_by_role("alert")).to_have_count(0)

    # Changing the system prompt once there is history warns about the cache.
    page.get_by_role("button", name="Conversation settings").click()
    dialog.get_by_role("textbox", name="System prompt").fill("Answer like a poet.")
    expect(dialog.get_by_text("cached prefix is lost")).to_be_visible()
    dialog.get_by_role("button", name="Save settings").click()
    confirm = page.get_by_role("dialog", name="Change the system prompt?")
    confirm.get_by_role("button", name="Cancel").click()
    page.reload()
    page.get_by_role("button", name="Conversation settings").click()
    expect(dialog.get_by_role("textbox", name="System prompt")).to_have_value(
        "Answer like a pirate."
    )


def test_shortcut_help_and_dark_mode(page, person, upstream, browser):
    page.get_by_role("button", name="Keyboard shortcuts").click()
    help_dialog = page.get_by_role("dialog", name="Keyboard shortcuts")
    expect(help_dialog).to_contain_text("Stop the reply")
    help_dialog.get_by_role("button", name="Close").click()

    page.emulate_media(color_scheme="dark")
    upstream.enqueue(stream_reply(["```js\nconsole.log('dark');\n```\n\nLooks *good*."]))
    send(page, "Show me the dark theme")
    expect(last_reply(page)).to_contain_text("Looks good")
    background = "getComputedStyle(document.body).backgroundColor"
    assert page.evaluate(background) == "rgb(20, 22, 27)"
    screenshot(page, "09-dark-mode")

    toggle = page.get_by_role("button", name=re.compile(r"^Theme: system"))
    toggle.click()  # system -> light, even though the system is dark
    assert page.evaluate(background) == "rgb(255, 255, 255)"
    page.reload()  # remembered
    assert page.evaluate(background) == "rgb(255, 255, 255)"
    page.get_by_role("button", name=re.compile(r"^Theme: light")).click()
    assert page.evaluate(background) == "rgb(20, 22, 27)"


def test_phone_width_375(browser, app_server, upstream):
    context = browser.new_context(
        base_url=app_server, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True
    )
    context.set_default_timeout(20_000)
    page = watch_page(context.new_page())
    try:
        log_in(page)
        upstream.enqueue(
            stream_reply(
                [
                    "A wide table stays inside the screen:\n\n",
                    "| Column one | Column two | Column three | Column four |\n",
                    "| --- | --- | --- | --- |\n",
                    "| a fairly long cell | another long cell | more text here | end |\n\n",
                    "```python\nprint('a long line of code that would overflow a phone screen')\n```\n",
                ]
            )
        )
        send(page, "How does this look on a phone?")
        expect(last_reply(page)).to_contain_text("A wide table")
        expect(page.get_by_role("status").filter(has_text="Reply finished.")).to_have_count(1)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        screenshot(page, "10-phone-375")
        page.get_by_role("button", name="Show conversations").click()
        sidebar = page.get_by_role("navigation", name="Conversations")
        expect(
            sidebar.get_by_role("link", name="How does this look on a phone?")
        ).to_be_in_viewport()
        screenshot(page, "11-phone-375-drawer")
        page.get_by_role("button", name="Close conversations").click()
        expect(sidebar.get_by_role("link", name="New chat")).not_to_be_in_viewport()
        assert_page_clean(page)
    finally:
        context.close()


def png_bytes(width: int, height: int, colour=(40, 90, 200)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def image_sizes_sent(upstream) -> list[tuple[int, int]]:
    import base64
    import io

    from PIL import Image

    sizes = []
    for message in upstream.chat_requests()[-1].json["messages"]:
        if isinstance(message.get("content"), list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                    with Image.open(io.BytesIO(data)) as image:
                        sizes.append(image.size)
    return sizes


def test_paste_a_screenshot_from_the_clipboard_and_ask(page, person, upstream):
    # A synthesised paste event carrying a PNG File, as the OS screenshot tool's paste gives.
    page.get_by_role("textbox", name="Message").focus()
    page.evaluate(
        """async (b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const file = new File([bytes], "screenshot.png", { type: "image/png" });
            const data = new DataTransfer();
            data.items.add(file);
            const event = new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true });
            document.getElementById("message").dispatchEvent(event);
        }""",
        __import__("base64").b64encode(png_bytes(800, 500)).decode(),
    )
    tray = page.get_by_role("list", name="Images to send")
    item = tray.get_by_role("listitem").filter(has_text="screenshot.png")
    expect(item).to_be_visible()
    # Nothing is uploaded before Send (the image may still be edited): the tray shows the size
    # the server will send and the bytes that will leave the browser.
    expect(
        tray.get_by_text(re.compile(r"800×500 → 800×500, ≈ \d+ KB · uploads when sent"))
    ).to_be_visible()
    # The thumbnail (decorative: the name is written beside it) really shows the image.
    thumbnail = item.locator("img")
    expect(thumbnail).to_be_visible()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle()
    )
    expect(tray.get_by_role("button", name="Remove screenshot.png")).to_be_visible()
    screenshot(page, "12-pasted-image")

    upstream.enqueue(stream_reply(["A ", "plain ", "blue ", "rectangle."]))
    send(page, "What is in this screenshot?")
    expect(last_reply(page)).to_contain_text("A plain blue rectangle.")
    question = page.get_by_role("article", name="You said")
    expect(question.get_by_role("img", name="screenshot.png")).to_be_visible()
    expect(question.get_by_text(re.compile(r"800×500 → 800×500, \d+ KB"))).to_be_visible()
    expect(tray).to_be_hidden()
    assert image_sizes_sent(upstream) == [(800, 500)]
    screenshot(page, "13-pasted-image-answered")


def test_attach_images_with_the_file_input_remove_one_and_ask(page, person, upstream, tmp_path):
    first, second = tmp_path / "diagram.png", tmp_path / "extra.png"
    first.write_bytes(png_bytes(640, 480, (200, 30, 30)))
    second.write_bytes(png_bytes(300, 200))
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Attach image").click()
    chooser.value.set_files([first, second])
    tray = page.get_by_role("list", name="Images to send")
    expect(tray.get_by_role("listitem")).to_have_count(2)
    expect(tray.get_by_text(re.compile(r"640×480 → 640×480, ≈ \d+ KB"))).to_be_visible()
    expect(tray.get_by_text(re.compile(r"300×200 → 300×200, ≈ \d+ KB"))).to_be_visible()
    tray.get_by_role("button", name="Remove extra.png").click()
    expect(tray.get_by_role("listitem")).to_have_count(1)

    upstream.enqueue(stream_reply(["A red square diagram."]))
    send(page, "Describe the diagram")
    expect(last_reply(page)).to_contain_text("A red square diagram.")
    question = page.get_by_role("article", name="You said")
    expect(question.get_by_role("img", name="diagram.png")).to_be_visible()
    expect(question.get_by_role("img", name="extra.png")).to_have_count(0)
    assert image_sizes_sent(upstream) == [(640, 480)]
    page.reload()
    expect(
        page.get_by_role("article", name="You said").get_by_role("img", name="diagram.png")
    ).to_be_visible()
    screenshot(page, "14-attached-image-answered")
