"""The Content-Security-Policy holds in a real browser: injected inline script and inline event
handlers do not run, and the admin works under the same policy (every other browser test fails
on any violation through the page fixture)."""

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD, SERVER_ENV, _manage, screenshot


def test_inline_script_and_handlers_are_refused(page, person):
    """As if model output got past the sanitiser: script added to the page does not run."""
    page.evaluate(
        """() => {
            const script = document.createElement("script");
            script.textContent = "window.__injected = 'script ran'";
            document.body.append(script);
            document.body.insertAdjacentHTML(
                "beforeend", '<img src="data:," onload="window.__handler = 1" alt="">');
            const frame = document.createElement("div");
            frame.innerHTML = '<a href="javascript:window.__link=1" id="csp-link">x</a>';
            document.body.append(frame);
        }"""
    )
    page.locator("#csp-link").click()
    page.wait_for_timeout(300)  # give a blocked handler the chance it would have had
    assert page.evaluate("window.__injected") is None
    assert page.evaluate("window.__handler") is None
    assert page.evaluate("window.__link") is None
    # The browser reported the refusals (console events arrive asynchronously).
    for _ in range(50):
        if len(page.csp_violations) >= 2:
            break
        page.wait_for_timeout(100)
    assert any("script-src" in text for text in page.csp_violations), page.csp_violations
    page.csp_violations.clear()  # provoked on purpose


@pytest.fixture
def staff_login(page, app_server):
    _manage(
        SERVER_ENV,
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model\n"
        "U = get_user_model()\n"
        "U.objects.filter(username='cspstaff').exists() or "
        f"U.objects.create_superuser('cspstaff', 'c@example.com', {PASSWORD!r})",
    )
    page.goto("/admin/login/")
    page.get_by_label("Username").fill("cspstaff")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Site administration")).to_be_visible()
    return page


def test_the_admin_works_under_the_policy(staff_login):
    page = staff_login
    page.goto("/admin/auth/user/")
    page.get_by_role("link", name="cspstaff").click()
    expect(page.get_by_label("Active")).to_be_checked()
    # The team form: the two-box model picker is built by the admin's JavaScript.
    page.goto("/admin/chatapp/team/add/")
    expect(page.get_by_role("heading", name="Add team")).to_be_visible()
    expect(page.locator("#id_allowed_models_from")).to_be_visible()
    page.get_by_label("Name").fill("CSP team")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_text("was added successfully")).to_be_visible()
    page.goto("/admin/chatapp/modelconfig/")
    expect(page.get_by_role("button", name="Refresh models")).to_be_visible()
    screenshot(page, "csp-admin")
