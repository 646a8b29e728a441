"""Sharing in real Chromium: share from the ⋯ menu, a team mate opens the shared view, follows a
reply live, continues as their own copy, and sees the view close when the share is revoked."""

import re

from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD, SERVER_ENV, _manage, log_in, screenshot
from tests.fake_upstream import stream_reply

MAKE_TEAM = f"""
from django.contrib.auth import get_user_model
from chatapp import teams
from chatapp.models import Team
U = get_user_model()
owner = U.objects.create_user(username="share-owner", password={PASSWORD!r})
mate = U.objects.create_user(username="share-mate", password={PASSWORD!r})
team = Team.objects.create(name="Dashboard team")
teams.membership_set(user=owner, team=team)
teams.membership_set(user=mate, team=team)
"""


def send(page, text: str) -> None:
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")


def test_share_from_the_menu_and_a_team_mate_follows_it_live(browser, page, upstream, app_server):
    _manage(SERVER_ENV, "shell", "-c", MAKE_TEAM)
    log_in(page, "share-owner")
    upstream.enqueue(
        stream_reply(["The chart ", "dips in May."], reasoning=["Looking at ", "the chart."])
    )
    send(page, "What does the dashboard show?")
    expect(page).to_have_url(re.compile(r"/c/\d+/$"))
    expect(page.get_by_role("status").filter(has_text="Reply finished.")).to_have_count(1)

    # Share with the whole team from the ⋯ menu.
    page.get_by_role("button", name="Conversation actions").click()
    page.get_by_role("button", name="Share…").click()
    dialog = page.get_by_role("dialog", name="Share this conversation")
    expect(dialog.get_by_text("Everyone in Dashboard team")).to_be_visible()
    expect(dialog.get_by_text("Not shared with anyone.")).to_be_visible()
    dialog.get_by_role("button", name="Share", exact=True).click()
    shared_with = dialog.get_by_role("list", name="Shared with")
    expect(shared_with.get_by_text("everyone in Dashboard team")).to_be_visible()
    link = shared_with.get_by_role("link", name="link")
    share_url = link.get_attribute("href")
    assert re.fullmatch(r"/shared/\d+/", share_url)
    screenshot(page, "sharing-01-dialog")
    dialog.get_by_role("button", name="Close").click()

    # The team mate, in a browser of their own, opens the link.
    mate_context = browser.new_context(base_url=app_server, viewport={"width": 1280, "height": 820})
    mate = mate_context.new_page()
    mate_errors: list[str] = []
    mate.on("pageerror", lambda exc: mate_errors.append(str(exc)))
    log_in(mate, "share-mate")
    mate.goto(share_url)
    expect(mate.get_by_role("heading", name="What does the dashboard show?")).to_be_visible()
    expect(mate.get_by_text(re.compile(r"Shared by share-owner on \d+ \w+ \d{4}"))).to_be_visible()
    reply = mate.get_by_role("article", name="Assistant replied").last
    expect(reply).to_contain_text("The chart dips in May.")
    expect(reply.get_by_text("Thoughts")).to_be_visible()
    expect(reply.get_by_text("fake-model", exact=False)).to_be_visible()  # per-reply stats
    expect(mate.get_by_role("textbox", name="Message")).to_have_count(0)  # read-only

    # The owner writes again; the mate sees the reply grow while it streams.
    tokens = [f"step{i} " for i in range(40)]
    upstream.enqueue(stream_reply(tokens, delay=0.1))
    send(page, "Walk me through it")
    live = mate.get_by_role("article", name="Assistant replied").last
    expect(live).to_contain_text("step3")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()  # still streaming
    assert "step39" not in live.inner_text()
    screenshot(mate, "sharing-02-live")
    expect(live).to_contain_text("step39")
    expect(mate.get_by_role("status").filter(has_text="Reply finished.")).to_have_count(1)

    # Continue as my copy, from the first reply, in another tab of the mate's.
    copy_tab = mate_context.new_page()
    copy_tab.on("pageerror", lambda exc: mate_errors.append(str(exc)))
    copy_tab.goto(share_url)
    first_reply = copy_tab.get_by_role("article", name="Assistant replied").first
    first_reply.get_by_role("button", name="Continue from here").click()
    expect(copy_tab).to_have_url(re.compile(r"/c/\d+/$"))
    expect(copy_tab.get_by_role("heading", name=re.compile(r"\(copy\)$"))).to_be_visible()
    expect(copy_tab.get_by_role("article", name="Assistant replied")).to_have_count(1)
    expect(copy_tab.get_by_text("step3")).to_have_count(0)
    upstream.enqueue(stream_reply(["Yours now."]))
    send(copy_tab, "Continue on my own")
    expect(copy_tab.get_by_role("article", name="Assistant replied").last).to_contain_text(
        "Yours now."
    )
    sent = upstream.chat_requests()[-1].json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]

    # The owner revokes: the mate's open view says so at once, and the link is gone.
    page.get_by_role("button", name="Conversation actions").click()
    page.get_by_role("button", name="Share…").click()
    dialog.get_by_role("button", name=re.compile("Revoke the share")).click()
    expect(dialog.get_by_text("Not shared with anyone.")).to_be_visible()
    expect(mate.get_by_role("alert").filter(has_text="no longer shared with you")).to_be_visible()
    expect(mate.get_by_text("The chart dips in May.")).to_have_count(0)  # the view closed
    screenshot(mate, "sharing-03-revoked")
    response = mate.goto(share_url)
    assert response.status == 404
    assert not mate_errors, mate_errors
    mate_context.close()
