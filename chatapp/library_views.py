"""HTTP transport for the conversation library: search, rename, settings, delete, export.

Thin: every conversation is resolved through `conversation_get_for_user` (404 for anyone else's)
and every change is a service in chatapp/library.py. Errors come back as {"code", "message"}.
"""

from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.text import slugify
from django.views.decorators.http import require_GET, require_POST

from . import audit, library, sharing
from .access import conversation_get_for_user
from .errors import ClientError


def _error(exc: ClientError) -> JsonResponse:
    return JsonResponse({"code": exc.code, "message": exc.message}, status=400)


@login_required
@require_GET
def conversation_search(request: HttpRequest) -> JsonResponse:
    try:
        results = library.conversation_search(
            user=request.user,
            query=request.GET.get("q", ""),
            project=request.GET.get("project", ""),
        )
    except ClientError as exc:
        return _error(exc)
    for result in results:
        result["url"] = f"/c/{result['id']}/"
    return JsonResponse({"results": results})


@login_required
@require_POST
def conversation_rename(request: HttpRequest, pk: int) -> JsonResponse:
    conversation = conversation_get_for_user(request.user, pk)
    try:
        library.conversation_rename(conversation=conversation, title=request.POST.get("title", ""))
    except ClientError as exc:
        return _error(exc)
    return JsonResponse({"id": conversation.pk, "title": conversation.title})


@login_required
@require_POST
def conversation_settings(request: HttpRequest, pk: int) -> JsonResponse:
    conversation = conversation_get_for_user(request.user, pk)
    try:
        library.conversation_update_settings(
            conversation=conversation,
            user=request.user,
            model_id=request.POST.get("model"),
            system_prompt=request.POST.get("system_prompt", ""),
            max_output_tokens=request.POST.get("max_output_tokens"),
            thinking=request.POST.get("thinking"),
            temperature=request.POST.get("temperature"),
            reasoning_effort=request.POST.get("reasoning_effort"),
        )
    except ClientError as exc:
        return _error(exc)
    return JsonResponse(library.conversation_settings_to_dict(conversation))


@login_required
@require_POST
def conversation_delete(request: HttpRequest, pk: int) -> JsonResponse:
    conversation = conversation_get_for_user(request.user, pk)
    with transaction.atomic():
        # Sharing (issue 16): its open shared views close once the delete commits.
        sharing.shares_close_for_conversation(conversation)
        library.conversation_delete(conversation=conversation)
    return JsonResponse({"deleted": pk})


def _download(request, conversation, body: str, content_type: str, extension: str):
    audit.audit_record(
        actor=request.user,
        action="export.conversation",
        obj=conversation,
        changes={"format": extension},
        request=request,
    )
    name = slugify(conversation.title)[:60] or f"conversation-{conversation.pk}"
    response = HttpResponse(body, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{name}.{extension}"'
    return response


@login_required
@require_GET
def conversation_export_markdown(request: HttpRequest, pk: int) -> HttpResponse:
    conversation = conversation_get_for_user(request.user, pk)
    body = library.conversation_export_markdown(conversation)
    return _download(request, conversation, body, "text/markdown; charset=utf-8", "md")


@login_required
@require_GET
def conversation_export_json(request: HttpRequest, pk: int) -> HttpResponse:
    conversation = conversation_get_for_user(request.user, pk)
    body = library.conversation_export_json(conversation)
    return _download(request, conversation, body, "application/json; charset=utf-8", "json")
