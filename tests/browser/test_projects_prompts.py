"""Projects and the prompt library in real Chromium: "/" in the composer inserts a team prompt
and selects its first variable; a conversation moves into a project (menu and drag) and the
sidebar groups it there."""

import re

from playwright.sync_api import expect

from tests.browser.conftest import SERVER_ENV, _manage, log_in, screenshot
from tests.image_factories import encode
from tests.image_factories import screenshot as shot

TEAM_PROMPT = "Review {{screen}} for {{audience}}; list the problems first."


def _team_with_prompts(username: str) -> None:
    _manage(
        SERVER_ENV,
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model\n"
        "from chatapp import teams\n"
        "from chatapp.models import SavedPrompt, Team\n"
        f"user = get_user_model().objects.get(username={username!r})\n"
        f"team = Team.objects.create(name='Design {username}')\n"
        "teams.membership_set(user=user, team=team)\n"
        f"SavedPrompt.objects.create(team=team, title='Screen review', text={TEAM_PROMPT!r})\n"
        "SavedPrompt.objects.create(owner=user, title='Bug report', text='Steps: {{steps}}')\n",
    )


def _selection(page) -> str:
    return page.evaluate(
        "() => { const el = document.activeElement;"
        " return el.id === 'message' ? el.value.slice(el.selectionStart, el.selectionEnd) : null; }"
    )


def test_slash_inserts_a_team_prompt_and_selects_its_first_variable(page, upstream):
    username = log_in(page)
    _team_with_prompts(username)
    page.reload()
    box = page.get_by_role("textbox", name="Message")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    box.click()
    page.keyboard.type("/")
    options = page.get_by_role("listbox", name="Saved prompts").get_by_role("option")
    expect(options).to_have_count(2)
    expect(options.first).to_contain_text("Bug report")  # personal first
    expect(options.nth(1)).to_contain_text("Team Design")
    # Search narrows it; Esc closes the list and keeps what was typed.
    page.keyboard.type("scr")
    expect(options).to_have_count(1)
    page.keyboard.press("Escape")
    expect(page.get_by_role("listbox", name="Saved prompts")).to_be_hidden()
    expect(box).to_have_value("/scr")
    # Arrows and Enter: the second prompt goes in, nothing is sent.
    box.fill("")
    page.keyboard.type("/")
    expect(options).to_have_count(2)
    page.keyboard.press("ArrowDown")
    expect(options.nth(1)).to_have_attribute("aria-selected", "true")
    page.keyboard.press("Enter")
    expect(box).to_have_value(TEAM_PROMPT)
    expect(box).to_be_focused()
    assert _selection(page) == "{{screen}}"
    screenshot(page, "projects-01-prompt-inserted")
    page.keyboard.type("the billing dashboard")
    page.keyboard.press("Tab")
    assert _selection(page) == "{{audience}}"
    page.keyboard.type("finance")
    expect(box).to_have_value("Review the billing dashboard for finance; list the problems first.")
    expect(page.get_by_role("article", name="You said")).to_have_count(0)


def _sidebar_group(page, name: str):
    return page.get_by_role("region", name=f"Project {name}")


def test_a_conversation_moves_into_a_project_and_the_sidebar_groups_it(page, upstream):
    log_in(page)
    page.goto("/projects/")
    page.get_by_label("Name").fill("Dashboard reviews")
    page.get_by_label(re.compile("^Instructions")).fill("You review dashboard screenshots.")
    page.get_by_role("button", name="Create project").click()
    expect(page.get_by_role("heading", name="Dashboard reviews")).to_be_visible()
    # A reference screenshot pinned through the upload pipeline.
    page.get_by_label("Pin images or PDF pages").set_input_files(
        {"name": "reference.png", "mimeType": "image/png", "buffer": encode(shot(400, 300), "PNG")}
    )
    expect(page.get_by_role("img", name="reference.png")).to_be_visible()
    screenshot(page, "projects-02-project-page")

    # A conversation outside any project, moved in with the ⋯ menu (keyboard and touch path).
    page.goto("/")
    box = page.get_by_role("textbox", name="Message")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    box.fill("Menu chat")
    box.press("Enter")
    expect(page.get_by_role("article", name="Assistant replied")).to_have_attribute(
        "data-status", "complete"
    )
    group = _sidebar_group(page, "Dashboard reviews")
    expect(group.get_by_role("link", name="Menu chat")).to_have_count(0)
    page.get_by_role("button", name="Conversation actions").click()
    page.get_by_role("button", name="Move to project…").click()
    page.get_by_label("Project", exact=True).select_option(label="Dashboard reviews")
    page.get_by_role("button", name="Move", exact=True).click()
    expect(group.get_by_role("link", name="Menu chat")).to_be_visible()
    expect(page.get_by_role("link", name="Dashboard reviews", exact=True).first).to_be_visible()
    expect(page.locator("#project-badge")).to_have_text("Dashboard reviews")
    screenshot(page, "projects-03-moved-by-menu")
    page.reload()
    expect(
        _sidebar_group(page, "Dashboard reviews").get_by_role("link", name="Menu chat")
    ).to_be_visible()
    # The next reply carries the project's instructions first.
    box = page.get_by_role("textbox", name="Message")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    upstream.reset()
    box.fill("And again")
    box.press("Enter")
    expect(page.get_by_role("article", name="Assistant replied")).to_have_count(2)
    expect(page.get_by_role("article", name="Assistant replied").last).to_have_attribute(
        "data-status", "complete"
    )
    (request,) = upstream.chat_requests()
    assert request.json["messages"][0] == {
        "role": "system",
        "content": "You review dashboard screenshots.",
    }
    pinned = request.json["messages"][1]["content"]
    assert [part["type"] for part in pinned] == ["text", "image_url"]

    # A second conversation, dragged onto the project in the sidebar.
    page.get_by_role("link", name="New chat").first.click()
    box = page.get_by_role("textbox", name="Message")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    box.fill("Dragged chat")
    box.press("Enter")
    expect(page.get_by_role("article", name="Assistant replied")).to_have_attribute(
        "data-status", "complete"
    )
    source = page.locator("#conversation-list").get_by_role("link", name="Dragged chat")
    expect(source).to_be_visible()
    source.drag_to(_sidebar_group(page, "Dashboard reviews"))
    expect(
        _sidebar_group(page, "Dashboard reviews").get_by_role("link", name="Dragged chat")
    ).to_be_visible()
    page.reload()
    expect(
        _sidebar_group(page, "Dashboard reviews").get_by_role("link", name="Dragged chat")
    ).to_be_visible()
    expect(
        page.locator("#conversation-list").get_by_role("link", name="Dragged chat")
    ).to_have_count(0)
    screenshot(page, "projects-04-dragged")
