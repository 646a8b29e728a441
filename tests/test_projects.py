"""Projects end to end: a team project's instructions and pinned images open every request of
its conversations byte for byte, with the project's affinity id (real websockets, the real HTTP
fake upstream); the window check counts that prefix; a team project never shows a member
another member's conversations; changes are audited."""

import json
import os

import pytest
from channels.db import database_sync_to_async
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from chatapp.models import Attachment, AuditEntry, Conversation, ModelConfig, Project, UsageRecord
from tests import image_factories as f
from tests.conftest import connect, receive_until
from tests.factories import conversation_create, team_create, user_create


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _team_project(*, pins: int = 2, instructions="Review screens against the design system."):
    """Team A (admin, two members) and its project with `pins` pinned screenshots, set up
    through the real HTTP views."""
    admin = user_create(username="lead")
    alice = user_create(username="alice")
    bob = user_create(username="bob")
    team = team_create(name="Design", members=[alice, bob], admins=[admin])
    lead = _client(admin)
    response = lead.post(
        "/projects/new",
        {"name": "Dashboard reviews", "scope": str(team.pk), "instructions": instructions},
    )
    assert response.status_code == 302, response.content
    project = Project.objects.get(name="Dashboard reviews")
    ids = []
    for number in range(pins):
        upload = lead.post(
            "/api/attachments/",
            {
                "file": SimpleUploadedFile(
                    f"screen{number}.png",
                    f.encode(f.screenshot(320 + 40 * number, 200), "PNG"),
                    content_type="image/png",
                )
            },
        )
        assert upload.status_code == 201, upload.content
        ids.append(upload.json()["id"])
    if ids:
        pinned = lead.post(
            f"/api/projects/{project.pk}/pins", {"attachments": ",".join(map(str, ids))}
        )
        assert pinned.status_code == 200, pinned.content
        assert [p["id"] for p in pinned.json()["pins"]] == ids
    return {"admin": admin, "alice": alice, "bob": bob, "team": team, "project": project}


def _new_chat(user, project) -> Conversation:
    response = _client(user).post(f"/projects/{project.pk}/new-chat")
    assert response.status_code == 302 and response["Location"].startswith("/c/")
    return Conversation.objects.get(pk=int(response["Location"].split("/")[2]))


def _compact(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.django_db(transaction=True)
async def test_two_conversations_in_a_project_send_byte_identical_prefixes(fake_upstream):
    world = await database_sync_to_async(_team_project)()
    project = world["project"]
    # Two members' conversations in the team project; the second has its own system prompt,
    # which comes after the project's prefix.
    first = await database_sync_to_async(_new_chat)(world["alice"], project)
    second = await database_sync_to_async(_new_chat)(world["bob"], project)
    await Conversation.objects.filter(pk=second.pk).aupdate(system_prompt="Answer briefly.")

    for user, conversation, text in (
        (world["alice"], first, "Question A"),
        (world["bob"], second, "Question B"),
    ):
        ws = await connect(user, conversation.pk)
        await ws.receive_json_from()
        await ws.send_json_to({"type": "send", "text": text})
        frames = await receive_until(ws, "reply.end", timeout=30)
        assert frames[-1]["message"]["status"] == "complete"
        await ws.disconnect()

    one, two = fake_upstream.chat_requests()
    # One affinity id for the whole project, not the conversations' own.
    assert one.headers["x-session-affinity"] == project.affinity_id
    assert two.headers["x-session-affinity"] == project.affinity_id
    assert project.affinity_id not in (first.affinity_id, second.affinity_id)

    messages = one.json["messages"]
    assert messages[0] == {"role": "system", "content": project.instructions}
    pinned = messages[1]
    assert pinned["role"] == "user"
    images = [p for p in pinned["content"] if p["type"] == "image_url"]
    assert len(images) == 2 and all(i["image_url"]["url"].startswith("data:image/") for i in images)
    assert messages[2] == {"role": "user", "content": "Question A"}
    assert two.json["messages"][2] == {"role": "system", "content": "Answer briefly."}
    assert two.json["messages"][3] == {"role": "user", "content": "Question B"}

    # The recorded request bodies start with the same bytes through the whole prefix
    # (model, instructions, every pinned image), at the same offset.
    prefix = _compact(messages[:2])[:-1]  # "[{system},{pinned}" without the closing bracket
    common = os.path.commonprefix([one.body, two.body])
    assert prefix in common
    assert common.index(prefix) == one.body.index(b'"messages":') + len(b'"messages":')


@pytest.mark.django_db(transaction=True)
async def test_the_window_check_counts_the_project_prefix(fake_upstream):
    instructions = "word " * 3900  # about 4,900 tokens of instructions
    world = await database_sync_to_async(_team_project)(pins=0, instructions=instructions)
    conversation = await database_sync_to_async(_new_chat)(world["alice"], world["project"])
    await ModelConfig.objects.filter(pk=conversation.model_id).aupdate(context_window=5000)
    ws = await connect(world["alice"], conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "hi"})
    frames = await receive_until(ws, "error", timeout=30)
    await ws.disconnect()
    assert frames[-1]["code"] == "context_full"
    assert fake_upstream.chat_requests() == []
    # Refused before anything was written (the check made before the turn counts the prefix).
    assert await conversation.messages.acount() == 0
    # Outside the project the same conversation fits.
    await Conversation.objects.filter(pk=conversation.pk).aupdate(project=None)
    ws = await connect(world["alice"], conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "hi"})
    frames = await receive_until(ws, "reply.end", timeout=30)
    await ws.disconnect()
    assert frames[-1]["message"]["status"] == "complete"


@pytest.mark.django_db
def test_a_team_project_never_shows_a_team_mates_conversation(fake_upstream):
    world = _team_project(pins=1)
    project = world["project"]
    secret = _new_chat(world["alice"], project)
    Conversation.objects.filter(pk=secret.pk).update(title="Alice private review")
    mine = _new_chat(world["bob"], project)
    Conversation.objects.filter(pk=mine.pk).update(title="Bob own review")

    for viewer in (world["bob"], world["admin"]):
        client = _client(viewer)
        page = client.get(f"/projects/{project.pk}/").content.decode()
        assert "Alice private review" not in page
        assert "Alice private review" not in client.get("/").content.decode()
        assert client.get(f"/c/{secret.pk}/").status_code == 404
    bob_page = _client(world["bob"]).get(f"/projects/{project.pk}/").content.decode()
    assert "Bob own review" in bob_page
    alice = _client(world["alice"])
    assert "Alice private review" in alice.get(f"/projects/{project.pk}/").content.decode()
    # The sidebar groups it under the project.
    home = alice.get("/").content.decode()
    group = home.split(f'data-project-id="{project.pk}"', 1)[1].split("</section>", 1)[0]
    assert "Alice private review" in group
    # Members see the pinned reference (it is the project's), strangers do not.
    pin = Attachment.objects.get(project_pin__project=project)
    assert _client(world["bob"]).get(f"/attachments/{pin.pk}/thumbnail/").status_code == 200
    stranger = user_create(username="stranger")
    assert _client(stranger).get(f"/attachments/{pin.pk}/thumbnail/").status_code == 404
    assert _client(stranger).get(f"/projects/{project.pk}/").status_code == 404


@pytest.mark.django_db
def test_new_chats_take_the_projects_defaults_and_moving_is_owner_only(fake_upstream):
    world = _team_project(pins=0)
    project = world["project"]
    model = ModelConfig.objects.get(model_id="fake-model")
    lead = _client(world["admin"])
    response = lead.post(
        f"/projects/{project.pk}/edit",
        {
            "name": "Dashboard reviews",
            "instructions": "New rules.",
            "default_model": str(model.pk),
            "max_output_tokens": "4096",
        },
    )
    assert response.status_code == 302
    conversation = _new_chat(world["alice"], project)
    assert conversation.model_id == model.pk
    assert conversation.max_output_tokens == 4096
    assert conversation.team_id == world["team"].pk

    # A bad budget is refused with the reason and the typed values kept.
    refused = lead.post(
        f"/projects/{project.pk}/edit",
        {"name": "Renamed", "instructions": "Kept text", "max_output_tokens": "12"},
    )
    assert refused.status_code == 400
    body = refused.content.decode()
    assert "output budget must be from 256" in body and "Kept text" in body
    project.refresh_from_db()
    assert project.name == "Dashboard reviews"

    # Moving: the owner of the conversation, into a project they may use.
    other = conversation_create(owner=world["alice"])
    alice = _client(world["alice"])
    moved = alice.post(f"/api/conversations/{other.pk}/project", {"project": str(project.pk)})
    assert moved.status_code == 200 and moved.json()["project"]["name"] == "Dashboard reviews"
    assert Conversation.objects.get(pk=other.pk).project_id == project.pk
    found = alice.get(f"/api/conversations/search?q=&project={project.pk}")
    assert found.status_code == 200
    out = alice.post(f"/api/conversations/{other.pk}/project", {"project": ""})
    assert out.status_code == 200 and Conversation.objects.get(pk=other.pk).project_id is None
    assert (
        _client(world["bob"])
        .post(f"/api/conversations/{other.pk}/project", {"project": str(project.pk)})
        .status_code
        == 404
    )
    personal = Project.objects.create(name="Mine", owner=world["bob"])
    assert (
        alice.post(
            f"/api/conversations/{other.pk}/project", {"project": str(personal.pk)}
        ).status_code
        == 404
    )

    # Every change is in the audit log with before -> after.
    actions = list(
        AuditEntry.objects.filter(object_type="chatapp.project").values_list("action", flat=True)
    )
    assert "project.created" in actions and "project.changed" in actions
    changed = AuditEntry.objects.get(action="project.changed")
    assert changed.changes["instructions"] == [
        "Review screens against the design system.",
        "New rules.",
    ]
    assert changed.changes["max_output_tokens"] == [None, 4096]
    assert changed.actor_id == world["admin"].pk and changed.address == "127.0.0.1"


@pytest.mark.django_db
def test_search_filters_by_project_and_the_page_shows_the_cache_share(fake_upstream):
    world = _team_project(pins=0)
    project = world["project"]
    inside = _new_chat(world["alice"], project)
    outside = conversation_create(owner=world["alice"])
    for conversation in (inside, outside):
        Conversation.objects.filter(pk=conversation.pk).update(title="quarterly dashboard")
    alice = _client(world["alice"])

    def ids(project_filter):
        response = alice.get(
            "/api/conversations/search", {"q": "quarterly", "project": project_filter}
        )
        assert response.status_code == 200
        return {r["id"] for r in response.json()["results"]}

    assert ids("") == {inside.pk, outside.pk}
    assert ids(str(project.pk)) == {inside.pk}
    assert ids("none") == {outside.pk}
    assert alice.get("/api/conversations/search", {"q": "x", "project": "abc"}).status_code == 400

    UsageRecord.objects.create(
        user=world["alice"], conversation=inside, prompt_tokens=1000, cached_tokens=750
    )
    page = alice.get(f"/projects/{project.pk}/").content.decode()
    assert 'id="cache-share">75%' in page


@pytest.mark.django_db
def test_deleting_a_project_keeps_its_conversations_and_drops_its_pins(fake_upstream):
    world = _team_project(pins=1)
    project = world["project"]
    conversation = _new_chat(world["alice"], project)
    pin = Attachment.objects.get(project_pin__project=project)
    assert _client(world["alice"]).post(f"/projects/{project.pk}/delete").status_code == 403
    response = _client(world["admin"]).post(f"/projects/{project.pk}/delete")
    assert response.status_code == 302
    assert not Project.objects.filter(pk=project.pk).exists()
    assert Conversation.objects.get(pk=conversation.pk).project_id is None
    assert not Attachment.objects.filter(pk=pin.pk).exists()
    assert AuditEntry.objects.filter(action="project.deleted").exists()


@pytest.mark.django_db(transaction=True)
async def test_someone_who_left_the_team_keeps_the_chat_not_the_projects_prefix(fake_upstream):
    from chatapp.models import Membership

    world = await database_sync_to_async(_team_project)(pins=1)
    # Alice's chat is charged to her other team; she put it in Design's project, then left Design.
    home = await database_sync_to_async(team_create)(name="Home", members=[world["alice"]])
    conversation = await database_sync_to_async(conversation_create)(
        owner=world["alice"], team=home, project=world["project"]
    )
    await Membership.objects.filter(user=world["alice"], team=world["team"]).adelete()
    ws = await connect(world["alice"], conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "still mine"})
    frames = await receive_until(ws, "reply.end", timeout=30)
    await ws.disconnect()
    assert frames[-1]["message"]["status"] == "complete"
    (request,) = fake_upstream.chat_requests()
    assert request.json["messages"] == [{"role": "user", "content": "still mine"}]
    assert request.headers["x-session-affinity"] == conversation.affinity_id
    page = await database_sync_to_async(lambda: _client(world["alice"]).get("/").content)()
    assert b"Dashboard reviews" not in page
    assert f'href="/c/{conversation.pk}/"'.encode() in page  # listed outside any project


@pytest.mark.django_db(transaction=True)
async def test_a_pinned_reference_is_not_sent_removed_or_purged_as_an_upload(fake_upstream):
    from datetime import timedelta

    from chatapp.attachments import attachments_purge_unsent

    world = await database_sync_to_async(_team_project)(pins=1)
    pin = await Attachment.objects.aget(project_pin__project=world["project"])
    # Its uploader cannot send it as a message's image, nor remove it from the composer.
    conversation = await database_sync_to_async(conversation_create)(owner=world["admin"])
    ws = await connect(world["admin"], conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "look", "attachments": [pin.pk]})
    frames = await receive_until(ws, "error", timeout=30)
    await ws.disconnect()
    assert frames[-1]["code"] == "attachment_unavailable"
    removed = await database_sync_to_async(
        lambda: _client(world["admin"]).delete(f"/api/attachments/{pin.pk}/")
    )()
    assert removed.status_code == 400 and "pinned" in removed.json()["message"]
    # Older than the unsent-upload TTL: still kept, it belongs to the project.
    await database_sync_to_async(attachments_purge_unsent)(older_than=timedelta(seconds=-1))
    assert await Attachment.objects.filter(pk=pin.pk).aexists()
    assert fake_upstream.chat_requests() == []


@pytest.mark.django_db
def test_staff_sidebar_shows_their_teams_projects_not_every_teams(fake_upstream):
    world = _team_project(pins=0)
    staff = user_create(username="root", is_staff=True)
    client = _client(staff)
    assert "Dashboard reviews" not in client.get("/").content.decode()
    # They may still open and curate it (from the projects page).
    assert "Dashboard reviews" in client.get("/projects/").content.decode()
    assert client.get(f"/projects/{world['project'].pk}/").status_code == 200
    assert "Dashboard reviews" in _client(world["alice"]).get("/").content.decode()
