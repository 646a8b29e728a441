"""A user's conversation library: search, rename, per-conversation settings, delete, export.

Services take a conversation already resolved through `conversation_get_for_user` (the views do
that) and raise ClientError for input the user must correct. Synchronous ORM code.
"""

import json
from decimal import Decimal

from django.db.models import Q

from . import attachments, model_catalog
from .access import model_get_for_user
from .conversations import conversation_messages
from .errors import ClientError
from .images import data_url
from .models import Attachment, Conversation, Message, ModelConfig, Provider
from .providers.moonshot import FIXED_SAMPLING_MODELS

SEARCH_LIMIT = 50
SNIPPET_CHARS = 120
SYSTEM_PROMPT_MAX = 20_000
MAX_OUTPUT_TOKENS_MAX = 1_000_000
# The fixed values shown for a model row that has no contract yet (before the first sync).
KIMI_FIXED_TEMPERATURE = {"thinking": 1.0, "instant": 0.6}


def fixed_temperature(model: ModelConfig | None) -> dict | None:
    """The provider's own sampling when the model's contract fixes it ({"thinking": t,
    "instant": t}, or {} when the values are not known), else None (a temperature may be sent)."""
    if model is None:
        return None
    contract = model.contract or {}
    if contract:
        if contract.get("sampling") != "fixed":
            return None
        return dict(contract.get("fixed_temperature") or {})
    if model.provider.kind == Provider.Kind.MOONSHOT and model.model_id.startswith(
        FIXED_SAMPLING_MODELS
    ):
        return dict(KIMI_FIXED_TEMPERATURE)
    return None


def model_controls(model: ModelConfig | None) -> dict:
    """Which settings the model's request contract allows, for the settings dialog."""
    if model is None:
        return {
            "thinking": False,
            "temperature": True,
            "reasoning_effort": [],
            "effort_default": "",
        }
    contract = model.contract or {}
    return {
        "thinking": model.reasoning_mode == "optional"
        and contract.get("thinking", "switch") == "switch",
        "temperature": fixed_temperature(model) is None,
        "reasoning_effort": list(contract.get("reasoning_effort") or []),
        "effort_default": contract.get("reasoning_effort_default", ""),
    }


def model_to_dict(model: ModelConfig) -> dict:
    """What the page needs to draw the model picker and the settings dialog."""
    return {
        "id": model.pk,
        "name": model.display_name,
        "vision": model.vision,
        "video": model.video,
        "max_image_edge": model.max_image_edge,
        "demo": model.is_demo,
        "reasoning": model.reasoning,
        "reasoning_mode": model.reasoning_mode,
        "fixed_temperature": fixed_temperature(model),
        "controls": model_controls(model),
        "context_window": model.context_window,
        "status": model.status,
    }


def model_gone_to_dict(user, conversation: Conversation) -> dict | None:
    """When the conversation's model is no longer served: what to tell the user and the model
    to continue with, for the page's "Continue with …" notice. None while it is available."""
    model = conversation.model
    if model is None or model.available:
        return None
    successor = model_catalog.successor_for_user(user, model)
    return {
        "name": model.display_name,
        "message": model_catalog.model_gone_message(model, user),
        "successor": (
            {"id": successor.pk, "name": successor.display_name}
            if successor is not None and successor.pk != model.pk
            else None
        ),
    }


def conversation_settings_to_dict(conversation: Conversation) -> dict:
    return {
        "model": conversation.model_id,
        "system_prompt": conversation.system_prompt,
        "max_output_tokens": conversation.max_output_tokens,
        "thinking": conversation.thinking,
        "temperature": conversation.temperature,
        "reasoning_effort": conversation.reasoning_effort,
    }


def conversation_search(*, user, query: str, project: str = "") -> list[dict]:
    """The user's conversations whose title or any message contains `query` (newest first);
    `project` (an id, or "none") keeps only those in that project (or in none)."""
    query = " ".join(query.split())
    if not query:
        return []
    mine = Conversation.objects.filter(owner=user)
    if project == "none":
        mine = mine.filter(project__isnull=True)
    elif project:
        try:
            mine = mine.filter(project_id=int(project))
        except ValueError:
            raise ClientError("bad_project", "That is not a project.") from None
    matches = (
        mine.filter(Q(title__icontains=query) | Q(messages__content__icontains=query))
        .distinct()
        .only("id", "title", "updated_at")[:SEARCH_LIMIT]
    )
    results = []
    for conversation in matches:
        snippet = ""
        if query.lower() not in conversation.title.lower():
            message = (
                conversation.messages.filter(content__icontains=query)
                .only("content")
                .order_by("id")
                .first()
            )
            if message is not None:
                snippet = _snippet(message.content, query)
        results.append({"id": conversation.pk, "title": conversation.title, "snippet": snippet})
    return results


def _snippet(text: str, query: str) -> str:
    at = text.lower().find(query.lower())
    start = max(0, at - SNIPPET_CHARS // 3)
    piece = " ".join(text[start : start + SNIPPET_CHARS].split())
    return ("…" if start else "") + piece + ("…" if start + SNIPPET_CHARS < len(text) else "")


def conversation_rename(*, conversation: Conversation, title: str) -> Conversation:
    title = " ".join((title or "").split())
    if not title:
        raise ClientError("empty_title", "Give the conversation a name.")
    max_length = Conversation._meta.get_field("title").max_length
    if len(title) > max_length:
        raise ClientError("title_too_long", f"Names are limited to {max_length} characters.")
    conversation.title = title
    conversation.save(update_fields=["title", "updated_at"])
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete the conversation, its messages and the image files nothing else references."""
    attachments.conversation_delete(conversation=conversation)


def conversation_update_settings(
    *,
    conversation: Conversation,
    user,
    model_id,
    system_prompt: str,
    max_output_tokens: str | int | None,
    thinking: str | bool | None,
    temperature: str | float | None,
    reasoning_effort: str | None = None,
) -> Conversation:
    """Validate and store the request settings; blank values mean the provider's default."""
    model = model_get_for_user(user, model_id) if model_id not in (None, "") else None
    if model is None:
        model = conversation.model
    system_prompt = (system_prompt or "").strip()
    if len(system_prompt) > SYSTEM_PROMPT_MAX:
        raise ClientError(
            "system_prompt_too_long",
            f"The system prompt is limited to {SYSTEM_PROMPT_MAX:,} characters.",
        )
    tokens = _optional_int(max_output_tokens, "max_output_tokens", "Max output tokens")
    if tokens is not None and not 1 <= tokens <= MAX_OUTPUT_TOKENS_MAX:
        raise ClientError(
            "bad_max_output_tokens",
            f"Max output tokens must be between 1 and {MAX_OUTPUT_TOKENS_MAX:,}.",
        )
    controls = model_controls(model)
    thinking_value = _optional_bool(thinking)
    if not controls["thinking"]:
        thinking_value = None  # the model has no thinking switch (none, or always thinking)
    effort = (reasoning_effort or "").strip().lower()
    if effort and effort not in controls["reasoning_effort"]:
        if controls["reasoning_effort"]:
            raise ClientError(
                "bad_reasoning_effort",
                "Reasoning effort must be one of " + ", ".join(controls["reasoning_effort"]) + ".",
            )
        effort = ""  # the model has no effort choice
    temp = _optional_float(temperature, "Temperature")
    if temp is not None and not controls["temperature"]:
        raise ClientError(
            "temperature_locked",
            f"{model.display_name} sets its own temperature; it cannot be changed here.",
        )
    if temp is not None and not 0 <= temp <= 2:
        raise ClientError("bad_temperature", "Temperature must be between 0 and 2.")
    conversation.model = model
    conversation.system_prompt = system_prompt
    conversation.max_output_tokens = tokens
    conversation.thinking = thinking_value
    conversation.temperature = temp
    conversation.reasoning_effort = effort
    conversation.save(
        update_fields=[
            "model",
            "system_prompt",
            "max_output_tokens",
            "thinking",
            "temperature",
            "reasoning_effort",
            "updated_at",
        ]
    )
    return conversation


def _optional_int(value, code: str, label: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ClientError(f"bad_{code}", f"{label} must be a whole number.") from None


def _optional_float(value, label: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ClientError("bad_temperature", f"{label} must be a number.") from None


def _optional_bool(value) -> bool | None:
    if value in (None, "", "default"):
        return None
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "on", "yes")


# ---- export -----------------------------------------------------------------------------------


def conversation_export_json(conversation: Conversation) -> str:
    """Everything needed to read or re-import the conversation, as stable, indented JSON."""
    document = {
        "format": "kimichat.conversation.v1",
        "id": conversation.pk,
        "title": conversation.title,
        "model": conversation.model.display_name if conversation.model else None,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
        "settings": conversation_settings_to_dict(conversation),
        "messages": conversation_messages(conversation),
    }
    images = _attachment_data_urls(conversation)
    for message in document["messages"]:
        for attachment in message.get("attachments") or []:
            attachment["data_urls"] = images.get(attachment["id"], [])
    return json.dumps(document, ensure_ascii=False, indent=2, default=_json_default)


def _attachment_data_urls(conversation: Conversation) -> dict[int, list[str]]:
    """attachment id -> its sent image parts as data URLs, in order (the export is standalone)."""
    found: dict[int, list[str]] = {}
    sent = Attachment.objects.filter(conversation=conversation, message__isnull=False)
    for attachment in sent.prefetch_related("parts__image"):
        urls = []
        for part in sorted(attachment.parts.all(), key=lambda p: p.index):
            data = attachments.read_image(part.image)
            if data is not None:
                urls.append(data_url(data, part.image.mime))
        found[attachment.pk] = urls
    return found


def _json_default(value):
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot export {type(value).__name__}")


def conversation_export_markdown(conversation: Conversation) -> str:
    lines = [f"# {conversation.title or 'Untitled conversation'}", ""]
    if conversation.model:
        lines += [f"Model: {conversation.model.display_name}", ""]
    if conversation.system_prompt:
        lines += ["## System prompt", "", conversation.system_prompt, ""]
    messages = conversation.messages.select_related("model").prefetch_related(
        attachments.message_attachments_prefetch()
    )
    for message in messages:
        who = "You" if message.role == Message.Role.USER else "Assistant"
        lines += [f"## {who}", ""]
        if message.reasoning:
            quoted = "\n".join("> " + line for line in message.reasoning.splitlines())
            lines += ["> **Thinking**", ">", quoted, ""]
        for attachment in message.attachments.all():
            label = attachments.attachment_label(attachment)
            lines += [f"*Image: {attachment.filename} ({label})*", ""]
        if message.content:
            lines += [message.content, ""]
        if message.error:
            lines += [f"*Error: {message.error}*", ""]
    return "\n".join(lines).rstrip() + "\n"
