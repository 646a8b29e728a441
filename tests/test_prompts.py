"""The prompt library over HTTP: personal and team prompts, who may change them, the
composer's list, and JSON import/export round trips."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from chatapp.models import AuditEntry, SavedPrompt
from tests.factories import team_create, user_create

pytestmark = pytest.mark.django_db


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def world():
    admin = user_create(username="lead")
    member = user_create(username="member")
    stranger = user_create(username="stranger")
    team = team_create(name="Design", members=[member], admins=[admin])
    team_create(name="Other", members=[stranger])
    return {"admin": admin, "member": member, "stranger": stranger, "team": team}


def _json_file(document, name="prompts.json"):
    return SimpleUploadedFile(name, json.dumps(document).encode(), content_type="application/json")


def test_team_prompts_are_curated_by_admins_read_by_members_and_audited(world):
    lead = _client(world["admin"])
    response = lead.post(
        "/prompts/new",
        {
            "title": "Screen review",
            "text": "Review {{screen}} for {{audience}}; list {{screen}} issues.",
            "scope": str(world["team"].pk),
        },
    )
    assert response.status_code == 302
    prompt = SavedPrompt.objects.get(title="Screen review")
    assert prompt.team_id == world["team"].pk and prompt.owner_id is None
    entry = AuditEntry.objects.get(action="prompt.created")
    assert entry.object_id == str(prompt.pk) and entry.actor_id == world["admin"].pk

    member = _client(world["member"])
    listed = member.get("/api/prompts/").json()["prompts"]
    assert [(p["title"], p["team"], p["variables"], p["may_edit"]) for p in listed] == [
        ("Screen review", "Design", ["screen", "audience"], False)
    ]
    assert member.get("/api/prompts/", {"q": "nothing like it"}).json()["prompts"] == []
    assert _client(world["stranger"]).get("/api/prompts/").json()["prompts"] == []

    # A member may not change it, nor add one to the team; a stranger cannot even see it.
    edit = {"title": "Hijacked", "text": "x"}
    assert member.post(f"/prompts/{prompt.pk}/edit", edit).status_code == 403
    assert member.post(f"/prompts/{prompt.pk}/delete").status_code == 403
    team_scope = {"title": "t", "text": "x", "scope": str(world["team"].pk)}
    assert member.post("/prompts/new", team_scope).status_code == 403
    assert _client(world["stranger"]).post(f"/prompts/{prompt.pk}/edit", edit).status_code == 404
    assert SavedPrompt.objects.get(pk=prompt.pk).title == "Screen review"

    # The admin's change is logged with before -> after.
    assert (
        lead.post(
            f"/prompts/{prompt.pk}/edit", {"title": "Screen review", "text": "Check {{screen}}."}
        ).status_code
        == 302
    )
    changed = AuditEntry.objects.get(action="prompt.changed")
    assert changed.changes == {
        "text": ["Review {{screen}} for {{audience}}; list {{screen}} issues.", "Check {{screen}}."]
    }

    # Personal prompts are not audited, and only their owner has them.
    member.post("/prompts/new", {"title": "Mine", "text": "Just {{me}}"})
    assert not AuditEntry.objects.filter(object_id=str(SavedPrompt.objects.get(title="Mine").pk))
    titles = [p["title"] for p in member.get("/api/prompts/").json()["prompts"]]
    assert titles == ["Mine", "Screen review"]  # personal first
    assert [p["title"] for p in lead.get("/api/prompts/").json()["prompts"]] == ["Screen review"]


def test_a_refused_prompt_keeps_what_was_typed(world):
    response = _client(world["member"]).post(
        "/prompts/new", {"title": "", "text": "A long text I would hate to lose"}
    )
    assert response.status_code == 400
    body = response.content.decode()
    assert "Give the prompt a title." in body
    assert "A long text I would hate to lose" in body
    assert not SavedPrompt.objects.exists()


def test_personal_export_import_round_trip(world):
    member = _client(world["member"])
    member.post("/prompts/new", {"title": "Bug report", "text": "Steps: {{steps}}"})
    member.post("/prompts/new", {"title": "Résumé", "text": "Summarise {{doc}} in 3 bullets."})
    exported = member.get("/prompts/export.json")
    assert exported.status_code == 200
    assert "attachment" in exported["Content-Disposition"]
    document = json.loads(exported.content)
    assert document["format"] == "kimichat.prompts.v1"
    assert document["prompts"] == [
        {"title": "Bug report", "text": "Steps: {{steps}}"},
        {"title": "Résumé", "text": "Summarise {{doc}} in 3 bullets."},
    ]

    other = _client(world["stranger"])
    imported = other.post("/prompts/import", {"file": _json_file(document), "scope": "personal"})
    assert imported.status_code == 302
    again = json.loads(other.get("/prompts/export.json").content)
    assert again["prompts"] == document["prompts"]
    # Importing the same file twice adds nothing.
    other.post("/prompts/import", {"file": _json_file(document), "scope": "personal"})
    assert SavedPrompt.objects.filter(owner=world["stranger"]).count() == 2


def test_team_export_import_is_for_curators_and_all_or_nothing(world):
    lead = _client(world["admin"])
    team = str(world["team"].pk)
    document = {
        "format": "kimichat.prompts.v1",
        "prompts": [{"title": "A", "text": "a {{x}}"}, {"title": "B", "text": "b"}],
    }
    assert (
        lead.post("/prompts/import", {"file": _json_file(document), "scope": team}).status_code
        == 302
    )
    assert SavedPrompt.objects.filter(team=world["team"]).count() == 2
    assert AuditEntry.objects.filter(action="prompt.created").count() == 2
    exported = json.loads(lead.get("/prompts/export.json", {"team": team}).content)
    assert exported["prompts"] == document["prompts"]
    assert AuditEntry.objects.filter(action="export.prompts").count() == 1

    member = _client(world["member"])
    assert member.get("/prompts/export.json", {"team": team}).status_code == 403
    assert (
        member.post("/prompts/import", {"file": _json_file(document), "scope": team}).status_code
        == 403
    )
    assert _client(world["stranger"]).get("/prompts/export.json", {"team": team}).status_code == 404

    # One bad entry: nothing is imported, and the reason names it.
    bad = {"prompts": [{"title": "C", "text": "c"}, {"title": "", "text": "d"}]}
    response = lead.post("/prompts/import", {"file": _json_file(bad), "scope": team})
    assert response.status_code == 400
    assert "Prompt 2: Give the prompt a title." in response.content.decode()
    assert not SavedPrompt.objects.filter(title="C").exists()
    not_json = SimpleUploadedFile("x.json", b"\x89PNG not json")
    response = lead.post("/prompts/import", {"file": not_json, "scope": team})
    assert response.status_code == 400 and "not JSON" in response.content.decode()
