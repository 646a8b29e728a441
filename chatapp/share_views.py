"""HTTP transport for sharing: the owner's share dialog, the read-only shared page, revoke and
"Continue as my copy".

GET  /api/conversations/<id>/shares -> {team, reason, members, shares}: the owner's dialog.
POST /api/conversations/<id>/shares (scope=team | members, members=<id,id>) -> 201 the share.
POST /api/shares/<id>/revoke -> {"revoked": id}; open views close at once (any process).
GET  /shared/<id>/ -> the read-only page (the share link: logged-in readers only, 404 for
     everyone else, and once revoked).
POST /api/shared/<id>/fork (message=<reply id>, optional) -> 201 {id, url} of the copy.

Thin: access through chatapp/access.py, every change a service in chatapp/sharing.py.
Errors come back as {"code", "message"} with 400.
"""

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import sharing
from .access import conversation_get_for_user, share_get_for_owner, share_get_for_viewer
from .conversations import conversation_messages
from .errors import ClientError


def _error(exc: ClientError) -> JsonResponse:
    return JsonResponse({"code": exc.code, "message": exc.message}, status=400)


@login_required
@require_http_methods(["GET", "POST"])
def conversation_shares(request: HttpRequest, pk: int) -> JsonResponse:
    conversation = conversation_get_for_user(request.user, pk)
    if request.method == "GET":
        return JsonResponse(sharing.share_options(conversation=conversation, user=request.user))
    try:
        share = sharing.share_create(
            conversation=conversation,
            user=request.user,
            scope=request.POST.get("scope", ""),
            member_ids=request.POST.get("members"),
            request=request,
        )
    except ClientError as exc:
        return _error(exc)
    return JsonResponse(sharing.share_to_dict(share), status=201)


@login_required
@require_POST
def share_revoke(request: HttpRequest, pk: int) -> JsonResponse:
    share = share_get_for_owner(request.user, pk)
    sharing.share_revoke(share=share, user=request.user, request=request)
    return JsonResponse({"revoked": share.pk})


@login_required
@require_GET
def shared_page(request: HttpRequest, pk: int) -> HttpResponse:
    share = share_get_for_viewer(request.user, pk)
    conversation = share.conversation
    page_data = {
        "share": {
            "id": share.pk,
            "shared_by": share.shared_by.get_username(),
            "created_at": share.created_at.isoformat(),
            "socket": f"/ws/shared/{share.pk}/",
            "fork_url": reverse("share-fork", args=[share.pk]),
        },
        "conversation": {"id": conversation.pk, "title": conversation.title},
        "messages": conversation_messages(conversation),
    }
    return render(
        request,
        "chatapp/shared.html",
        {"share": share, "conversation": conversation, "page_data": page_data},
    )


@login_required
@require_POST
def share_fork(request: HttpRequest, pk: int) -> JsonResponse:
    share = share_get_for_viewer(request.user, pk)
    try:
        copy = sharing.conversation_fork(
            share=share, user=request.user, message_id=request.POST.get("message"), request=request
        )
    except ClientError as exc:
        return _error(exc)
    return JsonResponse(
        {"id": copy.pk, "url": reverse("conversation", args=[copy.pk]), "title": copy.title},
        status=201,
    )
