"""The HTTP side: login, the chat page with its history, starting a conversation."""

import json

import pytest
from django.core.management import call_command
from django.urls import reverse

from chatapp.conversations import title_from_text
from chatapp.models import Conversation, Message
from tests.factories import conversation_create, user_create

pytestmark = pytest.mark.django_db


def test_no_migrations_are_missing():
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


def test_pages_require_login(client):
    response = client.get("/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert client.post("/api/conversations/").status_code == 302


def test_login_then_the_chat_page(client):
    user_create(username="ada", password="correct horse battery")
    response = client.post("/login/", {"username": "ada", "password": "correct horse battery"})
    assert response.status_code == 302 and response["Location"] == "/"
    page = client.get("/")
    html = page.content.decode()
    assert 'aria-label="Model"' in html and "Demo (offline)" in html
    assert "New chat" in html and 'aria-label="Message"' in html


def test_wrong_password_is_refused_with_a_message(client):
    user_create(username="ada", password="correct horse battery")
    response = client.post("/login/", {"username": "ada", "password": "nope"})
    assert response.status_code == 200
    assert (
        "didn&#x27;t match" in response.content.decode()
        or "correct username" in response.content.decode()
    )


def test_conversation_page_shows_history_newest_conversation_first(client):
    user = user_create()
    older = conversation_create(owner=user, title="Older")
    newer = conversation_create(owner=user, title="Newer")
    Message.objects.create(conversation=older, role="user", content="<script>alert(1)</script>")
    Message.objects.create(conversation=older, role="assistant", content="**bold** reply")
    Conversation.objects.filter(pk=newer.pk).update(title="Newer")  # touches updated_at
    client.force_login(user)
    html = client.get(f"/c/{older.pk}/").content.decode()
    assert html.index("Newer") < html.index(">Older<")
    data = json.loads(
        html.split('<script id="page-data" type="application/json">')[1].split("</script>")[0]
    )
    assert [m["content"] for m in data["messages"]] == [
        "<script>alert(1)</script>",
        "**bold** reply",
    ]
    assert "<script>alert(1)" not in html  # escaped inside the JSON island


def test_another_users_conversation_page_is_404(client):
    conversation = conversation_create(owner=user_create())
    client.force_login(user_create())
    assert client.get(f"/c/{conversation.pk}/").status_code == 404


def test_new_conversation_gets_the_default_model_and_an_affinity_id(client):
    user = user_create()
    client.force_login(user)
    response = client.post(reverse("conversation-new"))
    assert response.status_code == 201
    conversation = Conversation.objects.get(pk=response.json()["id"])
    assert conversation.owner == user
    assert conversation.model.display_name == "Demo (offline)"
    assert conversation.affinity_id.startswith("ses_") and len(conversation.affinity_id) == 36
    other = Conversation.objects.get(pk=client.post(reverse("conversation-new")).json()["id"])
    assert other.affinity_id != conversation.affinity_id


def test_real_model_is_the_default_and_demo_is_listed_last(client, fake_upstream):
    client.force_login(user_create())
    html = client.get("/").content.decode()
    assert html.index("fake-model") < html.index("Demo (offline)")
    conversation = Conversation.objects.get(
        pk=client.post(reverse("conversation-new")).json()["id"]
    )
    assert conversation.model.model_id == "fake-model"


def test_create_needs_csrf(client):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user_create())
    assert strict.post(reverse("conversation-new")).status_code == 403


def test_title_is_the_first_line_trimmed():
    assert title_from_text("\n   Why is   the sky blue?  \nmore") == "Why is the sky blue?"
    assert len(title_from_text("x" * 500)) == 80


def test_healthz(client):
    assert client.get("/healthz").json()["database"] == "ok"
