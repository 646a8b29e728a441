"""HTTP transport for projects: the projects page, a project's page, its edits, pins, and moving
a conversation in or out.

Thin: every project goes through access.project_get_for_user (use) or
project_get_for_curator (change: 403 for a member of the team, 404 for anyone else), every
conversation through conversation_get_for_user, every change is a service in projects.py.
A refused form is shown again with what was typed and the reason (status 400).
"""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from . import projects
from .access import (
    conversation_get_for_user,
    project_get_for_curator,
    project_get_for_user,
    project_may_curate,
    projects_for_user,
    team_get_for_curator,
    teams_curated_by,
)
from .errors import ClientError
from .model_catalog import models_for_user
from .models import Membership


def _nav(request) -> dict:
    return {
        "is_team_admin": Membership.objects.filter(
            user=request.user, role=Membership.Role.ADMIN
        ).exists()
    }


def _projects_page(request, *, error="", form=None, status=200) -> HttpResponse:
    rows = [
        {**projects.project_to_dict(p, user=request.user), "instructions": p.instructions}
        for p in projects_for_user(request.user)
    ]
    context = {
        **_nav(request),
        "projects": rows,
        "teams": teams_curated_by(request.user),
        "models": models_for_user(request.user),
        "error": error,
        "form": form or {},
    }
    return render(request, "chatapp/projects.html", context, status=status)


@login_required
@require_GET
def projects_page(request: HttpRequest) -> HttpResponse:
    return _projects_page(request)


@login_required
@require_POST
def project_create(request: HttpRequest) -> HttpResponse:
    scope = request.POST.get("scope", "personal")
    team = None if scope in ("", "personal") else team_get_for_curator(request.user, scope)
    try:
        project = projects.project_create(
            user=request.user,
            name=request.POST.get("name", ""),
            team=team,
            instructions=request.POST.get("instructions", ""),
            default_model_id=request.POST.get("default_model"),
            max_output_tokens=request.POST.get("max_output_tokens"),
            request=request,
        )
    except ClientError as exc:
        return _projects_page(request, error=exc.message, form=request.POST, status=400)
    messages.success(request, f"Project “{project.name}” created.")
    return redirect("project", pk=project.pk)


def _project_page(request, project, *, error="", form=None, status=200) -> HttpResponse:
    may_edit = project_may_curate(request.user, project)
    values = form or {
        "name": project.name,
        "instructions": project.instructions,
        "default_model": str(project.default_model_id or ""),
        "max_output_tokens": project.max_output_tokens or "",
    }
    context = {
        **_nav(request),
        "project": project,
        "may_edit": may_edit,
        "conversations": projects.project_conversations(project, request.user),
        "pins": projects.project_pins_dicts(project),
        "cache": projects.project_cache_share(project),
        "models": models_for_user(request.user),
        "error": error,
        "form": values,
    }
    return render(request, "chatapp/project.html", context, status=status)


@login_required
@require_GET
def project_page(request: HttpRequest, pk: int) -> HttpResponse:
    return _project_page(request, project_get_for_user(request.user, pk))


@login_required
@require_POST
def project_update(request: HttpRequest, pk: int) -> HttpResponse:
    project = project_get_for_curator(request.user, pk)
    try:
        projects.project_update(
            project=project,
            user=request.user,
            name=request.POST.get("name", ""),
            instructions=request.POST.get("instructions", ""),
            default_model_id=request.POST.get("default_model"),
            max_output_tokens=request.POST.get("max_output_tokens"),
            request=request,
        )
    except ClientError as exc:
        project.refresh_from_db()
        return _project_page(request, project, error=exc.message, form=request.POST, status=400)
    messages.success(request, "Project saved.")
    return redirect("project", pk=project.pk)


@login_required
@require_POST
def project_delete(request: HttpRequest, pk: int) -> HttpResponse:
    project = project_get_for_curator(request.user, pk)
    name = project.name
    projects.project_delete(project=project, user=request.user, request=request)
    messages.success(request, f"Project “{name}” deleted; its conversations are kept.")
    return redirect("projects")


@login_required
@require_POST
def project_pins(request: HttpRequest, pk: int) -> JsonResponse:
    """Pin uploads (made through /api/attachments/) to the project: attachments=1,2,3."""
    project = project_get_for_curator(request.user, pk)
    raw = request.POST.get("attachments", "")
    ids = [part.strip() for part in raw.split(",") if part.strip()]
    try:
        projects.project_pin_add(
            project=project, user=request.user, attachment_ids=ids, request=request
        )
    except ClientError as exc:
        return JsonResponse({"code": exc.code, "message": exc.message}, status=400)
    return JsonResponse({"pins": projects.project_pins_dicts(project)})


@login_required
@require_POST
def project_pin_remove(request: HttpRequest, pk: int, attachment_pk: int) -> HttpResponse:
    project = project_get_for_curator(request.user, pk)
    try:
        projects.project_pin_remove(
            project=project, user=request.user, attachment_id=attachment_pk, request=request
        )
    except ClientError as exc:
        messages.error(request, exc.message)
    return redirect("project", pk=project.pk)


@login_required
@require_POST
def project_conversation_new(request: HttpRequest, pk: int) -> HttpResponse:
    project = project_get_for_user(request.user, pk)
    conversation = projects.conversation_create_in_project(user=request.user, project=project)
    return redirect("conversation", pk=conversation.pk)


@login_required
@require_GET
def project_list(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "projects": [
                projects.project_to_dict(p, user=request.user)
                for p in projects_for_user(request.user)
            ]
        }
    )


@login_required
@require_POST
def conversation_project(request: HttpRequest, pk: int) -> JsonResponse:
    """Move one of the user's conversations into a project they may use (project=""
    takes it out)."""
    conversation = conversation_get_for_user(request.user, pk)
    raw = request.POST.get("project", "")
    project = project_get_for_user(request.user, raw) if raw else None
    projects.conversation_move(conversation=conversation, project=project)
    return JsonResponse(
        {
            "id": conversation.pk,
            "project": projects.project_to_dict(project, user=request.user) if project else None,
        }
    )
