"""The settings dialog shows only the controls a model's request contract allows, and a
conversation whose model was retired offers "Continue with <successor>", in real Chromium."""

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import SERVER_ENV, _manage, log_in, screenshot
from tests.browser.test_chat_page import last_reply, send
from tests.fake_upstream import stream_reply

# Staff add Kimi models to the OpenAI-compatible provider in the admin; they keep their own
# picker order (a staff decision the catalog sync keeps), so the other scenarios' default
# model stays `fake-model`.
ADD_KIMI = """
from chatapp import model_catalog
from chatapp.models import ModelConfig, Provider
model_catalog.catalog_sync(discover=False)
provider = Provider.objects.get(name="OpenAI-compatible")
for order, model_id in enumerate(["moonshotai/kimi-k3", "moonshotai/kimi-k2.6"]):
    model = ModelConfig(provider=provider, model_id=model_id, display_name="")
    model.sort_order = 50_000 + order
    model.staff_overrides = ["sort_order"]
    model_catalog.model_fill_from_catalog(model)
    model.save()
"""

RETIRE_K26 = """
from chatapp.models import ModelConfig
ModelConfig.objects.filter(model_id="moonshotai/kimi-k2.6").update(
    status="unavailable", status_note="Retired.", successor="moonshotai/kimi-k3"
)
"""


@pytest.fixture(scope="module")
def kimi_models(app_server):
    _manage(SERVER_ENV, "shell", "-c", ADD_KIMI)


def pick(page, name: str) -> None:
    page.get_by_role("combobox", name="Model").select_option(label=name)


def open_settings(page):
    page.get_by_role("button", name="Conversation settings").click()
    return page.get_by_role("dialog", name="Conversation settings")


def test_the_settings_dialog_shows_only_what_the_contract_allows(page, upstream, kimi_models):
    log_in(page)
    # K3: always reasons, an effort choice, no temperature, no thinking switch.
    pick(page, "Kimi K3")
    dialog = open_settings(page)
    expect(dialog.get_by_role("checkbox", name="Thinking")).to_be_hidden()
    expect(dialog.get_by_text("always reasons before answering")).to_be_visible()
    effort = dialog.get_by_role("combobox", name="Reasoning effort")
    expect(effort).to_be_visible()
    expect(effort.locator("option")).to_have_text(["default (max)", "low", "high"])
    expect(dialog.get_by_role("slider", name="Temperature")).to_be_hidden()
    expect(dialog.get_by_text("Temperature: set by the provider.")).to_be_visible()
    effort.select_option("low")
    screenshot(page, "13-settings-k3")
    dialog.get_by_role("button", name="Save settings").click()
    expect(dialog).to_be_hidden()

    upstream.enqueue(stream_reply(["Thought hard."]))
    send(page, "Think about it")
    expect(last_reply(page)).to_contain_text("Thought hard.")
    body = upstream.chat_requests()[-1].json
    assert body["model"] == "moonshotai/kimi-k3" and body["reasoning_effort"] == "low"
    assert "temperature" not in body and "chat_template_kwargs" not in body
    assert body["max_completion_tokens"] == 131_072

    # K2.6: a thinking switch, fixed sampling shown as text, no effort choice.
    pick(page, "Kimi K2.6")
    dialog = open_settings(page)
    expect(dialog.get_by_role("checkbox", name="Thinking")).to_be_visible()
    expect(dialog.get_by_role("combobox", name="Reasoning effort")).to_be_hidden()
    expect(dialog.get_by_role("slider", name="Temperature")).to_be_hidden()
    expect(
        dialog.get_by_text("fixed by the provider at 1.0 with thinking, 0.6 without")
    ).to_be_visible()
    expect(dialog.get_by_text("always reasons before answering")).to_be_hidden()
    dialog.get_by_role("button", name="Cancel").click()

    # A plain OpenAI-compatible model: a temperature, no thinking, no effort.
    pick(page, "fake-model")
    dialog = open_settings(page)
    expect(dialog.get_by_role("slider", name="Temperature")).to_be_visible()
    expect(dialog.get_by_role("checkbox", name="Thinking")).to_be_hidden()
    expect(dialog.get_by_role("combobox", name="Reasoning effort")).to_be_hidden()
    dialog.get_by_role("button", name="Cancel").click()


def test_a_retired_model_offers_continue_with_its_successor(page, upstream, kimi_models):
    log_in(page)
    pick(page, "Kimi K2.6")
    upstream.enqueue(stream_reply(["On K2.6."]))
    send(page, "Hello K2.6")
    expect(last_reply(page)).to_contain_text("On K2.6.")
    _manage(SERVER_ENV, "shell", "-c", RETIRE_K26)

    page.reload()
    notice = page.get_by_role("status").filter(has_text="no longer available")
    expect(notice).to_contain_text("Kimi K2.6 is no longer available")
    button = page.get_by_role("button", name="Continue with Kimi K3")
    expect(button).to_be_visible()
    screenshot(page, "14-continue-with-successor")
    button.click()
    expect(button).to_be_hidden()
    upstream.enqueue(stream_reply(["Now on K3."]))
    send(page, "Still there?")
    expect(last_reply(page)).to_contain_text("Now on K3.")
    assert upstream.chat_requests()[-1].json["model"] == "moonshotai/kimi-k3"
