"""Single sign-on against a real OpenID Connect provider (tests/idp.py runs panva's certified
`oidc-provider` with node); the app is driven through its URLs, the provider through its own
sign-in pages. The full flow in Chromium is in tests/browser/test_sso.py."""

from urllib.parse import parse_qs, urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client

from chatapp import accounts, oidc
from chatapp.models import (
    AuditEntry,
    Membership,
    OIDCGroupMapping,
    OIDCIdentity,
    OIDCProvider,
)
from tests.conftest import OIDC_CLIENTS as CLIENTS
from tests.factories import team_create, user_create
from tests.idp import SECRET, sign_in_with_http

pytestmark = pytest.mark.django_db


def provider_create(idp, slug="company", **extra) -> OIDCProvider:
    values = {
        "slug": slug,
        "label": "Example SSO",
        "issuer": idp.issuer,
        "client_id": CLIENTS[slug],
        "client_secret": SECRET,
        "scopes": "openid email profile groups",
        **extra,
    }
    return OIDCProvider.objects.create(**values)


@pytest.fixture
def company(idp):
    provider = provider_create(idp)
    eng = team_create(name="Engineering")
    ops = team_create(name="Operations")
    OIDCGroupMapping.objects.create(provider=provider, group="eng", team=eng, role="member")
    OIDCGroupMapping.objects.create(provider=provider, group="eng-leads", team=eng, role="admin")
    OIDCGroupMapping.objects.create(provider=provider, group="ops", team=ops, role="member")
    return provider


def roles(user) -> dict[str, str]:
    return {
        m.team.name: m.role for m in Membership.objects.filter(user=user).select_related("team")
    }


def actions(**filters) -> list[str]:
    return list(
        AuditEntry.objects.filter(**filters).order_by("id").values_list("action", flat=True)
    )


def refusals() -> list[str]:
    return [
        entry.changes["reason"]
        for entry in AuditEntry.objects.filter(action="oidc.login_refused").order_by("id")
    ]


# ---- the flow -----------------------------------------------------------------------------------


def test_authorization_request_uses_pkce_state_and_nonce(company):
    client = Client()
    response = client.get("/login/oidc/company/")
    assert response.status_code == 302
    query = parse_qs(urlsplit(response["Location"]).query)
    assert response["Location"].startswith(company.issuer)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert query["state"][0] and query["nonce"][0]
    assert query["client_id"] == ["kimichat"]
    assert query["redirect_uri"] == ["http://testserver/login/oidc/company/callback/"]
    assert set(query["scope"][0].split()) == {"openid", "email", "profile", "groups"}


def test_first_sign_in_creates_the_account_in_the_mapped_teams(idp, company):
    idp.account("ada", email="ada@example.com", groups=["eng", "ops", "unmapped"])
    client = Client()
    response, _ = sign_in_with_http(client, "company", login="ada")
    assert response.status_code == 302 and response["Location"] == "/"
    user = get_user_model().objects.get(email="ada@example.com")
    assert not user.has_usable_password()
    assert roles(user) == {"Engineering": "member", "Operations": "member"}
    assert all(m.synced_by_id == company.pk for m in Membership.objects.filter(user=user))
    assert OIDCIdentity.objects.get(user=user).subject == "ada"
    assert client.get("/settings/").status_code == 200  # logged in
    assert actions() == [
        "oidc.account_created",
        "oidc.membership_added",
        "oidc.membership_added",
        "oidc.login",
    ]


def test_group_changes_are_applied_at_the_next_sign_in(idp, company):
    idp.account("bob", email="bob@example.com", groups=["eng", "ops"])
    sign_in_with_http(Client(), "company", login="bob")
    user = get_user_model().objects.get(email="bob@example.com")
    manual = team_create(name="Manual team")
    Membership.objects.create(user=user, team=manual, role="admin")  # staff added it by hand

    idp.account("bob", email="bob@example.com", groups=["eng", "eng-leads"])  # left ops
    response, _ = sign_in_with_http(Client(), "company", login="bob")
    assert response.status_code == 302
    assert roles(user) == {"Engineering": "admin", "Manual team": "admin"}
    changes = AuditEntry.objects.filter(action__startswith="oidc.membership").order_by("id")
    assert [(e.action, e.object_repr) for e in changes][-2:] == [
        ("oidc.membership_changed", "Engineering"),
        ("oidc.membership_removed", "Operations"),
    ]

    idp.account("bob", email="bob@example.com", groups=[])  # out of every mapped group
    sign_in_with_http(Client(), "company", login="bob")
    assert roles(user) == {"Manual team": "admin"}  # the manual membership is left alone
    assert Membership.objects.get(user=user).is_current


def test_a_first_sign_in_links_the_existing_account_with_that_email(idp, company):
    existing = user_create(username="carol", email="Carol@Example.com")
    idp.account("carol-at-idp", email="carol@example.com", groups=["ops"])
    response, _ = sign_in_with_http(Client(), "company", login="carol-at-idp")
    assert response.status_code == 302
    assert OIDCIdentity.objects.get(subject="carol-at-idp").user == existing
    assert get_user_model().objects.filter(email__iexact="carol@example.com").count() == 1
    assert roles(existing) == {"Operations": "member"}
    assert "oidc.account_linked" in actions()


def test_the_client_secret_is_encrypted_at_rest(company):
    with connection.cursor() as cursor:
        cursor.execute("SELECT client_secret FROM chatapp_oidcprovider WHERE id = %s", [company.pk])
        (stored,) = cursor.fetchone()
    assert stored.startswith("fernet:") and SECRET not in stored
    assert OIDCProvider.objects.get(pk=company.pk).client_secret == SECRET


# ---- refusals -----------------------------------------------------------------------------------


def assert_refused(response, status: int, text: str) -> None:
    body = response.content.decode()
    assert response.status_code == status, body[:800]
    assert text in body
    assert "_auth_user_id" not in response.wsgi_request.session


@pytest.mark.parametrize(
    ("slug", "reason", "text"),
    [
        ("wrongaud", "wrong_audience", "was not issued for this app"),
        ("expired", "expired_token", "has expired"),
        ("badsig", "bad_signature", "failed its signature check"),
        ("badnonce", "invalid_token", "was not issued for this app (nonce)"),
        ("wrongiss", "invalid_token", "was not issued for this app (iss)"),
    ],
)
def test_a_doctored_id_token_is_refused_with_a_clear_page(idp, slug, reason, text):
    provider_create(idp, slug=slug)
    idp.account("dave", email="dave@example.com", groups=["eng"])
    response, _ = sign_in_with_http(Client(), slug, login="dave")
    assert_refused(response, 403, text)
    assert "Ask your administrator" in response.content.decode()
    assert not get_user_model().objects.filter(email="dave@example.com").exists()
    assert refusals() == [reason]


def test_a_replayed_state_is_refused(idp, company):
    idp.account("erin", email="erin@example.com", groups=["eng"])
    client = Client()
    response, callback = sign_in_with_http(client, "company", login="erin")
    assert response.status_code == 302
    parts = urlsplit(callback)
    again = Client().get(f"{parts.path}?{parts.query}")  # another browser replays it
    assert_refused(again, 400, "already used or has expired")
    same = client.get(f"{parts.path}?{parts.query}")  # the same browser, a second time
    assert same.status_code == 400
    assert refusals() == ["bad_state", "bad_state"]


@pytest.mark.parametrize(
    ("rule", "email", "groups"),
    [
        ({"allowed_domains": "example.com, example.org"}, "mallory@elsewhere.net", ["eng"]),
        ({"required_groups": "staff\nchat-users"}, "mallory@example.com", ["eng"]),
    ],
)
def test_a_person_outside_the_allow_rule_is_refused(idp, company, rule, email, groups):
    OIDCProvider.objects.filter(pk=company.pk).update(**rule)
    idp.account("mallory", email=email, groups=groups)
    response, _ = sign_in_with_http(Client(), "company", login="mallory")
    assert_refused(response, 403, "use this chat")
    assert "Ask your administrator" in response.content.decode()
    assert not get_user_model().objects.filter(email=email).exists()
    entry = AuditEntry.objects.get(action="oidc.login_refused")
    assert entry.changes["reason"] == "not_allowed" and entry.actor_name == email


def test_the_allow_rule_lets_in_who_it_names(idp, company):
    OIDCProvider.objects.filter(pk=company.pk).update(
        allowed_domains="example.com", required_groups="eng"
    )
    idp.account("frank", email="frank@example.com", groups=["eng"])
    response, _ = sign_in_with_http(Client(), "company", login="frank")
    assert response.status_code == 302


def test_an_unverified_email_is_refused(idp, company):
    user_create(username="grace", email="grace@example.com")
    idp.account("grace-at-idp", email="grace@example.com", email_verified=False)
    response, _ = sign_in_with_http(Client(), "company", login="grace-at-idp")
    assert_refused(response, 403, "not verified")
    assert not OIDCIdentity.objects.exists()


def test_a_deactivated_account_cannot_sign_in_through_the_provider(idp, company):
    idp.account("heidi", email="heidi@example.com", groups=["eng"])
    sign_in_with_http(Client(), "company", login="heidi")
    user = get_user_model().objects.get(email="heidi@example.com")
    accounts.user_deactivate(user=user)
    response, _ = sign_in_with_http(Client(), "company", login="heidi")
    assert_refused(response, 403, "deactivated")
    assert refusals() == ["deactivated"]


def test_sign_in_failures_count_towards_the_login_throttle(idp, company, settings):
    settings.LOGIN_MAX_FAILURES_PER_ACCOUNT = 2
    OIDCProvider.objects.filter(pk=company.pk).update(allowed_domains="example.com")
    idp.account("ivan", email="ivan@elsewhere.net")
    for _ in range(2):
        response, _ = sign_in_with_http(Client(), "company", login="ivan")
        assert response.status_code == 403
    OIDCProvider.objects.filter(pk=company.pk).update(allowed_domains="")
    response, _ = sign_in_with_http(Client(), "company", login="ivan")  # now allowed, but locked
    assert_refused(response, 429, "Too many failed log-ins")
    # Failures before the person is known (bad state) count against the address.
    settings.LOGIN_MAX_FAILURES_PER_IP = 3
    client = Client()
    client.get("/login/oidc/company/callback/?code=x&state=forged")
    response = client.get("/login/oidc/company/")
    assert_refused(response, 429, "your network address")


def test_an_unknown_or_disabled_provider_is_404(company):
    assert Client().get("/login/oidc/nope/").status_code == 404
    OIDCProvider.objects.filter(pk=company.pk).update(enabled=False)
    assert Client().get("/login/oidc/company/").status_code == 404
    assert Client().get("/login/oidc/company/callback/").status_code == 404


def test_an_unreachable_provider_is_a_clear_page_not_an_error(company):
    OIDCProvider.objects.filter(pk=company.pk).update(issuer="http://127.0.0.1:9")
    response = Client().get("/login/oidc/company/")
    assert response.status_code == 502
    assert "could not be reached" in response.content.decode()


# ---- sign-out, login page, environment, admin ---------------------------------------------------


def test_logout_ends_the_session_and_offers_the_providers_sign_out(idp, company):
    idp.account("judy", email="judy@example.com")
    client = Client()
    sign_in_with_http(client, "company", login="judy")
    response = client.post("/logout/")
    assert response.status_code == 200
    body = response.content.decode()
    assert "Also sign out of Example SSO" in body
    link = urlsplit(response.context["end_session_url"])
    assert f"http://{link.netloc}" == idp.issuer
    query = parse_qs(link.query)
    assert query["post_logout_redirect_uri"] == ["http://testserver/login/"]
    assert query["client_id"] == ["kimichat"] and query["id_token_hint"][0].count(".") == 2
    assert client.get("/settings/").status_code == 302  # the app's session is gone


def test_the_login_page_offers_each_enabled_provider(idp, company):
    provider_create(idp, slug="expired", label="Other IdP", enabled=False)
    body = Client().get("/login/").content.decode()
    assert "Sign in with Example SSO" in body and "Other IdP" not in body
    assert 'name="password"' in body  # passwords still on by default


def test_with_passwords_off_only_the_break_glass_account_logs_in_by_password(company, settings):
    settings.PASSWORD_LOGIN = False
    settings.BREAK_GLASS_USERNAME = "rescue"
    user_create(username="rescue", is_staff=True)
    user_create(username="worker")
    body = Client().get("/login/").content.decode()
    assert "Sign in with Example SSO" in body
    assert 'name="password"' not in body
    assert "break-glass" in body
    glass = Client().get("/login/?break-glass=1").content.decode()
    assert 'name="password"' in glass
    refused = Client().post(
        "/login/?break-glass=1", {"username": "worker", "password": "pw-for-tests-123"}
    )
    assert refused.status_code == 200 and "turned off" in refused.content.decode()
    admin_door = Client().post(
        "/admin/login/", {"username": "worker", "password": "pw-for-tests-123"}
    )
    assert "turned off" in admin_door.content.decode()
    rescue = Client()
    response = rescue.post(
        "/login/?break-glass=1", {"username": "rescue", "password": "pw-for-tests-123"}
    )
    assert response.status_code == 302 and rescue.get("/settings/").status_code == 200


def test_the_break_glass_name_must_be_a_staff_account(settings):
    settings.PASSWORD_LOGIN = False
    settings.BREAK_GLASS_USERNAME = "rescue"
    user_create(username="rescue")  # not staff
    response = Client().post("/login/", {"username": "rescue", "password": "pw-for-tests-123"})
    assert response.status_code == 200 and "turned off" in response.content.decode()


def test_the_first_provider_comes_from_the_environment(idp, settings, monkeypatch):
    settings.OIDC_ISSUER = idp.issuer
    settings.OIDC_CLIENT_ID = "kimichat"
    settings.OIDC_CLIENT_SECRET = SECRET
    settings.OIDC_LABEL = "Acme Okta"
    settings.OIDC_ALLOWED_DOMAINS = "acme.test"
    # A plain `migrate` + server deploy: seeded on the first use in the process.
    monkeypatch.setattr(oidc, "_seeded", False)
    assert "Sign in with Acme Okta" in Client().get("/login/").content.decode()
    provider = OIDCProvider.objects.get(managed_by_env=True)
    assert provider.slug == "sso" and provider.client_secret == SECRET
    assert provider.allowed_domains == "acme.test"
    settings.OIDC_LABEL = "Acme Entra"
    assert oidc.provider_seed_from_env().pk == provider.pk  # `start` / `prepare` re-seed it
    assert "Sign in with Acme Entra" in Client().get("/login/").content.decode()
    settings.OIDC_ISSUER = ""
    oidc.provider_seed_from_env()
    assert not OIDCProvider.objects.get(pk=provider.pk).enabled


def test_staff_map_groups_in_the_admin_and_the_mapping_is_audited(idp, company, admin_client):
    page = admin_client.get(f"/admin/chatapp/oidcprovider/{company.pk}/change/")
    assert page.status_code == 200 and SECRET not in page.content.decode()
    mappings = list(company.group_mappings.order_by("id"))
    ops = mappings[2].team
    data = {
        "label": "Example SSO",
        "slug": "company",
        "issuer": idp.issuer,
        "client_id": "kimichat",
        "new_client_secret": "",
        "scopes": "openid email profile groups",
        "groups_claim": "groups",
        "allowed_domains": "",
        "required_groups": "",
        "enabled": "on",
        "group_mappings-TOTAL_FORMS": "4",
        "group_mappings-INITIAL_FORMS": "3",
        "group_mappings-MIN_NUM_FORMS": "0",
        "group_mappings-MAX_NUM_FORMS": "1000",
    }
    for i, mapping in enumerate(mappings):
        data.update(
            {
                f"group_mappings-{i}-id": mapping.pk,
                f"group_mappings-{i}-provider": company.pk,
                f"group_mappings-{i}-group": mapping.group,
                f"group_mappings-{i}-team": mapping.team_id,
                f"group_mappings-{i}-role": mapping.role,
            }
        )
    data.update(
        {
            "group_mappings-3-provider": company.pk,
            "group_mappings-3-group": "ops-leads",
            "group_mappings-3-team": ops.pk,
            "group_mappings-3-role": "admin",
        }
    )
    response = admin_client.post(f"/admin/chatapp/oidcprovider/{company.pk}/change/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert OIDCProvider.objects.get(pk=company.pk).client_secret == SECRET  # kept
    entry = AuditEntry.objects.get(action="oidc.mapping_changed")
    before, after = entry.changes["group mappings"]
    assert "ops-leads → Operations (Team admin)" in after and len(after) == len(before) + 1


def test_cancelling_at_the_provider_is_a_clear_page_and_not_counted(company, settings):
    settings.LOGIN_MAX_FAILURES_PER_IP = 1
    client = Client()
    start = client.get("/login/oidc/company/")
    state = parse_qs(urlsplit(start["Location"]).query)["state"][0]
    response = client.get(
        "/login/oidc/company/callback/",
        {"error": "access_denied", "error_description": "<b>free text</b>", "state": state},
    )
    assert_refused(response, 403, "did not complete the sign-in (access_denied)")
    assert "free text" not in response.content.decode()
    assert refusals() == ["provider_refused"]
    assert client.get("/login/oidc/company/").status_code == 302  # not locked out
