"""Accounts: staff create users with set-password links, log-in throttling, deactivation that
logs a user out everywhere (sessions and live websockets)."""

import datetime as dt
import re
import uuid

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.tokens import default_token_generator
from django.contrib.sessions.models import Session
from django.core import mail
from django.test import Client

from chatapp import accounts, teams
from chatapp.models import Membership
from tests.admin_forms import admin_post
from tests.conftest import connect
from tests.factories import conversation_create, team_create, user_create

User = get_user_model()
LINK = re.compile(r"http://testserver(/set-password/[^/]+/[^/]+/)")


def admin_client() -> Client:
    client = Client()
    client.force_login(user_create(is_staff=True, is_superuser=True))
    return client


def login(client: Client, username: str, password: str, ip: str = "10.0.0.1"):
    return client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=ip)


def page_messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


# ---- creating users and set-password links ---------------------------------------------------


@pytest.mark.django_db
def test_staff_create_a_user_in_a_team_and_hand_over_a_one_time_link():
    team = team_create(name="Support")
    staff = admin_client()
    response = staff.post(
        "/admin/auth/user/add/",
        {"username": "carol", "email": "carol@example.com", "team": team.pk, "role": "admin"},
        follow=True,
    )
    assert response.status_code == 200
    carol = User.objects.get(username="carol")
    assert not carol.has_usable_password()
    assert Membership.objects.get(user=carol).role == Membership.Role.ADMIN
    assert teams.current_team_for(carol) == team
    notes = " ".join(page_messages(response))
    link = LINK.search(notes).group(1)
    assert "valid 72 hours" in notes
    assert mail.outbox == []  # no EMAIL_HOST: nothing sent

    visitor = Client()
    form = visitor.get(link, follow=True)
    assert form.status_code == 200 and "Choose the password" in form.content.decode()
    done = visitor.post(
        form.redirect_chain[-1][0],
        {"new_password1": "a long fresh secret 42", "new_password2": "a long fresh secret 42"},
        follow=True,
    )
    assert "Your password is set" in done.content.decode()
    assert login(Client(), "carol", "a long fresh secret 42").status_code == 302

    # Single use: the same link is dead now.
    again = Client().get(link, follow=True).content.decode()
    assert "already been used or has expired" in again


@pytest.mark.django_db
def test_set_password_link_expires(monkeypatch, rf):
    user = user_create(username="late")
    request = rf.get("/")
    link = accounts.set_password_link(user=user, request=request).removeprefix("http://testserver")
    later = dt.datetime.now() + dt.timedelta(hours=73)
    monkeypatch.setattr(default_token_generator, "_now", lambda: later)
    page = Client().get(link, follow=True).content.decode()
    assert "already been used or has expired" in page


@pytest.mark.django_db
def test_admin_action_new_link_is_emailed_when_mail_is_configured(settings):
    settings.EMAIL_HOST = "smtp.example.com"
    user = user_create(username="dave", email="dave@example.com")
    response = admin_client().post(
        "/admin/auth/user/",
        {"action": "new_set_password_link", "_selected_action": [user.pk]},
        follow=True,
    )
    notes = " ".join(page_messages(response))
    assert "also e-mailed to dave@example.com" in notes
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["dave@example.com"]
    assert LINK.search(notes).group(1) in mail.outbox[0].body


@pytest.mark.django_db
def test_admin_actions_deactivate_reactivate_and_move(client):
    alpha, beta = team_create(name="Alpha"), team_create(name="Beta")
    user = user_create(username="eve")
    teams.membership_set(user=user, team=alpha, role=Membership.Role.ADMIN)
    client.force_login(user)
    staff = admin_client()

    def act(action, **extra):
        return staff.post(
            "/admin/auth/user/", {"action": action, "_selected_action": [user.pk], **extra}
        )

    act("deactivate_users")
    user.refresh_from_db()
    assert not user.is_active
    assert client.get("/").status_code == 302  # that session is gone
    act("reactivate_users")
    user.refresh_from_db()
    assert user.is_active
    act("move_to_team", team=beta.pk)
    membership = Membership.objects.get(user=user)
    assert (membership.team, membership.role, membership.is_current) == (beta, "admin", True)


# ---- deactivation ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_deactivation_closes_a_live_socket_and_ends_sessions():
    user = await database_sync_to_async(user_create)(username="frank", password="pw-frank-123")
    conversation = await database_sync_to_async(conversation_create)(owner=user)
    ws = await connect(user, conversation.pk)
    assert (await ws.receive_json_from())["type"] == "state"
    other_ws = await connect(user, conversation.pk)  # a second tab
    await other_ws.receive_json_from()
    assert await Session.objects.acount() == 2

    await database_sync_to_async(accounts.user_deactivate)(user=user)

    for socket in (ws, other_ws):
        closed = await socket.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": 4401}
    assert await Session.objects.acount() == 0


@pytest.mark.django_db
def test_a_deactivated_user_cannot_log_in_and_is_told_why(client):
    user = user_create(username="gina", password="right password 1")
    accounts.user_deactivate(user=user)
    response = login(client, "gina", "right password 1")
    assert response.status_code == 200
    assert "This account has been deactivated" in response.content.decode()
    # A wrong password says nothing about the account.
    wrong = login(client, "gina", "nope").content.decode()
    assert "deactivated" not in wrong


@pytest.mark.django_db
def test_team_admin_deactivates_a_member_of_their_team_only(client):
    boss, worker, outsider = user_create(), user_create(), user_create()
    team_create(members=[worker], admins=[boss])
    team_create(members=[outsider])
    worker_client = Client()
    worker_client.force_login(worker)
    client.force_login(boss)
    assert client.post(f"/team/members/{worker.pk}/active/", {"active": "0"}).status_code == 302
    worker.refresh_from_db()
    assert not worker.is_active
    assert worker_client.get("/").status_code == 302
    assert client.post(f"/team/members/{outsider.pk}/active/", {"active": "0"}).status_code == 404
    assert client.post(f"/team/members/{boss.pk}/active/", {"active": "0"}).status_code == 404
    assert client.post(f"/team/members/{worker.pk}/active/", {"active": "1"}).status_code == 302
    worker.refresh_from_db()
    assert worker.is_active


# ---- log-in throttling ----------------------------------------------------------------------


@pytest.mark.django_db
def test_guessing_one_accounts_password_locks_that_account_until_the_lock_expires(
    settings, monkeypatch
):
    settings.LOGIN_MAX_FAILURES_PER_ACCOUNT = 3
    settings.LOGIN_LOCK_SECONDS = 900
    user_create(username="hana", password="the real one 99")
    user_create(username="ivan", password="ivan's own 77")
    start = dt.datetime(2026, 11, 15, 12, 0, tzinfo=dt.UTC)
    monkeypatch.setattr(teams, "now", lambda: start)
    client = Client()
    for guess in ("a", "b", "c"):
        assert "correct username" in login(client, "hana", guess).content.decode()
    locked = login(client, "HANA ", "the real one 99").content.decode()
    assert "Too many failed log-ins for this account" in locked
    assert "try again in 15 minutes" in locked
    assert "_auth_user_id" not in client.session
    assert login(Client(), "ivan", "ivan's own 77").status_code == 302  # others unaffected

    monkeypatch.setattr(teams, "now", lambda: start + dt.timedelta(minutes=14, seconds=1))
    assert "try again in 1 minute." in login(client, "hana", "the real one 99").content.decode()
    monkeypatch.setattr(teams, "now", lambda: start + dt.timedelta(minutes=15, seconds=1))
    assert login(client, "hana", "the real one 99").status_code == 302


@pytest.mark.django_db
def test_guessing_from_one_address_locks_that_address(settings):
    settings.LOGIN_MAX_FAILURES_PER_IP = 4
    settings.LOGIN_MAX_FAILURES_PER_ACCOUNT = 100
    user_create(username="jo", password="jo's password 5")
    for name in ("a", "b", "c", "d"):
        login(Client(), name, "guess", ip="203.0.113.9")
    refused = login(Client(), "jo", "jo's password 5", ip="203.0.113.9").content.decode()
    assert "Too many failed log-ins for your network address" in refused
    assert login(Client(), "jo", "jo's password 5", ip="198.51.100.1").status_code == 302


@pytest.mark.django_db
def test_a_successful_login_forgets_earlier_failures(settings):
    settings.LOGIN_MAX_FAILURES_PER_ACCOUNT = 3
    user_create(username="kim", password="kim's password 8")
    for _ in range(2):
        login(Client(), "kim", "typo")
    assert login(Client(), "kim", "kim's password 8").status_code == 302
    for _ in range(2):
        login(Client(), "kim", "typo")
    assert login(Client(), "kim", "kim's password 8").status_code == 302


@pytest.mark.django_db
def test_logout_ends_the_session(client):
    user = user_create()
    client.force_login(user)
    assert client.get("/").status_code == 200
    assert client.post("/logout/").status_code == 302
    assert client.get("/").status_code == 302


def test_production_cookies_are_secure(monkeypatch):
    import importlib

    from chatapp import settings as project_settings

    monkeypatch.setenv("SECRET_KEY", "x" * 50)
    monkeypatch.setenv("DEBUG", "false")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/4")
    try:
        fresh = importlib.reload(project_settings)
        assert fresh.SESSION_COOKIE_SECURE and fresh.CSRF_COOKIE_SECURE
        assert fresh.SESSION_COOKIE_HTTPONLY
        assert fresh.CACHES["default"]["BACKEND"].endswith("RedisCache")
    finally:
        monkeypatch.undo()
        importlib.reload(project_settings)


@pytest.mark.production
@pytest.mark.django_db
def test_login_locks_live_in_redis_for_every_process(settings):
    import redis
    from django.core.cache.backends.redis import RedisCache

    url = "redis://127.0.0.1:6379/4"
    probe = redis.Redis.from_url(url)
    try:
        probe.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    # A prefix of our own: other checkouts may run this suite against the same Redis at once.
    prefix = f"test-teams-{uuid.uuid4().hex[:8]}"
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": url,
            "KEY_PREFIX": prefix,
        }
    }
    settings.LOGIN_MAX_FAILURES_PER_ACCOUNT = 2
    user_create(username="lena", password="lena's secret 3")
    try:
        for _ in range(2):
            login(Client(), "lena", "wrong")
        # Another process = another connection to the same Redis: it sees the same lock.
        other_process = RedisCache(url, {"KEY_PREFIX": prefix})
        lock_key = f"{accounts._key('account', 'lena')}:lock"
        assert other_process.get(lock_key) is not None
        assert 0 < probe.ttl(f"{prefix}:1:{lock_key}") <= settings.LOGIN_LOCK_SECONDS
        assert "Too many failed" in login(Client(), "lena", "lena's secret 3").content.decode()
    finally:
        for key in probe.scan_iter(f"{prefix}:*"):
            probe.delete(key)
        probe.close()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    [
        "/admin/auth/user/",
        "/admin/auth/user/add/",
        "/admin/chatapp/team/",
        "/admin/chatapp/team/add/",
        "/admin/chatapp/usagerecord/",
    ],
)
def test_admin_pages_render(path):
    team_create(name="Render")
    assert admin_client().get(path).status_code == 200


@pytest.mark.django_db
def test_staff_create_a_team_with_a_budget_and_models_in_the_admin(fake_upstream):
    from chatapp.models import ModelConfig, Team

    fake = ModelConfig.objects.get(model_id="fake-model")
    response = admin_client().post(
        "/admin/chatapp/team/add/",
        {
            "name": "Platform",
            "monthly_budget_usd": "250.00",
            "member_monthly_cap_usd": "",
            "allowed_models": [fake.pk],
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302
    team = Team.objects.get(name="Platform")
    assert str(team.monthly_budget_usd) == "250.00" and team.member_monthly_cap_usd is None
    assert list(team.allowed_models.all()) == [fake]
    user = user_create()
    teams.membership_set(user=user, team=team)
    user_page = admin_client().get(f"/admin/auth/user/{user.pk}/change/")
    assert user_page.status_code == 200 and "Platform" in user_page.content.decode()


@pytest.mark.django_db
def test_the_admin_login_page_is_throttled_too(settings):
    settings.LOGIN_MAX_FAILURES_PER_ACCOUNT = 2
    user_create(username="root", password="root's password 1", is_staff=True)
    for _ in range(2):
        Client().post("/admin/login/", {"username": "root", "password": "x"})
    page = Client().post("/admin/login/", {"username": "root", "password": "root's password 1"})
    assert page.status_code == 200
    assert "Too many failed log-ins for this account" in page.content.decode()
    # The app's own log-in page shares the lock.
    assert "Too many failed" in login(Client(), "root", "root's password 1").content.decode()


@pytest.mark.django_db
def test_a_team_admin_manages_members_only_and_cannot_undo_staff(client):
    """Team admins cannot deactivate a co-admin (or any team's admin, or staff), cannot
    reactivate someone staff deactivated (by the admin action or the user form), and can undo
    their own deactivations; staff decisions win, and staff can undo anything."""
    boss, co_admin, worker, other_boss = (user_create() for _ in range(4))
    team = team_create(members=[worker], admins=[boss, co_admin])
    team_create(members=[boss], admins=[other_boss])
    client.force_login(boss)

    def set_active(user, value: str):
        return client.post(f"/team/members/{user.pk}/active/", {"active": value})

    assert set_active(co_admin, "0").status_code == 404
    co_admin.refresh_from_db()
    assert co_admin.is_active
    page = client.get("/team/").content.decode()
    assert f"/team/members/{co_admin.pk}/active/" not in page
    assert f"/team/members/{worker.pk}/active/" in page

    # Staff deactivate the worker through the admin's user form (untick Active).
    staff = admin_client()
    response = admin_post(staff, f"/admin/auth/user/{worker.pk}/change/", is_active=False)
    assert response.status_code == 302, response.content.decode()[-3000:]
    worker.refresh_from_db()
    assert not worker.is_active
    assert accounts.deactivated_by_staff(worker)

    response = set_active(worker, "1")
    assert response.status_code == 302
    worker.refresh_from_db()
    assert not worker.is_active  # the staff decision stands
    page = client.get("/team/")
    assert "only staff can reactivate" in " ".join(page_messages(page))
    assert "deactivated by staff" in page.content.decode()
    assert f"/team/members/{worker.pk}/active/" not in page.content.decode()

    # Staff reactivate; the team admin's own deactivation is theirs to undo.
    accounts.user_reactivate(user=worker, actor=User.objects.get(is_staff=True))
    assert set_active(worker, "0").status_code == 302
    worker.refresh_from_db()
    assert not worker.is_active and not accounts.deactivated_by_staff(worker)
    assert set_active(worker, "1").status_code == 302
    worker.refresh_from_db()
    assert worker.is_active

    # Staff deactivation by the list action is staff's too.
    staff.post("/admin/auth/user/", {"action": "deactivate_users", "_selected_action": [worker.pk]})
    set_active(worker, "1")
    worker.refresh_from_db()
    assert not worker.is_active

    # The other team's admin cannot touch boss (an admin elsewhere), even though boss is a
    # plain member of their team.
    client.force_login(other_boss)
    assert client.post(f"/team/members/{boss.pk}/active/", {"active": "0"}).status_code == 404
    assert team.memberships.count() == 3
