"""Conversations and messages: the access getter, every write, and their wire shapes.

Synchronous ORM code; async callers go through database_sync_to_async.
"""

from django.db import transaction
from django.db.models import prefetch_related_objects

from . import teams
from .attachments import (
    attachments_bind,
    message_attachment_dicts,
    message_attachments_prefetch,
    messages_delete,
    user_content,
)
from .errors import ClientError
from .models import Conversation, Message, ModelConfig
from .pricing import cache_savings
from .projects import request_prefix

TITLE_MAX = 80
UNSET = object()


def conversation_list_for_user(user) -> list[Conversation]:
    return list(
        Conversation.objects.filter(owner=user).only("id", "title", "updated_at", "project")[:200]
    )


def conversation_create(*, owner, model: ModelConfig | None, team=UNSET) -> Conversation:
    """A new conversation, charged to `team` (default: the owner's current team)."""
    if team is UNSET:
        team = teams.current_team_for(owner)
    return Conversation.objects.create(owner=owner, model=model, team=team)


def title_from_text(text: str) -> str:
    """The first non-empty line, trimmed."""
    for line in text.splitlines():
        if line.strip():
            title = " ".join(line.split())
            return title if len(title) <= TITLE_MAX else title[: TITLE_MAX - 1] + "…"
    return ""


def conversation_set_model(*, conversation: Conversation, model: ModelConfig) -> None:
    if conversation.model_id != model.pk:
        conversation.model = model
        conversation.save(update_fields=["model", "updated_at"])


def _lock_idle(conversation: Conversation) -> Conversation:
    """Lock the conversation row (inside the caller's transaction); refuse while a reply runs."""
    locked = Conversation.objects.select_for_update().get(pk=conversation.pk)
    if locked.messages.filter(status=Message.Status.STREAMING).exists():
        raise ClientError("busy", "A reply is still being written. Wait for it or press Stop.")
    return locked


def _reply_create(
    *, conversation: Conversation, model: ModelConfig | None, lease: dict | None
) -> Message:
    """The empty streaming reply a generation will fill; `lease` (owner, lease_expires_at)
    claims it for the process that will write it, in the same INSERT."""
    return Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        model=model,
        **(lease or {}),
    )


# savepoint=False: inside the send hop's transaction (generation._turn_commit) a refusal rolls
# back the whole turn anyway; a savepoint would only add two statements to every send.
@transaction.atomic(savepoint=False)
def turn_start(
    *,
    conversation: Conversation,
    text: str,
    user=None,
    attachment_ids: list[int] = (),
    lease: dict | None = None,
) -> tuple[Message, Message]:
    """Commit the user's message (with its images) and an empty streaming reply, before any
    upstream call. A refused attachment rolls everything back."""
    locked = _lock_idle(conversation)
    user_message = Message.objects.create(
        conversation=locked, role=Message.Role.USER, content=text, status=Message.Status.COMPLETE
    )
    bound = attachments_bind(
        user=user or conversation.owner,
        conversation=conversation,
        message=user_message,
        attachment_ids=list(attachment_ids),
    )
    # Loaded here so message_to_dict can show them without a query on the event loop.
    prefetch_related_objects([user_message], message_attachments_prefetch())
    reply = _reply_create(conversation=locked, model=conversation.model, lease=lease)
    fields = ["updated_at"]
    if not locked.title:
        locked.title = title_from_text(text) or (bound[0].filename if bound else "")
        conversation.title = locked.title
        fields.append("title")
    locked.save(update_fields=fields)
    return user_message, reply


@transaction.atomic(savepoint=False)
def turn_regenerate(
    *, conversation: Conversation, reply_id: int, lease: dict | None = None
) -> Message:
    """Replace the last reply (failed, stopped or just unwanted) with a new streaming one."""
    locked = _lock_idle(conversation)
    last = locked.messages.order_by("-id").first()
    if last is None or last.pk != reply_id or last.role != Message.Role.ASSISTANT:
        raise ClientError("not_last", "Only the last reply can be regenerated.")
    last.delete()
    reply = _reply_create(conversation=locked, model=conversation.model, lease=lease)
    locked.save(update_fields=["updated_at"])
    return reply


@transaction.atomic(savepoint=False)
def turn_edit(
    *, conversation: Conversation, message_id: int, text: str, lease: dict | None = None
) -> tuple[Message, Message]:
    """Change an earlier user message, drop every later turn and start a new reply to it.

    The provider's prefix cache is lost from this message on (the page warns before sending).
    """
    locked = _lock_idle(conversation)
    message = locked.messages.filter(pk=message_id, role=Message.Role.USER).first()
    if message is None:
        raise ClientError("not_found", "That message is not in this conversation.")
    messages_delete(messages=locked.messages.filter(id__gt=message.pk))
    message.content = text
    message.save(update_fields=["content", "updated_at"])
    # Its images stay; loaded here so message_to_dict shows them without a query.
    prefetch_related_objects([message], message_attachments_prefetch())
    reply = _reply_create(conversation=locked, model=conversation.model, lease=lease)
    locked.save(update_fields=["updated_at"])
    return message, reply


def earlier_messages(conversation: Conversation, *, before: Message) -> list[Message]:
    """Every message before `before`, with what a request and its size estimate need: read
    once per send (history_for_request and context_window.plan_request share it). A constant
    number of queries whatever the history's length."""
    return list(
        conversation.messages.filter(id__lt=before.id)
        # "conversation" must be loaded too: the related manager sets it on every row, and a
        # deferred foreign key would cost one query per message.
        .only(
            "conversation",
            "role",
            "content",
            "status",
            "tool_calls",
            "reasoning",
            "reasoning_details",
            "prompt_tokens",
        )
        .prefetch_related(message_attachments_prefetch())
    )


def history_for_request(
    conversation: Conversation, *, before: Message, earlier: list[Message] | None = None
) -> list[dict]:
    """The OpenAI message list for a reply: the project's prefix (if any), the system prompt,
    then every earlier turn as stored (`earlier`, from earlier_messages, when already read).

    Built the same way every turn, so turn N+1's list starts with turn N's list plus its reply.
    """
    vision = conversation.model.vision if conversation.model else True
    # A project's instructions and pinned references come first, byte-identical across its
    # conversations (chatapp/projects.py), so its prefix cache is shared.
    messages: list[dict] = request_prefix(conversation, vision=vision)
    if conversation.system_prompt:
        messages.append({"role": "system", "content": conversation.system_prompt})
    # K3 and K2.7 Code want every earlier assistant turn's reasoning back, not only tool turns'.
    echo_all = bool(
        conversation.model and (conversation.model.contract or {}).get("echo_reasoning") == "all"
    )
    video = bool(conversation.model and conversation.model.video)
    if earlier is None:
        earlier = earlier_messages(conversation, before=before)
    for message in earlier:
        if message.role == Message.Role.ASSISTANT:
            if not message.content and not message.tool_calls:
                continue  # a reply that failed before any text: nothing to send back
            entry: dict = {"role": "assistant"}
            if message.content:
                entry["content"] = message.content
            if message.tool_calls or echo_all:
                if message.tool_calls:
                    entry["tool_calls"] = message.tool_calls
                # Exactly as received, even "": the provider client renames it per provider.
                entry["reasoning_content"] = message.reasoning
                if message.reasoning_details:
                    entry["reasoning_details"] = message.reasoning_details
            messages.append(entry)
        else:
            content = user_content(message, vision=vision, video=video)
            messages.append({"role": "user", "content": content})
    return messages


def message_to_dict(message: Message) -> dict:
    """The shape the page renders (history in the page and the final reply frame).

    Attachments appear when they were prefetched (message_attachments_prefetch); never queries.
    """
    model = message.model
    return {
        "id": message.pk,
        "role": message.role,
        "content": message.content,
        "reasoning": message.reasoning,
        "status": message.status,
        "error": message.error,
        "finish_reason": message.finish_reason,
        "seq": message.seq,
        "model": model.display_name if model else None,
        "prompt_tokens": message.prompt_tokens,
        "cached_tokens": message.cached_tokens,
        "completion_tokens": message.completion_tokens,
        "cost_usd": str(message.cost_usd) if message.cost_usd is not None else None,
        **cache_fields(message),
        "ttft_ms": message.time_to_first_token_ms,
        "created_at": message.created_at.isoformat() if message.created_at else None,
        "attachments": message_attachment_dicts(message),
    }


def cache_fields(message: Message) -> dict:
    """Prompt-cache figures of a reply: uncached prompt tokens and the cost the cache saved."""
    if message.prompt_tokens is None:
        return {"uncached_tokens": None, "cache_saved_usd": None}
    cached = message.cached_tokens or 0
    saved = cache_savings(model=message.model, cached_tokens=cached) if message.model else None
    return {
        "uncached_tokens": max(0, message.prompt_tokens - cached),
        "cache_saved_usd": str(saved) if saved is not None else None,
    }


def last_reply(conversation: Conversation) -> Message | None:
    return (
        conversation.messages.filter(role=Message.Role.ASSISTANT)
        .select_related("model")
        .order_by("-id")
        .first()
    )


def conversation_messages(conversation: Conversation) -> list[dict]:
    messages = conversation.messages.select_related("model").prefetch_related(
        message_attachments_prefetch()
    )
    return [message_to_dict(m) for m in messages]
