"""HTTP transport for the prompt library: its page, edits, the composer's list, import/export.

Thin: prompts go through access.prompt_get_for_user / prompt_get_for_curator, a team through
team_get_for_curator (403 for a plain member, 404 for anyone outside it); every change is a
service in prompts.py. A refused form is shown again with what was typed (status 400).
"""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils.text import slugify
from django.views.decorators.http import require_GET, require_POST

from . import audit, prompts
from .access import (
    prompt_get_for_curator,
    team_get_for_curator,
    teams_curated_by,
)
from .errors import ClientError
from .models import Membership, Team


def _page(request, *, error="", form=None, status=200) -> HttpResponse:
    memberships = Membership.objects.filter(user=request.user).select_related("team")
    context = {
        "is_team_admin": any(m.role == Membership.Role.ADMIN for m in memberships),
        "prompts": prompts.prompt_list(request.user),
        "teams": teams_curated_by(request.user),
        "member_teams": [m.team for m in memberships],
        "error": error,
        "form": form or {},
    }
    return render(request, "chatapp/prompts.html", context, status=status)


def _team(request, raw) -> Team | None:
    return None if raw in (None, "", "personal") else team_get_for_curator(request.user, raw)


@login_required
@require_GET
def prompts_page(request: HttpRequest) -> HttpResponse:
    return _page(request)


@login_required
@require_POST
def prompt_create(request: HttpRequest) -> HttpResponse:
    team = _team(request, request.POST.get("scope"))
    try:
        prompts.prompt_create(
            user=request.user,
            title=request.POST.get("title", ""),
            text=request.POST.get("text", ""),
            team=team,
            request=request,
        )
    except ClientError as exc:
        return _page(request, error=exc.message, form=request.POST, status=400)
    messages.success(request, "Prompt saved.")
    return redirect("prompts")


@login_required
@require_POST
def prompt_update(request: HttpRequest, pk: int) -> HttpResponse:
    prompt = prompt_get_for_curator(request.user, pk)
    try:
        prompts.prompt_update(
            prompt=prompt,
            user=request.user,
            title=request.POST.get("title", ""),
            text=request.POST.get("text", ""),
            request=request,
        )
    except ClientError as exc:
        return _page(request, error=exc.message, form={**request.POST.dict(), "pk": pk}, status=400)
    messages.success(request, "Prompt saved.")
    return redirect("prompts")


@login_required
@require_POST
def prompt_delete(request: HttpRequest, pk: int) -> HttpResponse:
    prompt = prompt_get_for_curator(request.user, pk)
    prompts.prompt_delete(prompt=prompt, user=request.user, request=request)
    messages.success(request, f"Prompt “{prompt.title}” deleted.")
    return redirect("prompts")


@login_required
@require_GET
def prompt_list(request: HttpRequest) -> JsonResponse:
    """The composer's "/" list: every prompt the user may use, filtered by ?q=."""
    return JsonResponse(
        {"prompts": prompts.prompt_list(request.user, query=request.GET.get("q", ""))}
    )


@login_required
@require_GET
def prompts_export(request: HttpRequest) -> HttpResponse:
    """?team=<id> exports a team's prompts (its curators only); without it, the user's own."""
    team = _team(request, request.GET.get("team"))
    body = prompts.prompts_export(user=request.user, team=team)
    if team is not None:
        audit.audit_record(
            actor=request.user,
            action="export.prompts",
            obj=team,
            changes={"format": "json"},
            request=request,
        )
    name = f"prompts-{slugify(team.name) or team.pk}" if team else "prompts-personal"
    response = HttpResponse(body, content_type="application/json; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}.json"'
    return response


@login_required
@require_POST
def prompts_import(request: HttpRequest) -> HttpResponse:
    team = _team(request, request.POST.get("scope"))
    upload = request.FILES.get("file")
    if upload is None:
        return _page(request, error="Choose a JSON file to import.", status=400)
    try:
        result = prompts.prompts_import(
            user=request.user,
            data=upload.read(prompts.IMPORT_MAX_BYTES + 1),
            team=team,
            request=request,
        )
    except ClientError as exc:
        return _page(request, error=f"Nothing was imported: {exc.message}", status=400)
    skipped = f" ({result['skipped']} already there)" if result["skipped"] else ""
    messages.success(request, f"Imported {result['added']} prompts{skipped}.")
    return redirect("prompts")
