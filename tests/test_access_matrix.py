"""Who may do what: every URL and websocket action x every kind of visitor, exact statuses.

The rule (access.conversation_get_for_user): only the owner, while active, sees or uses
a conversation; same-team members, team admins and staff get 404 / close 4403 like strangers.
Through a share (access.share_get_for_viewer) the share's readers read it, read-only: the
members of team A (the team admin too), or only the chosen member; never staff or other teams.

To cover a new URL, add one Case to URL_CASES: the method, a function building the path from the
`world` (and optionally the POST data), and the expected result for each role: a status code, or
(status, start of the Location header) for redirects.
"""

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import get_resolver

from chatapp import accounts
from chatapp.models import Message
from tests.conftest import open_socket, receive_until
from tests.factories import conversation_create, team_create, user_create

ROLES = ("owner", "member", "other_team", "team_admin", "staff", "anonymous", "deactivated")
LOGIN = (302, "/login/")
ADMIN_LOGIN = (302, "/admin/login/")


def build_world() -> dict:
    owner = user_create(username="owner")
    member = user_create(username="member")
    team_admin = user_create(username="teamadmin")
    other = user_create(username="other")
    staff = user_create(username="staff", is_staff=True, is_superuser=True)
    deactivated = user_create(username="gone")
    team = team_create(name="A", members=[owner, member, deactivated], admins=[team_admin])
    other_team = team_create(name="B", members=[other])
    conversation = conversation_create(owner=owner, team=team)
    question = Message.objects.create(
        conversation=conversation, role="user", content="private question"
    )
    reply = Message.objects.create(
        conversation=conversation, role="assistant", content="private answer"
    )
    get_user_model().objects.filter(pk=deactivated.pk).update(is_active=False)
    return {
        "users": {
            "owner": owner,
            "member": member,
            "other_team": other,
            "team_admin": team_admin,
            "staff": staff,
            "anonymous": None,
            "deactivated": deactivated,
        },
        "team": team,
        "other_team": other_team,
        "conversation": conversation,
        "reply": reply,
        "question": question,
        "batch": _batch(owner, team),
    }


def _png_upload():
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.image_factories import encode, screenshot

    return SimpleUploadedFile("shot.png", encode(screenshot(64, 48), "PNG"))


def _pdf_upload():
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.media_factories import minimal_pdf

    return SimpleUploadedFile("doc.pdf", minimal_pdf(2))


def _image(world: dict, *, sent: bool) -> int:
    """An image the owner uploaded: sent in the conversation, or still in the composer."""
    from chatapp.attachments import attachment_create
    from chatapp.images import process_upload
    from tests.image_factories import encode, screenshot

    attachment = attachment_create(
        owner=world["users"]["owner"],
        conversation=world["conversation"],
        filename="shot.png",
        processed=process_upload(encode(screenshot(64, 48), "PNG")),
    )
    if sent:
        attachment.message = world["conversation"].messages.filter(role="user").first()
        attachment.save(update_fields=["message"])
    return attachment.pk


def _sso(world: dict) -> str:
    """An identity provider at the real test provider; -> its slug."""
    from chatapp.models import OIDCProvider
    from tests.idp import SECRET

    OIDCProvider.objects.create(
        slug="company",
        label="SSO",
        issuer=world["idp"].issuer,
        client_id="kimichat",
        client_secret=SECRET,
    )
    return "company"


def _batch(owner, team):
    """A finished batch of the owner's with one answered item (its image private too)."""
    from chatapp.attachments import attachment_create
    from chatapp.images import process_upload
    from chatapp.models import Batch, BatchItem
    from tests.image_factories import encode, screenshot

    attachment = attachment_create(
        owner=owner,
        conversation=None,
        filename="receipt.png",
        processed=process_upload(encode(screenshot(64, 48), "PNG")),
    )
    batch = Batch.objects.create(
        owner=owner, team=team, question="private batch question", status="complete"
    )
    BatchItem.objects.create(
        batch=batch,
        position=1,
        attachment=attachment,
        filename="receipt.png",
        status="done",
        answer="private answer",
    )
    return batch


def _batch_item(world: dict) -> int:
    return world["batch"].items.first().pk


# ---- sharing (issue 16) ----


def _share(world: dict, *, chosen: bool = False, revoked: bool = False) -> int:
    """A share of the owner's conversation with team A (or with the member only, chosen)."""
    from django.utils import timezone

    from chatapp.models import ConversationShare

    share = ConversationShare.objects.create(
        conversation=world["conversation"],
        shared_by=world["users"]["owner"],
        team=world["team"],
        revoked_at=timezone.now() if revoked else None,
    )
    if chosen:
        share.members.set([world["users"]["member"]])
    return share.pk


def _shared_image(world: dict) -> int:
    """A sent image of the shared conversation (a team share exists)."""
    _share(world)
    return _image(world, sent=True)


def _shares_admin(world: dict) -> str:
    """The admin's list of shares, with one in it."""
    _share(world, chosen=True)
    return "/admin/chatapp/conversationshare/"


# Team share: its team's members read it (team A: member, and team_admin as a member of A).
SHARE_READERS = {"owner": 200, "member": 200, "team_admin": 200}
# Chosen members (the member only): the team admin is a team mate who was not chosen.
CHOSEN_READERS = {"owner": 200, "member": 200}

# ---- end sharing ----


def client_for(world: dict, role: str) -> Client:
    client = Client()
    user = world["users"][role]
    if user is not None:
        # The deactivated user keeps a session from before (deactivation ends them, but a
        # leftover one must not work either).
        client.force_login(user, backend="django.contrib.auth.backends.ModelBackend")
    return client


@dataclass
class Case:
    method: str
    path: Callable[[dict], str]
    expect: dict
    data: Callable[[dict], dict] = field(default=lambda world: {})
    # The route this case covers (for the completeness check below).
    route: str = ""
    # Fixtures the case needs, put into the world by name (e.g. the identity provider).
    fixtures: tuple[str, ...] = ()
    # Roles that read the conversation here (through a share): its text may be in the answer.
    readers: tuple[str, ...] = ()


def every(status, *, anonymous=LOGIN, deactivated=LOGIN) -> dict:
    expect = {role: status for role in ROLES}
    expect.update(anonymous=anonymous, deactivated=deactivated)
    return expect


def only(allowed: dict, *, others, anonymous=LOGIN, deactivated=LOGIN) -> dict:
    expect = {role: others for role in ROLES}
    expect.update(allowed, anonymous=anonymous, deactivated=deactivated)
    return expect


URL_CASES = {
    "home": Case("get", lambda w: "/", every(200), route=""),
    "conversation": Case(
        "get",
        lambda w: f"/c/{w['conversation'].pk}/",
        only({"owner": 200}, others=404),
        route="c/<int:pk>/",
    ),
    "conversation-new": Case(
        "post", lambda w: "/api/conversations/", every(201), route="api/conversations/"
    ),
    "login-page": Case(
        "get",
        lambda w: "/login/",
        every((302, "/"), anonymous=200, deactivated=200),
        route="login/",
    ),
    "oidc-login": Case(
        "get",
        lambda w: f"/login/oidc/{_sso(w)}/",
        every(
            (302, "http://127.0.0.1:"),
            anonymous=(302, "http://127.0.0.1:"),
            deactivated=(302, "http://127.0.0.1:"),
        ),
        route="login/oidc/<slug:slug>/",
        fixtures=("idp",),
    ),
    # A callback without the state this browser was given: refused for everyone, nobody logged
    # in or out by it.
    "oidc-callback": Case(
        "get",
        lambda w: f"/login/oidc/{_sso(w)}/callback/?code=stolen&state=forged",
        every(400, anonymous=400, deactivated=400),
        route="login/oidc/<slug:slug>/callback/",
        fixtures=("idp",),
    ),
    "logout": Case("post", lambda w: "/logout/", every(LOGIN), route="logout/"),
    "set-password": Case(
        "get",
        lambda w: w["set_password_link"],
        every(
            (302, "/set-password/"),
            anonymous=(302, "/set-password/"),
            deactivated=(302, "/set-password/"),
        ),
        route="set-password/<uidb64>/<token>/",
    ),
    "set-password-done": Case(
        "get",
        lambda w: "/set-password/done/",
        every(200, anonymous=200, deactivated=200),
        route="set-password/done/",
    ),
    "settings": Case("get", lambda w: "/settings/", every(200), route="settings/"),
    "settings-team": Case(
        "post",
        lambda w: "/settings/team/",
        only(
            {
                "owner": (302, "/settings/"),
                "member": (302, "/settings/"),
                "team_admin": (302, "/settings/"),
            },
            others=404,
        ),
        data=lambda w: {"team": w["team"].pk},
        route="settings/team/",
    ),
    "team": Case(
        "get",
        lambda w: "/team/",
        only({"team_admin": 200, "staff": 200}, others=403),
        route="team/",
    ),
    "team-member-active": Case(
        "post",
        lambda w: f"/team/members/{w['users']['owner'].pk}/active/",
        only({"team_admin": (302, "/team/"), "staff": (302, "/team/")}, others=403),
        data=lambda w: {"active": "0"},
        route="team/members/<int:user_id>/active/",
    ),
    "usage": Case("get", lambda w: "/usage/", only({"staff": 200}, others=403), route="usage/"),
    "usage-csv": Case(
        "get", lambda w: "/usage.csv", only({"staff": 200}, others=403), route="usage.csv"
    ),
    "audit": Case("get", lambda w: "/audit/", only({"staff": 200}, others=403), route="audit/"),
    "audit-csv": Case(
        "get", lambda w: "/audit.csv", only({"staff": 200}, others=403), route="audit.csv"
    ),
    "admin-logout": Case(
        "post",
        lambda w: "/admin/logout/",
        every(ADMIN_LOGIN, anonymous=ADMIN_LOGIN, deactivated=ADMIN_LOGIN),
        route="admin/logout/",
    ),
    "healthz": Case(
        "get", lambda w: "/healthz", every(200, anonymous=200, deactivated=200), route="healthz"
    ),
    "admin": Case(
        "get",
        lambda w: "/admin/",
        only({"staff": 200}, others=ADMIN_LOGIN, anonymous=ADMIN_LOGIN, deactivated=ADMIN_LOGIN),
        route="admin/",
    ),
    "attachment-upload": Case(
        "post",
        lambda w: "/api/attachments/",
        every(201, anonymous=401, deactivated=401),
        data=lambda w: {"file": _png_upload()},
        route="api/attachments/",
    ),
    "attachment-pdf-preview": Case(
        "post",
        lambda w: "/api/attachments/pdf-preview/",
        every(200, anonymous=401, deactivated=401),
        data=lambda w: {"file": _pdf_upload()},
        route="api/attachments/pdf-preview/",
    ),
    "attachment-remove": Case(
        "delete",
        lambda w: f"/api/attachments/{_image(w, sent=False)}/",
        only({"owner": 200}, others=404, anonymous=401, deactivated=401),
        route="api/attachments/<int:pk>/",
    ),
    "attachment-thumbnail": Case(
        "get",
        lambda w: f"/attachments/{_image(w, sent=True)}/thumbnail/",
        only({"owner": 200}, others=404, anonymous=404, deactivated=404),
        route="attachments/<int:pk>/thumbnail/",
    ),
    "attachment-image": Case(
        "get",
        lambda w: f"/attachments/{_image(w, sent=True)}/image/0/",
        only({"owner": 200}, others=404, anonymous=404, deactivated=404),
        route="attachments/<int:pk>/image/<int:part>/",
    ),
    "conversation-search": Case(
        "get",
        lambda w: "/api/conversations/search?q=answer",
        every(200),
        route="api/conversations/search",
    ),
    "conversation-rename": Case(
        "post",
        lambda w: f"/api/conversations/{w['conversation'].pk}/rename",
        only({"owner": 200}, others=404),
        data=lambda w: {"title": "renamed"},
        route="api/conversations/<int:pk>/rename",
    ),
    "conversation-settings": Case(
        "post",
        lambda w: f"/api/conversations/{w['conversation'].pk}/settings",
        only({"owner": 200}, others=404),
        data=lambda w: {"system_prompt": "be brief"},
        route="api/conversations/<int:pk>/settings",
    ),
    "conversation-delete": Case(
        "post",
        lambda w: f"/api/conversations/{w['conversation'].pk}/delete",
        only({"owner": 200}, others=404),
        route="api/conversations/<int:pk>/delete",
    ),
    "conversation-export-md": Case(
        "get",
        lambda w: f"/c/{w['conversation'].pk}/export.md",
        only({"owner": 200}, others=404),
        route="c/<int:pk>/export.md",
    ),
    "conversation-export-json": Case(
        "get",
        lambda w: f"/c/{w['conversation'].pk}/export.json",
        only({"owner": 200}, others=404),
        route="c/<int:pk>/export.json",
    ),
    "admin-models-refresh": Case(
        "post",
        lambda w: "/admin/chatapp/modelconfig/refresh/",
        only(
            {"staff": (302, "/admin/chatapp/modelconfig/")},
            others=ADMIN_LOGIN,
            anonymous=ADMIN_LOGIN,
            deactivated=ADMIN_LOGIN,
        ),
        route="admin/",
    ),
    "batches": Case("get", lambda w: "/batches/", every(200), route="batches/"),
    "batch": Case(
        "get",
        lambda w: f"/batches/{w['batch'].pk}/",
        only({"owner": 200}, others=404),
        route="batches/<int:pk>/",
    ),
    "batch-files": Case(
        "post",
        lambda w: "/api/batches/files",
        every(201, anonymous=401, deactivated=401),
        data=lambda w: {"file": _png_upload()},
        route="api/batches/files",
    ),
    # An empty JSON body: a 400 with a message for anyone logged in (nothing to estimate).
    "batch-estimate": Case(
        "post", lambda w: "/api/batches/estimate", every(400), route="api/batches/estimate"
    ),
    "batch-create": Case("post", lambda w: "/api/batches/", every(400), route="api/batches/"),
    "batch-delete": Case(
        "post",
        lambda w: f"/api/batches/{w['batch'].pk}/delete",
        only({"owner": 200}, others=404),
        route="api/batches/<int:pk>/delete",
    ),
    # The batch is complete: retry has nothing to do (400) for its owner; 404 for everyone else.
    "batch-action": Case(
        "post",
        lambda w: f"/api/batches/{w['batch'].pk}/retry",
        only({"owner": 400}, others=404, anonymous=401, deactivated=401),
        route="api/batches/<int:pk>/<str:action>",
    ),
    "batch-item-open": Case(
        "post",
        lambda w: f"/api/batches/{w['batch'].pk}/items/{_batch_item(w)}/open",
        only({"owner": 201}, others=404),
        route="api/batches/<int:pk>/items/<int:item_pk>/open",
    ),
    "batch-export-csv": Case(
        "get",
        lambda w: f"/batches/{w['batch'].pk}/export.csv",
        only({"owner": 200}, others=404),
        route="batches/<int:pk>/export.csv",
    ),
    "batch-export-excel": Case(
        "get",
        lambda w: f"/batches/{w['batch'].pk}/export-excel.csv",
        only({"owner": 200}, others=404),
        route="batches/<int:pk>/export-excel.csv",
    ),
    "batch-export-jsonl": Case(
        "get",
        lambda w: f"/batches/{w['batch'].pk}/export.jsonl",
        only({"owner": 200}, others=404),
        route="batches/<int:pk>/export.jsonl",
    ),
    # ---- sharing (issue 16) ----
    "conversation-shares": Case(
        "get",
        lambda w: f"/api/conversations/{w['conversation'].pk}/shares",
        only({"owner": 200}, others=404),
        route="api/conversations/<int:pk>/shares",
    ),
    "conversation-shares-create": Case(
        "post",
        lambda w: f"/api/conversations/{w['conversation'].pk}/shares",
        only({"owner": 201}, others=404),
        data=lambda w: {"scope": "team"},
        route="api/conversations/<int:pk>/shares",
    ),
    "share-revoke": Case(
        "post",
        lambda w: f"/api/shares/{_share(w)}/revoke",
        only({"owner": 200}, others=404),
        route="api/shares/<int:pk>/revoke",
    ),
    "shared": Case(
        "get",
        lambda w: f"/shared/{_share(w)}/",
        only(SHARE_READERS, others=404),
        route="shared/<int:pk>/",
        readers=("member", "team_admin"),
    ),
    "shared-chosen-members": Case(
        "get",
        lambda w: f"/shared/{_share(w, chosen=True)}/",
        only(CHOSEN_READERS, others=404),
        route="shared/<int:pk>/",
        readers=("member",),
    ),
    "shared-revoked": Case(
        "get",
        lambda w: f"/shared/{_share(w, revoked=True)}/",
        only({}, others=404),
        route="shared/<int:pk>/",
    ),
    "share-fork": Case(
        "post",
        lambda w: f"/api/shared/{_share(w)}/fork",
        only({role: 201 for role in SHARE_READERS}, others=404),
        route="api/shared/<int:pk>/fork",
    ),
    "share-fork-chosen-members": Case(
        "post",
        lambda w: f"/api/shared/{_share(w, chosen=True)}/fork",
        only({role: 201 for role in CHOSEN_READERS}, others=404),
        route="api/shared/<int:pk>/fork",
    ),
    "attachment-thumbnail-shared": Case(
        "get",
        lambda w: f"/attachments/{_shared_image(w)}/thumbnail/",
        only(SHARE_READERS, others=404, anonymous=404, deactivated=404),
        route="attachments/<int:pk>/thumbnail/",
        readers=("member", "team_admin"),
    ),
    "attachment-image-shared": Case(
        "get",
        lambda w: f"/attachments/{_shared_image(w)}/image/0/",
        only(SHARE_READERS, others=404, anonymous=404, deactivated=404),
        route="attachments/<int:pk>/image/<int:part>/",
        readers=("member", "team_admin"),
    ),
    # Staff see shares in the admin (read-only), like conversations; nobody else.
    "admin-conversation-shares": Case(
        "get",
        lambda w: _shares_admin(w),
        only({"staff": 200}, others=ADMIN_LOGIN, anonymous=ADMIN_LOGIN, deactivated=ADMIN_LOGIN),
        route="admin/",
    ),
    # ---- end sharing ----
    "admin-conversation": Case(
        "get",
        lambda w: f"/admin/chatapp/conversation/{w['conversation'].pk}/change/",
        only({"staff": 200}, others=ADMIN_LOGIN, anonymous=ADMIN_LOGIN, deactivated=ADMIN_LOGIN),
        route="admin/",
    ),
}


# ---- projects and the prompt library -------------------------------------------------------
# Personal ones are their owner's only (404 for everyone else, staff too). A team's are used by
# its members, admins and staff, changed only by its admins and staff (403 for a member), and
# 404 for another team.


def _project(world: dict, *, team: bool) -> int:
    from chatapp.models import Project

    if team:
        project = Project.objects.create(name="Team project", team=world["team"])
    else:
        project = Project.objects.create(name="Owner project", owner=world["users"]["owner"])
    return project.pk


def _pinned(world: dict) -> tuple[int, int]:
    """A team project with a reference image pinned by the team admin -> (project, image)."""
    from chatapp.attachments import attachment_create
    from chatapp.images import process_upload
    from chatapp.models import ProjectPin
    from tests.image_factories import encode, screenshot

    project = _project(world, team=True)
    attachment = attachment_create(
        owner=world["users"]["team_admin"],
        conversation=None,
        filename="reference.png",
        processed=process_upload(encode(screenshot(64, 48), "PNG")),
    )
    ProjectPin.objects.create(project_id=project, attachment=attachment)
    return project, attachment.pk


def _prompt(world: dict, *, team: bool) -> int:
    from chatapp.models import SavedPrompt

    if team:
        return SavedPrompt.objects.create(title="T", text="t {{x}}", team=world["team"]).pk
    return SavedPrompt.objects.create(title="P", text="p", owner=world["users"]["owner"]).pk


def _prompts_file():
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("prompts.json", b'{"prompts": [{"title": "a", "text": "b"}]}')


# Use a team's thing: its members, admins and staff; change it: its admins and staff.
TEAM_USE = {"owner": 200, "member": 200, "team_admin": 200, "staff": 200}


def team_change(result) -> dict:
    return only({"team_admin": result, "staff": result, "owner": 403, "member": 403}, others=404)


URL_CASES.update(
    {
        "projects": Case("get", lambda w: "/projects/", every(200), route="projects/"),
        "project-create": Case(
            "post",
            lambda w: "/projects/new",
            every((302, "/projects/")),
            data=lambda w: {"name": "Mine"},
            route="projects/new",
        ),
        "project-create-team": Case(
            "post",
            lambda w: "/projects/new",
            team_change((302, "/projects/")),
            data=lambda w: {"name": "Ours", "scope": str(w["team"].pk)},
            route="projects/new",
        ),
        "project": Case(
            "get",
            lambda w: f"/projects/{_project(w, team=False)}/",
            only({"owner": 200}, others=404),
            route="projects/<int:pk>/",
        ),
        "project-team": Case(
            "get",
            lambda w: f"/projects/{_project(w, team=True)}/",
            only(TEAM_USE, others=404),
            route="projects/<int:pk>/",
        ),
        "project-update": Case(
            "post",
            lambda w: f"/projects/{_project(w, team=False)}/edit",
            only({"owner": (302, "/projects/")}, others=404),
            data=lambda w: {"name": "Renamed"},
            route="projects/<int:pk>/edit",
        ),
        "project-update-team": Case(
            "post",
            lambda w: f"/projects/{_project(w, team=True)}/edit",
            team_change((302, "/projects/")),
            data=lambda w: {"name": "Renamed"},
            route="projects/<int:pk>/edit",
        ),
        "project-delete": Case(
            "post",
            lambda w: f"/projects/{_project(w, team=True)}/delete",
            team_change((302, "/projects/")),
            route="projects/<int:pk>/delete",
        ),
        "project-conversation-new": Case(
            "post",
            lambda w: f"/projects/{_project(w, team=True)}/new-chat",
            only({role: (302, "/c/") for role in TEAM_USE}, others=404),
            route="projects/<int:pk>/new-chat",
        ),
        "project-pin-remove": Case(
            "post",
            lambda w: "/projects/{}/pins/{}/remove".format(*_pinned(w)),
            team_change((302, "/projects/")),
            route="projects/<int:pk>/pins/<int:attachment_pk>/remove",
        ),
        # No attachments given: a curator is told what is missing (400).
        "project-pins": Case(
            "post",
            lambda w: f"/api/projects/{_project(w, team=True)}/pins",
            team_change(400),
            route="api/projects/<int:pk>/pins",
        ),
        "project-list": Case("get", lambda w: "/api/projects/", every(200), route="api/projects/"),
        "pinned-thumbnail": Case(
            "get",
            lambda w: f"/attachments/{_pinned(w)[1]}/thumbnail/",
            only(TEAM_USE, others=404, anonymous=404, deactivated=404),
            route="attachments/<int:pk>/thumbnail/",
        ),
        # The owner's conversation into the team project: only its owner moves it.
        "conversation-project": Case(
            "post",
            lambda w: f"/api/conversations/{w['conversation'].pk}/project",
            only({"owner": 200}, others=404),
            data=lambda w: {"project": str(_project(w, team=True))},
            route="api/conversations/<int:pk>/project",
        ),
        "prompts": Case("get", lambda w: "/prompts/", every(200), route="prompts/"),
        "prompt-create": Case(
            "post",
            lambda w: "/prompts/new",
            every((302, "/prompts/")),
            data=lambda w: {"title": "t", "text": "x"},
            route="prompts/new",
        ),
        "prompt-create-team": Case(
            "post",
            lambda w: "/prompts/new",
            team_change((302, "/prompts/")),
            data=lambda w: {"title": "t", "text": "x", "scope": str(w["team"].pk)},
            route="prompts/new",
        ),
        "prompt-update": Case(
            "post",
            lambda w: f"/prompts/{_prompt(w, team=False)}/edit",
            only({"owner": (302, "/prompts/")}, others=404),
            data=lambda w: {"title": "t", "text": "x"},
            route="prompts/<int:pk>/edit",
        ),
        "prompt-update-team": Case(
            "post",
            lambda w: f"/prompts/{_prompt(w, team=True)}/edit",
            team_change((302, "/prompts/")),
            data=lambda w: {"title": "t", "text": "x"},
            route="prompts/<int:pk>/edit",
        ),
        "prompt-delete": Case(
            "post",
            lambda w: f"/prompts/{_prompt(w, team=True)}/delete",
            team_change((302, "/prompts/")),
            route="prompts/<int:pk>/delete",
        ),
        "prompt-list": Case("get", lambda w: "/api/prompts/", every(200), route="api/prompts/"),
        "prompts-export": Case(
            "get", lambda w: "/prompts/export.json", every(200), route="prompts/export.json"
        ),
        "prompts-export-team": Case(
            "get",
            lambda w: f"/prompts/export.json?team={w['team'].pk}",
            team_change(200),
            route="prompts/export.json",
        ),
        "prompts-import": Case(
            "post",
            lambda w: "/prompts/import",
            every((302, "/prompts/")),
            data=lambda w: {"file": _prompts_file()},
            route="prompts/import",
        ),
        "prompts-import-team": Case(
            "post",
            lambda w: "/prompts/import",
            team_change((302, "/prompts/")),
            data=lambda w: {"file": _prompts_file(), "scope": str(w["team"].pk)},
            route="prompts/import",
        ),
    }
)


@pytest.mark.django_db
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", sorted(URL_CASES))
def test_url_access(name, role, rf, request):
    world = build_world()
    for fixture in URL_CASES[name].fixtures:
        world[fixture] = request.getfixturevalue(fixture)
    newcomer = user_create(username="newcomer", password=None)  # has never logged in
    world["set_password_link"] = accounts.set_password_link(
        user=newcomer, request=rf.get("/")
    ).removeprefix("http://testserver")
    case = URL_CASES[name]
    client = client_for(world, role)
    response = getattr(client, case.method)(case.path(world), case.data(world))
    expected = case.expect[role]
    status, location = expected if isinstance(expected, tuple) else (expected, None)
    assert response.status_code == status, f"{name} as {role}"
    if location is not None:
        assert response["Location"].startswith(location), f"{name} as {role}"
    if role != "owner" and role not in case.readers and response.status_code == 200:
        assert b"private answer" not in response.content or role == "staff"


def test_every_route_is_in_the_matrix():
    """A URL added to urls.py without a row in URL_CASES fails here."""
    covered = {case.route for case in URL_CASES.values()}
    routes = {str(pattern.pattern) for pattern in get_resolver().url_patterns}
    missing = routes - covered
    assert not missing, f"add a Case to URL_CASES in tests/test_access_matrix.py for {missing}"


def test_every_websocket_route_and_action_is_in_the_matrix():
    """A new socket route or client frame type without a row in CONNECT / ACTIONS fails here."""
    from chatapp.consumers import ChatConsumer
    from chatapp.routing import websocket_urlpatterns

    routes = {str(pattern.pattern) for pattern in websocket_urlpatterns}
    assert routes == {
        "ws/conversations/<int:conversation_id>/",
        "ws/batches/<int:batch_id>/",
        "ws/shared/<int:share_id>/",
    }, "add it to the matrix"
    source = inspect.getsource(ChatConsumer.receive_json)
    dispatched = set(re.findall(r'"([a-z_.]+)": self\.handle_', source))
    assert dispatched, "the dispatch table moved: update this check"
    missing = dispatched - set(ACTIONS)
    assert not missing, f"add the client frame types {missing} to ACTIONS"
    from chatapp.consumers import BatchConsumer

    source = inspect.getsource(BatchConsumer.receive_json)
    dispatched = set(re.findall(r'"([a-z_.]+)": self\.handle_', source))
    assert dispatched, "the batch dispatch table moved: update this check"
    missing = dispatched - set(BATCH_ACTIONS)
    assert not missing, f"add the batch client frame types {missing} to BATCH_ACTIONS"
    from chatapp.consumers import SharedConsumer

    source = inspect.getsource(SharedConsumer.receive_json)
    dispatched = set(re.findall(r'"([a-z_.]+)": self\.handle_', source))
    assert dispatched, "the shared dispatch table moved: update this check"
    # Every action of the owner's socket, and every one the viewer's socket handles, has a row.
    missing = (dispatched | set(ACTIONS)) - set(SHARED_ACTIONS)
    assert not missing, f"add the shared-view client frame types {missing} to SHARED_ACTIONS"


# ---- websockets -----------------------------------------------------------------------------

CONNECT = {
    "owner": "accepted",
    "member": 4403,
    "other_team": 4403,
    "team_admin": 4403,
    "staff": 4403,
    "anonymous": 4401,
    "deactivated": 4401,
}

# What the owner gets for each client action; everyone else never gets a socket to act on.
ACTIONS = {
    "send": (lambda w: {"type": "send", "text": "hello"}, "message"),
    "stop": (lambda w: {"type": "stop"}, "error"),
    "state": (lambda w: {"type": "state"}, "state"),
    "regenerate": (lambda w: {"type": "regenerate", "message_id": w["reply"].pk}, "reply.replaced"),
    "ping": (lambda w: {"type": "ping"}, "pong"),
    "edit": (
        lambda w: {"type": "edit", "message_id": w["question"].pk, "text": "changed"},
        "message.edited",
    ),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", sorted(ACTIONS))
async def test_websocket_access(action, role):
    world = await database_sync_to_async(build_world)()
    user = world["users"][role]
    # The deactivated user presents a session made for them: it must not work.
    connected, code, ws = await open_socket(user, world["conversation"].pk)
    if CONNECT[role] != "accepted":
        assert not connected and code == CONNECT[role]
        return
    assert connected
    assert (await ws.receive_json_from())["type"] == "state"
    frame, expected = ACTIONS[action]
    await ws.send_json_to(frame(world))
    frames = await receive_until(ws, expected)
    assert frames[-1]["type"] == expected
    if action in ("send", "regenerate", "edit"):
        await receive_until(ws, "reply.end")
    await ws.disconnect()


# What a batch's owner gets for each client action on /ws/batches/<id>/.
BATCH_ACTIONS = {"state": "batch.state", "ping": "pong"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", sorted(BATCH_ACTIONS))
async def test_batch_socket_access(action, role):
    from channels.testing import WebsocketCommunicator

    from chatapp.asgi import application
    from tests.conftest import HOST, ORIGIN, session_cookie

    world = await database_sync_to_async(build_world)()
    user = world["users"][role]
    headers = [HOST, ORIGIN]
    if user is not None:
        headers.append((b"cookie", await database_sync_to_async(session_cookie)(user)))
    ws = WebsocketCommunicator(application, f"/ws/batches/{world['batch'].pk}/", headers=headers)
    connected, code = await ws.connect()
    if CONNECT[role] != "accepted":
        assert not connected and code == CONNECT[role]
        return
    assert connected
    first = await ws.receive_json_from()
    assert first["type"] == "batch.state" and first["items"][0]["answer"] == "private answer"
    await ws.send_json_to({"type": action})
    frames = await receive_until(ws, BATCH_ACTIONS[action])
    assert frames[-1]["type"] == BATCH_ACTIONS[action]
    await ws.disconnect()


# ---- sharing (issue 16): the read-only shared view's socket, /ws/shared/<id>/ ----

SHARED_CONNECT = {
    "owner": "accepted",
    "member": "accepted",
    "other_team": 4403,
    "team_admin": "accepted",  # a member of team A: the team share includes them
    "staff": 4403,
    "anonymous": 4401,
    "deactivated": 4401,
}
# Shared with the member only: the team admin, a team mate not chosen, is refused.
SHARED_CHOSEN_CONNECT = {**SHARED_CONNECT, "team_admin": 4403}

# What a reader gets for each client action: reading works, everything else is refused.
SHARED_ACTIONS = {
    "state": ("state", None),
    "ping": ("pong", None),
    "send": ("error", "read_only"),
    "stop": ("error", "read_only"),
    "regenerate": ("error", "read_only"),
    "edit": ("error", "read_only"),
}


async def _open_shared(user, share_id):
    from channels.testing import WebsocketCommunicator

    from chatapp.asgi import application
    from tests.conftest import HOST, ORIGIN, session_cookie

    headers = [HOST, ORIGIN]
    if user is not None:
        headers.append((b"cookie", await database_sync_to_async(session_cookie)(user)))
    ws = WebsocketCommunicator(application, f"/ws/shared/{share_id}/", headers=headers)
    connected, code = await ws.connect(timeout=10)
    return connected, code, ws


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", sorted(SHARED_ACTIONS))
async def test_shared_socket_access(action, role):
    world = await database_sync_to_async(build_world)()
    share_id = await database_sync_to_async(_share)(world)
    connected, code, ws = await _open_shared(world["users"][role], share_id)
    if SHARED_CONNECT[role] != "accepted":
        assert not connected and code == SHARED_CONNECT[role]
        return
    assert connected
    first = await ws.receive_json_from()
    assert first["type"] == "state" and first["last"]["content"] == "private answer"
    frame = ACTIONS[action][0](world) if action in ACTIONS else {"type": action}
    await ws.send_json_to(frame)
    expected, code = SHARED_ACTIONS[action]
    frames = await receive_until(ws, expected)
    assert frames[-1]["type"] == expected
    if code is not None:
        assert frames[-1]["code"] == code
    # Nothing changed: the conversation still has its two messages, the reply untouched.
    reply = await Message.objects.aget(pk=world["reply"].pk)
    assert reply.content == "private answer"
    assert await Message.objects.filter(conversation=world["conversation"]).acount() == 2
    await ws.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("role", ROLES)
async def test_shared_socket_with_chosen_members(role):
    world = await database_sync_to_async(build_world)()
    share_id = await database_sync_to_async(lambda: _share(world, chosen=True))()
    connected, code, ws = await _open_shared(world["users"][role], share_id)
    if SHARED_CHOSEN_CONNECT[role] != "accepted":
        assert not connected and code == SHARED_CHOSEN_CONNECT[role]
        return
    assert connected
    assert (await ws.receive_json_from())["type"] == "state"
    await ws.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("role", ROLES)
async def test_shared_socket_of_a_revoked_share(role):
    world = await database_sync_to_async(build_world)()
    share_id = await database_sync_to_async(lambda: _share(world, revoked=True))()
    connected, code, _ = await _open_shared(world["users"][role], share_id)
    assert not connected
    assert code == (4401 if role in ("anonymous", "deactivated") else 4403)


# ---- the socket's Origin: CSRF's rule (scheme, host and port) ---------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "origin, accepted",
    [
        ("http://127.0.0.1", True),  # the page's own origin (Host 127.0.0.1, http)
        ("http://127.0.0.1:8081", False),  # same host name, another port: another site
        ("https://127.0.0.1", False),  # same host, another scheme
        ("http://evil.example", False),
        ("null", False),
    ],
)
async def test_socket_origin_must_be_the_pages_own(origin, accepted):
    world = await database_sync_to_async(build_world)()
    connected, code, ws = await open_socket(
        world["users"]["owner"], world["conversation"].pk, origin=(b"origin", origin.encode())
    )
    assert connected is accepted, origin
    if connected:
        await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_socket_origin_may_be_a_csrf_trusted_origin(settings):
    """Behind a proxy the page's origin is the public one, named in CSRF_TRUSTED_ORIGINS."""
    settings.CSRF_TRUSTED_ORIGINS = ["https://chat.example.com"]
    world = await database_sync_to_async(build_world)()
    owner, pk = world["users"]["owner"], world["conversation"].pk
    connected, _, ws = await open_socket(owner, pk, origin=(b"origin", b"https://chat.example.com"))
    assert connected
    await ws.disconnect()
    other_port = (b"origin", b"https://chat.example.com:8443")
    connected, _, _ = await open_socket(owner, pk, origin=other_port)
    assert not connected


# ---- access that ends closes open sockets --------------------------------------------------

# The rule is "within a second"; the wait allows for a loaded machine, never a statement of speed.
CLOSE_WAIT = 5.0


def _form_fields(html: str) -> dict:
    """The values a browser would submit for the page's main form (inputs, selects, textareas)."""
    from html.parser import HTMLParser

    fields: dict[str, list[str]] = {}

    class Parser(HTMLParser):
        select: str | None = None
        textarea: str | None = None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            name = a.get("name")
            if tag == "input" and name:
                kind = a.get("type", "text")
                if kind in ("checkbox", "radio") and "checked" not in a:
                    return
                if kind in ("submit", "button", "file") or "__prefix__" in name:
                    return
                default = "on" if kind in ("checkbox", "radio") else ""
                fields.setdefault(name, []).append(a.get("value", default))
            elif tag == "select" and name and "__prefix__" not in name:
                self.select = name
                fields.setdefault(name, [])
            elif tag == "option" and self.select and "selected" in a:
                fields[self.select].append(a.get("value", ""))
            elif tag == "textarea" and name:
                self.textarea = name
                fields[name] = [""]

        def handle_endtag(self, tag):
            if tag == "select":
                self.select = None
            if tag == "textarea":
                self.textarea = None

        def handle_data(self, data):
            if self.textarea:
                fields[self.textarea][0] += data

    Parser().feed(html)
    fields.pop("csrfmiddlewaretoken", None)
    return fields


def _staff_client(world) -> Client:
    client = Client()
    client.force_login(world["users"]["staff"])
    return client


def _deactivate_by_admin_form(world) -> None:
    owner = world["users"]["owner"]
    client = _staff_client(world)
    url = f"/admin/auth/user/{owner.pk}/change/"
    data = _form_fields(client.get(url).content.decode())
    assert data.pop("is_active") == ["on"]  # untick Active, change nothing else
    response = client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]


def _deactivate_by_admin_action(world) -> None:
    response = _staff_client(world).post(
        "/admin/auth/user/",
        {"action": "deactivate_users", "_selected_action": [world["users"]["owner"].pk]},
    )
    assert response.status_code == 302


def _deactivate_by_team_page(world) -> None:
    client = Client()
    client.force_login(world["users"]["team_admin"])
    response = client.post(f"/team/members/{world['users']['owner'].pk}/active/", {"active": "0"})
    assert response.status_code == 302


NEW_PASSWORD = "a-new-long-passphrase-91"


def _password_changed_by_admin(world) -> None:
    response = _staff_client(world).post(
        f"/admin/auth/user/{world['users']['owner'].pk}/password/",
        {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD, "usable_password": "true"},
    )
    assert response.status_code == 302, response.content.decode()[:2000]


def _password_set_by_link(world) -> None:
    from django.test import RequestFactory

    link = accounts.set_password_link(
        user=world["users"]["owner"], request=RequestFactory().get("/")
    )
    client = Client()
    form_url = client.get(link.removeprefix("http://testserver"))["Location"]
    response = client.post(form_url, {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD})
    assert response.status_code == 302 and "/set-password/done/" in response["Location"]


ACCESS_ENDS = {
    "admin-user-form": _deactivate_by_admin_form,
    "admin-list-action": _deactivate_by_admin_action,
    "team-page": _deactivate_by_team_page,
    "admin-password-change": _password_changed_by_admin,
    "set-password-link": _password_set_by_link,
}


async def _closed(ws, timeout: float = CLOSE_WAIT) -> int | None:
    """The close code once the server closes the socket (frames before it are skipped)."""
    import asyncio

    async with asyncio.timeout(timeout):
        while True:
            output = await ws.receive_output(timeout)
            if output["type"] == "websocket.close":
                return output.get("code")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", sorted(ACCESS_ENDS))
async def test_access_ended_by_any_path_closes_open_sockets(path, fake_upstream):
    world = await database_sync_to_async(build_world)()
    owner, pk = world["users"]["owner"], world["conversation"].pk
    sockets = []
    for _ in range(2):  # two browsers
        connected, _, ws = await open_socket(owner, pk)
        assert connected
        assert (await ws.receive_json_from())["type"] == "state"
        sockets.append(ws)
    await database_sync_to_async(ACCESS_ENDS[path])(world)
    for ws in sockets:
        assert await _closed(ws) == 4401
    requests_before = len(fake_upstream.requests)
    # The next send finds no way in: the sessions the sockets had are gone or stale.
    connected, code, _ = await open_socket_with_cookie(
        await database_sync_to_async(_old_session_cookie)(owner), pk
    )
    assert not connected and code == 4401
    assert len(fake_upstream.requests) == requests_before


def _old_session_cookie(user) -> bytes:
    """A session the user logged in with before the change (as a still-open browser holds)."""
    from django.contrib.sessions.models import Session

    keys = [
        s.session_key
        for s in Session.objects.all()
        if str(s.get_decoded().get("_auth_user_id")) == str(user.pk)
    ]
    # Deactivation deleted them: forge one the way the browser had it (login before the change).
    if not keys:
        return b"sessionid=gone"
    return f"sessionid={keys[0]}".encode()


async def open_socket_with_cookie(cookie: bytes, conversation_id: int):
    from channels.testing import WebsocketCommunicator

    from chatapp.asgi import application
    from tests.conftest import HOST, ORIGIN

    ws = WebsocketCommunicator(
        application,
        f"/ws/conversations/{conversation_id}/",
        headers=[HOST, ORIGIN, (b"cookie", cookie)],
    )
    connected, code = await ws.connect(timeout=10)
    return connected, code, ws


@pytest.mark.django_db(transaction=True)
async def test_a_password_change_keeps_the_changing_sessions_socket_and_closes_the_others(
    fake_upstream,
):
    world = await database_sync_to_async(build_world)()
    staff = world["users"]["staff"]
    conversation = await database_sync_to_async(conversation_create)(owner=staff)

    def logged_in_client():
        client = Client()
        client.force_login(staff)
        return client

    here = await database_sync_to_async(logged_in_client)()
    cookie = f"sessionid={here.cookies['sessionid'].value}".encode()
    connected, _, mine = await open_socket_with_cookie(cookie, conversation.pk)
    assert connected and (await mine.receive_json_from())["type"] == "state"
    connected, _, elsewhere = await open_socket(staff, conversation.pk)
    assert connected and (await elsewhere.receive_json_from())["type"] == "state"

    def change_own_password():
        response = here.post(
            "/admin/password_change/",
            {
                "old_password": "pw-for-tests-123",
                "new_password1": NEW_PASSWORD,
                "new_password2": NEW_PASSWORD,
            },
        )
        assert response.status_code == 302, response.content.decode()[:2000]

    await database_sync_to_async(change_own_password)()
    assert await _closed(elsewhere) == 4401
    await mine.send_json_to({"type": "ping"})
    assert (await receive_until(mine, "pong"))[-1]["type"] == "pong"  # still open, still served
    await mine.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_socket_left_open_is_refused_at_its_next_send(fake_upstream):
    """Every send re-reads the owner: a deactivation whose close never arrived (a layer outage)
    still stops the socket's next send before anything reaches the provider."""
    world = await database_sync_to_async(build_world)()
    owner = world["users"]["owner"]
    connected, _, ws = await open_socket(owner, world["conversation"].pk)
    assert connected and (await ws.receive_json_from())["type"] == "state"
    # Deactivated behind the app's back: no close event.
    await database_sync_to_async(get_user_model().objects.filter(pk=owner.pk).update)(
        is_active=False
    )
    requests_before = len(fake_upstream.requests)
    await ws.send_json_to({"type": "send", "text": "still there?"})
    assert await _closed(ws) in (4403, 4401)
    assert len(fake_upstream.requests) == requests_before
    assert not await Message.objects.filter(content="still there?").aexists()


def _leave_team(world) -> None:
    from chatapp.models import Membership

    Membership.objects.filter(user=world["users"]["owner"], team=world["team"]).delete()


def _team_loses_model(world) -> None:
    from chatapp.models import ModelConfig

    other = ModelConfig.objects.exclude(pk=world["conversation"].model_id).first()
    world["team"].allowed_models.set([other])


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "change, code",
    [(_leave_team, "not_in_team"), (_team_loses_model, "model_unavailable")],
    ids=["removed-from-the-conversations-team", "team-loses-the-model"],
)
async def test_an_open_socket_rechecks_team_and_model_at_each_send(change, code, fake_upstream):
    world = await database_sync_to_async(build_world)()
    connected, _, ws = await open_socket(world["users"]["owner"], world["conversation"].pk)
    assert connected and (await ws.receive_json_from())["type"] == "state"
    await database_sync_to_async(change)(world)
    requests_before = len(fake_upstream.requests)
    await ws.send_json_to({"type": "send", "text": "one more"})
    error = (await receive_until(ws, "error"))[-1]
    assert error["code"] == code
    assert len(fake_upstream.requests) == requests_before
    await ws.disconnect()
