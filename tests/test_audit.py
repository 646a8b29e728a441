"""The audit log: log-ins, log-outs, password events, admin changes with before -> after,
deactivations and exports; the staff page and CSV; read-only in the admin; retention; written in
the transaction of the change it records."""

import csv
import datetime as dt
import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import transaction
from django.test import Client

from chatapp import audit, teams
from chatapp.models import AuditEntry, Provider, Team
from tests.factories import conversation_create, team_create, user_create

User = get_user_model()
LINK = re.compile(r"http://testserver(/set-password/[^/]+/[^/]+/)")


def staff_client(username="boss") -> tuple[Client, object]:
    staff = user_create(username=username, is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(staff)
    return client, staff


def login(client, username, password, ip="10.0.0.1"):
    return client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=ip)


def entries(action: str) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(action=action).order_by("id"))


# ---- the issue's own test: a team budget change and a failed log-in ------------------------


@pytest.mark.django_db
def test_a_budget_change_and_a_failed_login_appear_with_before_after_and_address():
    team = team_create(name="Platform", monthly_budget_usd="100.00")
    client, staff = staff_client()
    response = client.post(
        f"/admin/chatapp/team/{team.pk}/change/",
        {
            "name": "Platform",
            "monthly_budget_usd": "250.00",
            "member_monthly_cap_usd": "",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
        REMOTE_ADDR="192.0.2.7",
    )
    assert response.status_code == 302
    user_create(username="dana", password="dana's right password")
    assert login(Client(), "dana", "wrong", ip="198.51.100.9").status_code == 200

    page = client.get("/audit/").content.decode()
    assert "team.changed" in page and "monthly_budget_usd: 100.00 → 250.00" in page
    assert "192.0.2.7" in page
    assert "login.failure" in page and "198.51.100.9" in page

    (change,) = entries("team.changed")
    assert change.actor == staff and change.actor_name == "boss"
    assert change.object_repr == "Platform" and change.object_id == str(team.pk)
    assert change.changes == {"monthly_budget_usd": ["100.00", "250.00"]}
    (failure,) = entries("login.failure")
    assert failure.actor is None and failure.actor_name == "dana"
    assert failure.changes == {"reason": "bad_credentials"} and failure.address == "198.51.100.9"

    rows = list(csv.reader(io.StringIO(client.get("/audit.csv").content.decode())))
    assert rows[0] == audit.CSV_HEADER
    budget_rows = [r for r in rows if r[2] == "team.changed"]
    assert (
        budget_rows[0][1] == "boss" and budget_rows[0][6] == "monthly_budget_usd: 100.00 → 250.00"
    )
    assert budget_rows[0][7] == "192.0.2.7"
    # Filters: who changed this budget?
    filtered = client.get("/audit/", {"q": "Platform", "action": "team."}).content.decode()
    assert "team.changed" in filtered and "login.failure" not in filtered


# ---- log-ins, log-outs, locks ----------------------------------------------------------------


@pytest.mark.django_db
def test_login_success_lock_and_logout_are_recorded(settings):
    settings.LOGIN_MAX_FAILURES_PER_ACCOUNT = 2
    user = user_create(username="erin", password="erin's good password")
    client = Client()
    assert login(client, "erin", "erin's good password", ip="203.0.113.5").status_code == 302
    (success,) = entries("login.success")
    assert success.actor == user and success.address == "203.0.113.5"

    client.post("/logout/", REMOTE_ADDR="203.0.113.5")
    (logout,) = entries("logout")
    assert logout.actor == user and logout.address == "203.0.113.5"

    for _ in range(2):
        login(Client(), "erin", "nope")
    (lock,) = entries("login.lock")
    assert lock.actor_name == "erin" and lock.object_id == str(user.pk)
    assert lock.changes["locked"] == "account"
    login(Client(), "erin", "erin's good password")
    assert [e.changes["reason"] for e in entries("login.failure")] == [
        "bad_credentials",
        "bad_credentials",
        "locked",
    ]


@pytest.mark.django_db
def test_deactivated_login_and_admin_logout_are_recorded(client):
    user = user_create(username="fay", password="fay's good password")
    User.objects.filter(pk=user.pk).update(is_active=False)
    login(client, "fay", "fay's good password")
    assert entries("login.failure")[0].changes == {"reason": "deactivated"}

    staff, who = staff_client()
    response = staff.post("/admin/logout/")
    assert response.status_code in (200, 302)
    assert entries("logout")[0].actor == who
    assert "_auth_user_id" not in staff.session


# ---- passwords and set-password links ---------------------------------------------------------


@pytest.mark.django_db
def test_set_password_link_issue_and_use_and_admin_password_change():
    client, staff = staff_client()
    response = client.post(
        "/admin/auth/user/add/",
        {"username": "gus", "email": "", "team": "", "role": "member"},
        follow=True,
    )
    gus = User.objects.get(username="gus")
    (created,) = entries("user.created")
    assert created.actor == staff and created.changes["username"] == [None, "gus"]
    (issued,) = entries("password.link_issued")
    assert issued.actor == staff and issued.object_id == str(gus.pk)

    link = LINK.search(" ".join(str(m) for m in response.context["messages"])).group(1)
    visitor = Client()
    form = visitor.get(link, follow=True)
    visitor.post(
        form.redirect_chain[-1][0],
        {"new_password1": "a long fresh secret 42", "new_password2": "a long fresh secret 42"},
        REMOTE_ADDR="192.0.2.44",
    )
    (used,) = entries("password.set_via_link")
    assert used.actor == gus and used.address == "192.0.2.44"

    client.post(
        f"/admin/auth/user/{gus.pk}/password/",
        {"password1": "another long secret 43", "password2": "another long secret 43"},
    )
    (changed,) = entries("password.changed")
    assert changed.actor == staff and changed.object_id == str(gus.pk)
    assert not any("pbkdf2" in str(e.changes) for e in AuditEntry.objects.all())


# ---- admin changes -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_provider_changes_deletions_and_secrets():
    client, staff = staff_client()
    provider = Provider.objects.create(
        name="Acme", kind=Provider.Kind.OPENAI_COMPAT, base_url="https://acme.example/v1"
    )
    provider.api_key = "sk-old-secret"
    provider.save()
    client.post(
        f"/admin/chatapp/provider/{provider.pk}/change/",
        {
            "name": "Acme",
            "kind": provider.kind,
            "base_url": provider.base_url,
            "new_api_key": "sk-new-secret",
            "max_concurrency": "2",
            "enabled": "on",
        },
    )
    (change,) = entries("provider.changed")
    assert change.changes["max_concurrency"] == [0, 2]
    assert change.changes["api_key"] == ["set", "replaced"]
    assert "sk-" not in str(AuditEntry.objects.values_list("changes", flat=True))

    team = team_create(name="Ops")
    client.post(f"/admin/chatapp/team/{team.pk}/delete/", {"post": "yes"})
    (deleted,) = entries("team.deleted")
    assert deleted.object_repr == "Ops" and deleted.changes["name"] == ["Ops", None]


@pytest.mark.django_db
def test_admin_actions_deactivate_reactivate_move_are_recorded():
    client, staff = staff_client()
    old, new = team_create(name="Old"), team_create(name="New")
    user = user_create(username="hal")
    teams.membership_set(user=user, team=old)
    base = "/admin/auth/user/"
    client.post(base, {"action": "deactivate_users", "_selected_action": [user.pk]})
    client.post(base, {"action": "reactivate_users", "_selected_action": [user.pk]})
    client.post(base, {"action": "move_to_team", "_selected_action": [user.pk], "team": new.pk})
    (off,) = entries("user.deactivated")
    assert off.actor == staff
    assert off.changes == {"is_active": [True, False], "deactivated_by": "staff"}
    (on,) = entries("user.reactivated")
    assert on.changes == {"is_active": [False, True]}
    (moved,) = entries("user.moved_team")
    before, after = moved.changes["memberships"]
    assert before == ["hal in Old (member)"] and after == ["hal in New (member)"]


@pytest.mark.django_db
def test_team_admin_deactivation_is_recorded(client):
    admin = user_create(username="lead")
    member = user_create(username="ivy")
    team_create(members=[member], admins=[admin])
    client.force_login(admin)
    client.post(f"/team/members/{member.pk}/active/", {"active": "0"}, REMOTE_ADDR="192.0.2.1")
    (entry,) = entries("user.deactivated")
    assert entry.actor == admin and entry.object_id == str(member.pk)
    assert entry.changes["deactivated_by"] == "team admin"
    assert entry.address == "192.0.2.1"


@pytest.mark.django_db
def test_exports_are_recorded(client):
    owner = user_create(username="jo")
    conversation = conversation_create(owner=owner, title="Plan")
    client.force_login(owner)
    client.get(f"/c/{conversation.pk}/export.json")
    (export,) = entries("export.conversation")
    assert export.actor == owner and export.changes == {"format": "json"}
    staff, _ = staff_client()
    staff.get("/usage.csv")
    staff.get("/audit.csv")
    assert entries("export.usage_csv") and entries("export.audit_csv")


# ---- the log itself ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_entry_rolls_back_with_the_change_it_records():
    team = Team.objects.create(name="T", monthly_budget_usd=1)
    with pytest.raises(RuntimeError), transaction.atomic():
        Team.objects.filter(pk=team.pk).update(monthly_budget_usd=2)
        audit.audit_record(actor=None, action="team.changed", obj=team)
        raise RuntimeError("the change fails")
    assert not AuditEntry.objects.exists()


@pytest.mark.django_db
def test_entries_are_read_only_in_the_admin():
    client, staff = staff_client()
    audit.audit_record(actor=staff, action="logout")
    entry = AuditEntry.objects.get()
    assert client.get("/admin/chatapp/auditentry/").status_code == 200
    page = client.get(f"/admin/chatapp/auditentry/{entry.pk}/change/")
    assert page.status_code == 200 and 'name="_save"' not in page.content.decode()
    assert client.get("/admin/chatapp/auditentry/add/").status_code == 403
    assert (
        client.post(f"/admin/chatapp/auditentry/{entry.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    client.post(
        f"/admin/chatapp/auditentry/{entry.pk}/change/", {"action": "changed", "actor_name": "x"}
    )
    entry.refresh_from_db()
    assert entry.action == "logout" and entry.actor_name == "boss"


@pytest.mark.django_db
def test_retention_purges_old_entries_only(settings, monkeypatch):
    settings.AUDIT_RETENTION_DAYS = 30
    old = audit.audit_record(actor=None, action="login.failure")
    AuditEntry.objects.filter(pk=old.pk).update(created_at=teams.now() - dt.timedelta(days=31))
    audit.audit_record(actor=None, action="login.failure")
    out = io.StringIO()
    call_command("purge_audit", stdout=out)
    assert "Deleted 1 audit entry" in out.getvalue()
    assert AuditEntry.objects.count() == 1
    settings.AUDIT_RETENTION_DAYS = 0
    AuditEntry.objects.update(created_at=teams.now() - dt.timedelta(days=3650))
    assert audit.audit_purge() == 0 and AuditEntry.objects.count() == 1


@pytest.mark.django_db
def test_only_staff_see_the_audit_log(client):
    client.force_login(user_create())
    assert client.get("/audit/").status_code == 403
    assert client.get("/audit.csv").status_code == 403
