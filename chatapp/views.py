"""HTTP transport: the chat page and the few JSON endpoints it calls."""

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from .access import conversation_get_for_user, conversation_project, model_get_for_user
from .context_window import context_state
from .conversations import conversation_create, conversation_list_for_user, conversation_messages
from .errors import ClientError
from .health import health_status
from .library import conversation_settings_to_dict, model_gone_to_dict, model_to_dict
from .model_catalog import default_model_for, models_for_user
from .projects import project_to_dict, sidebar_groups


def _page(request: HttpRequest, conversation=None) -> HttpResponse:
    models = models_for_user(request.user)
    current = conversation.model if conversation and conversation.model_id else None
    gone = model_gone_to_dict(request.user, conversation) if conversation else None
    if gone is not None:  # retired: the picker offers its successor (the page says so)
        current = next(
            (m for m in models if gone["successor"] and m.pk == gone["successor"]["id"]), None
        )
    if current is None:
        current = default_model_for(request.user)
    project = conversation_project(conversation) if conversation else None
    # Projects: the sidebar's groups, and the conversations in none (chatapp/projects.py).
    project_groups, ungrouped = sidebar_groups(
        request.user, conversation_list_for_user(request.user)
    )
    context = {
        "conversations": ungrouped,
        "project_groups": project_groups,
        "conversation": conversation,
        "models": models,
        "current_model": current,
        "page_data": {
            "conversation": (
                {"id": conversation.pk, "title": conversation.title} if conversation else None
            ),
            "messages": conversation_messages(conversation) if conversation else [],
            "context": context_state(conversation) if conversation else None,
            "models": [model_to_dict(m) for m in models],
            "settings": conversation_settings_to_dict(conversation) if conversation else None,
            "model_gone": gone,
            "project": project_to_dict(project, user=request.user) if project else None,
        },
    }
    return render(request, "chatapp/chat.html", context)


@login_required
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    return _page(request)


@login_required
@require_GET
def conversation_page(request: HttpRequest, pk: int) -> HttpResponse:
    return _page(request, conversation_get_for_user(request.user, pk))


@login_required
@require_POST
def conversation_new(request: HttpRequest) -> JsonResponse:
    model_pk = request.POST.get("model")
    try:
        model = (
            model_get_for_user(request.user, model_pk)
            if model_pk
            else default_model_for(request.user)
        )
    except ClientError as exc:
        return JsonResponse({"code": exc.code, "message": exc.message}, status=400)
    conversation = conversation_create(owner=request.user, model=model)
    return JsonResponse(
        {
            "id": conversation.pk,
            "url": reverse("conversation", args=[conversation.pk]),
            "socket": f"/ws/conversations/{conversation.pk}/",
        },
        status=201,
    )


@require_GET
async def healthz(request: HttpRequest) -> JsonResponse:
    status = await health_status()
    healthy = all(v == "ok" for v in status.values())
    return JsonResponse(status, status=200 if healthy else 503)
