"""Single sign-on in real Chromium against a real OpenID Connect provider (tests/idp.py: panva's
certified `oidc-provider`, run with node): the app's own daphne, configured from the OIDC_*
variables as an administrator would, with two groups mapped to two teams and local passwords off
except for the break-glass account."""

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import (
    TIMEOUT_MS,
    _free_port,
    assert_page_clean,
    running_app,
    screenshot,
    watch_page,
)
from tests.idp import SECRET, IdentityProvider

LABEL = "Acme SSO"
RESCUE_PASSWORD = "break-glass-pw-123"

SETUP = f"""
from chatapp.models import OIDCGroupMapping, Team
from chatapp.oidc import provider_seed_from_env
from django.contrib.auth import get_user_model
provider = provider_seed_from_env()
eng = Team.objects.create(name="Engineering")
ops = Team.objects.create(name="Operations")
OIDCGroupMapping.objects.create(provider=provider, group="eng", team=eng, role="member")
OIDCGroupMapping.objects.create(provider=provider, group="ops-leads", team=ops, role="admin")
get_user_model().objects.create_superuser(username="rescue", password={RESCUE_PASSWORD!r})
"""


@pytest.fixture(scope="module")
def sso(chromium_path):
    port = _free_port()
    app = f"http://127.0.0.1:{port}"
    idp = IdentityProvider(
        [("kimichat", [f"{app}/login/oidc/sso/callback/"])], post_logout=[f"{app}/login/"]
    )
    env = {
        "OIDC_ISSUER": idp.issuer,
        "OIDC_CLIENT_ID": "kimichat",
        "OIDC_CLIENT_SECRET": SECRET,
        "OIDC_SCOPES": "openid email profile groups",
        "OIDC_LABEL": LABEL,
        "OIDC_ALLOWED_DOMAINS": "acme.test",
        "PASSWORD_LOGIN": "false",
        "BREAK_GLASS_USERNAME": "rescue",
    }
    try:
        with running_app(env, port=port, setup=SETUP, name="daphne-sso") as base_url:
            yield idp, base_url
    finally:
        idp.stop()


@pytest.fixture
def sso_page(browser, sso):
    _, base_url = sso
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 820})
    context.set_default_timeout(TIMEOUT_MS)
    page = watch_page(context.new_page())
    yield page
    context.close()
    assert_page_clean(page)


def sign_in_at_the_provider(page, login: str) -> None:
    """On the provider's own sign-in page (its development interaction: any password)."""
    expect(page.locator("input[name=login]")).to_be_visible()
    page.locator("input[name=login]").fill(login)
    page.locator("input[name=password]").fill("whatever-the-idp-wants")
    page.get_by_role("button", name="Sign-in").click()


def team_options(page) -> list[str]:
    page.goto("/settings/")
    return sorted(page.locator("#team option").all_inner_texts())


def test_sign_in_lands_in_the_mapped_team_and_a_group_change_moves_them(sso, sso_page):
    idp, base_url = sso
    page = sso_page
    idp.account("ada", email="ada@acme.test", groups=["eng"], name="Ada Lovelace")

    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login/"))
    expect(page.get_by_label("Password")).to_have_count(0)  # passwords are off
    screenshot(page, "sso-login-page")
    page.get_by_role("link", name=f"Sign in with {LABEL}").click()
    expect(page).to_have_url(re.compile(re.escape(idp.issuer)))
    sign_in_at_the_provider(page, "ada")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()  # the chat page, signed in
    assert page.url.startswith(base_url)
    assert team_options(page) == ["Engineering (Member)"]
    screenshot(page, "sso-signed-in")

    # Log out: the app's session ends and the provider's sign-out is offered.
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_text("Your Kimi Chat session has ended.")).to_be_visible()
    page.get_by_role("link", name=f"Also sign out of {LABEL}").click()
    expect(page).to_have_url(re.compile(re.escape(idp.issuer)))
    page.get_by_role("button", name=re.compile("Yes, sign me out", re.I)).click()
    expect(page).to_have_url(re.compile(re.escape(base_url) + r"/login/"))
    page.goto("/settings/")
    expect(page).to_have_url(re.compile(r"/login/"))

    # At the identity provider Ada leaves "eng" and joins "ops-leads".
    idp.account("ada", email="ada@acme.test", groups=["ops-leads"], name="Ada Lovelace")
    page.get_by_role("link", name=f"Sign in with {LABEL}").click()
    sign_in_at_the_provider(page, "ada")
    # Back where the log-in page was asked for (?next=/settings/), signed in, in the new team.
    expect(page.get_by_role("heading", name="Settings")).to_be_visible()
    assert page.url == f"{base_url}/settings/"
    assert team_options(page) == ["Operations (Team admin)"]
    screenshot(page, "sso-after-group-change")


def test_someone_outside_the_allowed_domain_sees_ask_your_administrator(sso, sso_page):
    idp, _ = sso
    page = sso_page
    idp.account("eve", email="eve@elsewhere.test", groups=["eng"])
    page.goto("/login/")
    page.get_by_role("link", name=f"Sign in with {LABEL}").click()
    sign_in_at_the_provider(page, "eve")
    expect(page.get_by_role("heading", name="You are not signed in")).to_be_visible()
    expect(page.get_by_role("alert")).to_contain_text("Ask your administrator.")
    screenshot(page, "sso-refused")


def test_with_passwords_off_only_the_break_glass_account_gets_a_password_form(sso, sso_page):
    page = sso_page
    page.goto("/login/")
    expect(page.get_by_label("Password")).to_have_count(0)
    page.get_by_role("link", name="Administrator break-glass log-in").click()
    page.get_by_label("Username").fill("rescue")
    page.get_by_label("Password").fill(RESCUE_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    screenshot(page, "sso-break-glass")
