"""The page's own reconnect in real Chromium: a dropped socket mid-reply comes back by itself,
says "reconnecting…" while it is down, and the reply ends whole and shown once."""

import re

from playwright.sync_api import expect

from tests.fake_upstream import stream_reply

SOCKET_URL = re.compile(r".*/ws/conversations/\d+/$")


def test_a_dropped_socket_reconnects_and_the_reply_is_shown_whole_and_once(page, person, upstream):
    words = [f"tok{i:03d} " for i in range(120)]
    upstream.enqueue(stream_reply(words, delay=0.04))
    routes = []

    def through_to_the_server(route):
        route.connect_to_server()
        routes.append(route)

    # Every socket the page opens goes through here, so the test can drop one like a network would.
    page.route_web_socket(SOCKET_URL, through_to_the_server)
    # Record what the connection line says over time (it may show only briefly).
    page.evaluate(
        """() => {
            window.connectionLog = [];
            const el = document.getElementById("connection");
            new MutationObserver(() => window.connectionLog.push(el.hidden ? "" : el.textContent))
                .observe(el, { attributes: true, childList: true, characterData: true, subtree: true });
        }"""
    )
    box = page.get_by_role("textbox", name="Message")
    box.fill("Count for me")
    box.press("Enter")
    reply = page.get_by_role("article", name="Assistant replied").last
    expect(reply).to_contain_text("tok010")

    routes[0].close(code=4000, reason="network dropped")  # not a refusal: the page must retry
    expect(reply).to_contain_text("tok119", timeout=60_000)
    expect(reply.get_by_role("button", name="Retry")).to_have_count(0)
    expect(page.locator("#connection")).to_be_hidden()

    assert len(routes) >= 2, "the page did not open a new socket"
    assert any("reconnecting…" in line for line in page.evaluate("window.connectionLog"))
    text = reply.locator(".body").inner_text()
    assert re.sub(r"\s+", " ", text).strip() == "".join(words).strip()
    for word in ("tok000", "tok050", "tok119"):
        assert text.count(word) == 1
    expect(page.get_by_role("article", name="Assistant replied")).to_have_count(1)
