"""Sharing a conversation: share, follow live, revoke, and "Continue as my copy".

Real ASGI stack, real websockets (Channels' communicator through chatapp.asgi), the real fake
upstream over HTTP, and the configured database and channel layer (SQLite + in-memory by
default; PostgreSQL + Redis in the production-shape run). The two-process revoke is in
tests/test_sharing_multiprocess.py.
"""

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from chatapp.asgi import application
from chatapp.attachments import attachment_create, media_path
from chatapp.images import process_upload
from chatapp.models import (
    Attachment,
    AuditEntry,
    Conversation,
    ConversationShare,
    Message,
    StoredImage,
)
from tests.conftest import HOST, ORIGIN, connect, receive_until, session_cookie
from tests.factories import conversation_create, team_create, user_create
from tests.fake_upstream import stream_reply
from tests.image_factories import encode, screenshot
from tests.test_streams import Viewer

pytestmark = pytest.mark.django_db(transaction=True)


def _world():
    owner = user_create(username="sharer")
    mate = user_create(username="mate")
    chosen = user_create(username="chosen")
    stranger = user_create(username="stranger")
    team = team_create(name="Design", members=[owner, mate, chosen])
    team_create(name="Elsewhere", members=[stranger])
    conversation = conversation_create(owner=owner, team=team, title="Dashboard review")
    return owner, mate, chosen, stranger, team, conversation


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


async def open_shared(user, share_id: int):
    headers = [HOST, ORIGIN, (b"cookie", await database_sync_to_async(session_cookie)(user))]
    ws = WebsocketCommunicator(application, f"/ws/shared/{share_id}/", headers=headers)
    connected, code = await ws.connect(timeout=10)
    return connected, code, ws


def _share(owner, conversation, **data) -> dict:
    response = _client(owner).post(f"/api/conversations/{conversation.pk}/shares", data)
    assert response.status_code == 201, response.content
    return response.json()


# ---- share, watch live, revoke ----------------------------------------------------------------


async def test_team_mate_follows_a_streaming_reply_live_then_revoke_closes_the_view(
    fake_upstream,
):
    owner, mate, _, stranger, _, conversation = await database_sync_to_async(_world)()
    share = await database_sync_to_async(_share)(owner, conversation, scope="team")
    assert share["audience"] == "everyone in Design"

    tokens = [f"tok{i} " for i in range(60)]
    fake_upstream.enqueue(stream_reply(tokens, delay=0.02, reasoning=["hmm ", "ok "]))
    owner_ws = await connect(owner, conversation.pk)
    assert (await owner_ws.receive_json_from())["type"] == "state"
    await owner_ws.send_json_to({"type": "send", "text": "how is the dashboard?"})
    await receive_until(owner_ws, "delta", timeout=30)

    # The team mate opens the shared view mid-reply: the snapshot, then every later delta once.
    connected, _, viewer_ws = await open_shared(mate, share["id"])
    assert connected
    viewer = Viewer()
    state = await viewer_ws.receive_json_from(timeout=10)
    assert state["type"] == "state" and state["reply"] is not None
    viewer.apply(state)
    # Joined while it streamed: the snapshot holds what was written so far.
    assert state["reply"]["seq"] >= 1 and (state["reply"]["reasoning"] or viewer.text)
    frames = await receive_until(viewer_ws, "reply.end", timeout=30)
    for frame in frames:
        viewer.apply(frame)
    assert any(f["type"] == "delta" for f in frames)  # followed live, not only the end
    assert viewer.final["status"] == "complete" and viewer.text == "".join(tokens)
    assert viewer.final["reasoning"] == "hmm ok "

    # Read-only: every command that would change anything is refused, and changes nothing.
    for frame in (
        {"type": "send", "text": "let me in"},
        {"type": "stop"},
        {"type": "regenerate", "message_id": viewer.final["id"]},
        {"type": "edit", "message_id": viewer.final["id"] - 1, "text": "x"},
    ):
        await viewer_ws.send_json_to(frame)
        error = (await receive_until(viewer_ws, "error"))[-1]
        assert error["code"] == "read_only" and "read-only" in error["message"]
    assert await Message.objects.filter(conversation=conversation).acount() == 2

    # The page itself, for the team mate (and never for a stranger).
    page = await database_sync_to_async(lambda: _client(mate).get(share["url"]))()
    assert page.status_code == 200
    body = page.content.decode()
    assert "Shared by <strong>sharer</strong>" in body and "".join(tokens) in body
    stranger_page = await database_sync_to_async(lambda: _client(stranger).get(share["url"]))()
    assert stranger_page.status_code == 404

    # Revoke: the open view is told and closed at once, and the URL then 404s.
    revoke = await database_sync_to_async(
        lambda: _client(owner).post(f"/api/shares/{share['id']}/revoke")
    )()
    assert revoke.status_code == 200
    frames = await receive_until(viewer_ws, "share.revoked", timeout=10)
    assert "no longer shared" in frames[-1]["message"]
    assert (await viewer_ws.receive_output(timeout=10))["type"] == "websocket.close"
    await viewer_ws.disconnect()
    gone = await database_sync_to_async(lambda: _client(mate).get(share["url"]))()
    assert gone.status_code == 404
    connected, code, _ = await open_shared(mate, share["id"])
    assert not connected and code == 4403
    # The owner's own socket is untouched.
    await owner_ws.send_json_to({"type": "ping"})
    assert (await receive_until(owner_ws, "pong"))[-1]["type"] == "pong"
    await owner_ws.disconnect()

    actions = [
        a
        async for a in AuditEntry.objects.filter(action__startswith="share.")
        .order_by("id")
        .values_list("action", "actor_name", "object_id")
    ]
    assert actions == [
        ("share.created", "sharer", str(share["id"])),
        ("share.revoked", "sharer", str(share["id"])),
    ]


async def test_deleting_a_shared_conversation_closes_its_open_views():
    owner, mate, _, _, _, conversation = await database_sync_to_async(_world)()
    share = await database_sync_to_async(_share)(owner, conversation, scope="team")
    connected, _, viewer_ws = await open_shared(mate, share["id"])
    assert connected and (await viewer_ws.receive_json_from())["type"] == "state"
    response = await database_sync_to_async(
        lambda: _client(owner).post(f"/api/conversations/{conversation.pk}/delete")
    )()
    assert response.status_code == 200
    await receive_until(viewer_ws, "share.revoked", timeout=10)
    await viewer_ws.disconnect()
    assert not await ConversationShare.objects.filter(pk=share["id"]).aexists()


def test_chosen_members_only_and_who_it_is_shared_with():
    owner, mate, chosen, stranger, _, conversation = _world()
    options = _client(owner).get(f"/api/conversations/{conversation.pk}/shares").json()
    assert options["team"]["name"] == "Design"
    assert [m["username"] for m in options["members"]] == ["chosen", "mate"]
    assert options["shares"] == []

    # Only members of the conversation's team can be chosen.
    refused = _client(owner).post(
        f"/api/conversations/{conversation.pk}/shares",
        {"scope": "members", "members": str(stranger.pk)},
    )
    assert refused.status_code == 400 and refused.json()["code"] == "not_a_member"
    empty = _client(owner).post(
        f"/api/conversations/{conversation.pk}/shares", {"scope": "members", "members": ""}
    )
    assert empty.status_code == 400 and empty.json()["code"] == "no_members"

    share = _share(owner, conversation, scope="members", members=str(chosen.pk))
    assert share["audience"] == "chosen"
    assert _client(chosen).get(share["url"]).status_code == 200
    assert _client(mate).get(share["url"]).status_code == 404  # a team mate not chosen
    assert _client(stranger).get(share["url"]).status_code == 404
    listed = _client(owner).get(f"/api/conversations/{conversation.pk}/shares").json()["shares"]
    assert [(s["id"], s["members"]) for s in listed] == [(share["id"], ["chosen"])]
    # Only the owner manages it.
    assert _client(chosen).post(f"/api/shares/{share['id']}/revoke").status_code == 404
    assert _client(chosen).get(f"/api/conversations/{conversation.pk}/shares").status_code == 404
    entry = AuditEntry.objects.get(action="share.created")
    assert entry.changes["members"] == ["chosen"] and entry.changes["team"] == "Design"
    # Staff see it in the admin, read-only.
    staff = user_create(username="root", is_staff=True, is_superuser=True)
    listing = _client(staff).get("/admin/chatapp/conversationshare/").content.decode()
    assert "Dashboard review" in listing and "chosen" in listing
    change = _client(staff).get(f"/admin/chatapp/conversationshare/{share['id']}/change/")
    assert change.status_code == 200 and 'name="_save"' not in change.content.decode()


def test_a_conversation_without_a_team_cannot_be_shared():
    owner = user_create(username="loner")
    conversation = conversation_create(owner=owner)
    options = _client(owner).get(f"/api/conversations/{conversation.pk}/shares").json()
    assert options["team"] is None and "not charged to a team" in options["reason"]
    response = _client(owner).post(
        f"/api/conversations/{conversation.pk}/shares", {"scope": "team"}
    )
    assert response.status_code == 400 and response.json()["code"] == "no_team"
    assert not ConversationShare.objects.exists()


def test_leaving_the_team_ends_access_through_its_share():
    owner, mate, _, _, team, conversation = _world()
    share = _share(owner, conversation, scope="team")
    assert _client(mate).get(share["url"]).status_code == 200
    mate.memberships.filter(team=team).delete()
    assert _client(mate).get(share["url"]).status_code == 404


# ---- images through a share ---------------------------------------------------------------------


def _image_message(conversation, owner) -> tuple[Message, Attachment]:
    question = Message.objects.create(conversation=conversation, role="user", content="see this")
    attachment = attachment_create(
        owner=owner,
        conversation=conversation,
        filename="chart.png",
        processed=process_upload(encode(screenshot(320, 200), "PNG")),
    )
    attachment.message = question
    attachment.save(update_fields=["message"])
    return question, attachment


def test_images_are_readable_through_a_live_share_only():
    owner, mate, chosen, stranger, _, conversation = _world()
    _, attachment = _image_message(conversation, owner)
    urls = [f"/attachments/{attachment.pk}/thumbnail/", f"/attachments/{attachment.pk}/image/0/"]
    for url in urls:
        assert _client(mate).get(url).status_code == 404  # not shared yet
    share = _share(owner, conversation, scope="members", members=str(chosen.pk))
    for url in urls:
        assert _client(chosen).get(url).status_code == 200
        assert _client(mate).get(url).status_code == 404
        assert _client(stranger).get(url).status_code == 404
    # The composer's remove stays the uploader's only.
    assert _client(chosen).delete(f"/api/attachments/{attachment.pk}/").status_code == 404
    _client(owner).post(f"/api/shares/{share['id']}/revoke")
    for url in urls:
        assert _client(chosen).get(url).status_code == 404


# ---- "Continue as my copy" ------------------------------------------------------------------------


async def test_fork_from_the_middle_copies_up_to_there_and_continues_upstream(fake_upstream):
    def build():
        owner, mate, _, _, team, conversation = _world()
        conversation.system_prompt = "Be brief."
        conversation.save()
        question, attachment = _image_message(conversation, owner)
        first = Message.objects.create(
            conversation=conversation,
            role="assistant",
            content="The chart dips in May.",
            reasoning="looking at the chart",
            model=conversation.model,
        )
        Message.objects.create(conversation=conversation, role="user", content="why?")
        Message.objects.create(
            conversation=conversation, role="assistant", content="Late invoices."
        )
        share = _share(owner, conversation, scope="team")
        return owner, mate, team, conversation, attachment, first, share

    owner, mate, team, conversation, attachment, first, share = await database_sync_to_async(
        build
    )()
    response = await database_sync_to_async(
        lambda: _client(mate).post(f"/api/shared/{share['id']}/fork", {"message": first.pk})
    )()
    assert response.status_code == 201, response.content
    copy = await Conversation.objects.select_related("team").aget(pk=response.json()["id"])
    assert response.json()["url"] == f"/c/{copy.pk}/"
    assert copy.owner_id == mate.pk and copy.team_id == team.pk
    assert copy.affinity_id != conversation.affinity_id
    assert copy.title == "Dashboard review (copy)" and copy.system_prompt == "Be brief."
    rows = [
        (m.role, m.content)
        async for m in Message.objects.filter(conversation=copy).order_by("created_at", "id")
    ]
    assert rows == [("user", "see this"), ("assistant", "The chart dips in May.")]

    # Images referenced, not duplicated: the same stored rows, readable by the forker.
    twin = await Attachment.objects.aget(conversation=copy)
    assert twin.owner_id == mate.pk and twin.pk != attachment.pk
    assert twin.thumbnail_id == attachment.thumbnail_id
    stored = await StoredImage.objects.acount()
    for url in (f"/attachments/{twin.pk}/thumbnail/", f"/attachments/{twin.pk}/image/0/"):
        got = await database_sync_to_async(lambda url=url: _client(mate).get(url))()
        assert got.status_code == 200
    entry = await AuditEntry.objects.aget(action="conversation.forked")
    assert entry.actor_id == mate.pk and entry.object_id == str(copy.pk)
    assert entry.changes["up_to_message"] == first.pk

    # The next send from the copy goes upstream with the copied history, under the copy's id.
    fake_upstream.enqueue(stream_reply(["Because ", "of invoices."]))
    ws = await connect(mate, copy.pk)
    assert (await ws.receive_json_from())["type"] == "state"
    await ws.send_json_to({"type": "send", "text": "and June?"})
    end = (await receive_until(ws, "reply.end", timeout=30))[-1]
    assert end["message"]["content"] == "Because of invoices."
    await ws.disconnect()
    request = fake_upstream.chat_requests()[-1]
    assert request.headers["x-session-affinity"] == copy.affinity_id
    sent = request.json["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[0]["content"] == "Be brief."
    assert any(p.get("type") == "image_url" for p in sent[1]["content"])
    assert sent[2]["content"] == "The chart dips in May."
    assert sent[3]["content"] == "and June?"
    assert "Late invoices." not in str(sent)

    # Deleting either conversation keeps the other's images.
    def delete_source():
        response = _client(owner).post(f"/api/conversations/{conversation.pk}/delete")
        assert response.status_code == 200

    await database_sync_to_async(delete_source)()
    assert await StoredImage.objects.acount() == stored
    thumb = await StoredImage.objects.aget(pk=twin.thumbnail_id)
    assert media_path(thumb.path).exists()
    got = await database_sync_to_async(
        lambda: _client(mate).get(f"/attachments/{twin.pk}/image/0/")
    )()
    assert got.status_code == 200


def test_deleting_the_copy_keeps_the_original_images():
    owner, mate, _, _, _, conversation = _world()
    _, attachment = _image_message(conversation, owner)
    Message.objects.create(conversation=conversation, role="assistant", content="ok")
    share = _share(owner, conversation, scope="team")
    copy_id = _client(mate).post(f"/api/shared/{share['id']}/fork").json()["id"]
    assert _client(mate).post(f"/api/conversations/{copy_id}/delete").status_code == 200
    assert _client(owner).get(f"/attachments/{attachment.pk}/image/0/").status_code == 200
    thumb = StoredImage.objects.get(pk=attachment.thumbnail_id)
    assert media_path(thumb.path).exists()


def test_fork_refuses_a_question_a_streaming_reply_and_another_conversations_message():
    owner, mate, _, _, _, conversation = _world()
    question = Message.objects.create(conversation=conversation, role="user", content="q")
    streaming = Message.objects.create(
        conversation=conversation, role="assistant", status="streaming"
    )
    other = conversation_create(owner=owner)
    elsewhere = Message.objects.create(conversation=other, role="assistant", content="x")
    share = _share(owner, conversation, scope="team")
    url = f"/api/shared/{share['id']}/fork"
    for message, code in (
        (question.pk, "bad_message"),
        (streaming.pk, "busy"),
        (elsewhere.pk, "bad_message"),
        ("", "nothing_to_copy"),
    ):
        response = _client(mate).post(url, {"message": message})
        assert response.status_code == 400 and response.json()["code"] == code
    assert Conversation.objects.filter(owner=mate).count() == 0
