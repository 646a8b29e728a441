"""Projects: conversations grouped under shared instructions, pinned references and defaults.

A project is personal (its owner's) or a team's (its admins and staff curate it, its members
use it); access.py holds the rules. Every request of a conversation in a project starts with the
same prefix, built here once (`request_prefix`): the project's instructions as a system message,
then its pinned reference images as one user message, both byte-identical across the project's
conversations, and the request carries the project's affinity id, so the provider's prefix cache
is shared by the whole project. The context-window check counts the prefix
(context_window.project_prefix_tokens and the estimate of the built request).

A project is not a back door: its conversation list holds only the viewer's own conversations,
and conversations stay behind access.conversation_get_for_user.

Every change to a project is audited in its transaction (audit.audit_record). Synchronous ORM
code; raises ClientError for input the user must correct.
"""

from django.db import transaction
from django.db.models import Prefetch, Sum

from . import audit, teams
from .access import (
    conversation_project,
    model_get_for_user,
    project_may_curate,
    projects_for_user,
)
from .attachments import attachment_to_dict, attachments_delete, prefetch, read_image
from .errors import ClientError
from .images import data_url
from .model_catalog import default_model_for, models_for_user
from .models import (
    Attachment,
    AttachmentPart,
    Conversation,
    Project,
    ProjectPin,
    Team,
    UsageRecord,
)

NAME_MAX = 200
INSTRUCTIONS_MAX = 20_000
MAX_PINS = 16
BUDGET_MIN = 256
BUDGET_MAX = 1_000_000
PINNED_INTRO = "Reference material pinned to this project:"


# ---- reading -------------------------------------------------------------------------------------


def project_to_dict(project: Project, *, user=None) -> dict:
    return {
        "id": project.pk,
        "name": project.name,
        "team": project.team.name if project.team_id else None,
        "team_id": project.team_id,
        "url": f"/projects/{project.pk}/",
        "may_edit": project_may_curate(user, project) if user is not None else False,
    }


def project_conversations(project: Project, user) -> list[Conversation]:
    """The viewer's own conversations in the project (never a team mate's)."""
    return list(
        Conversation.objects.filter(project=project, owner=user).only(
            "id", "title", "updated_at", "project"
        )[:200]
    )


def project_pins(project: Project) -> list[Attachment]:
    attachments = [
        pin.attachment
        for pin in project.pins.select_related("attachment__thumbnail").order_by("position", "id")
    ]
    prefetch(*attachments)
    return attachments


def project_cache_share(project: Project) -> dict:
    """Cached share of all prompt tokens of the project's replies (every member's, as numbers
    only): how well the shared prefix is working."""
    totals = UsageRecord.objects.filter(
        conversation__project=project, prompt_tokens__gt=0
    ).aggregate(prompt=Sum("prompt_tokens"), cached=Sum("cached_tokens"))
    prompt = totals["prompt"] or 0
    cached = totals["cached"] or 0
    return {
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "share": round(cached / prompt, 4) if prompt else None,
    }


def sidebar_groups(user, conversations: list[Conversation]) -> tuple[list[dict], list]:
    """The sidebar's project groups (every project the user may use, each with the user's own
    conversations in it, from `conversations`) and the conversations in none of them (a
    project the user may no longer use counts as none)."""
    groups = {
        project.pk: {"project": project, "conversations": []} for project in projects_for_user(user)
    }
    ungrouped = []
    for conversation in conversations:
        group = groups.get(conversation.project_id)
        if group is not None:
            group["conversations"].append(conversation)
        else:
            ungrouped.append(conversation)
    # Staff may use every team's projects; their sidebar shows those of their own teams (and
    # any holding one of their conversations), not every team's.
    mine = {m.team_id for m in teams.memberships_for(user)}
    shown = [
        group
        for group in groups.values()
        if group["project"].owner_id == user.pk
        or group["project"].team_id in mine
        or group["conversations"]
    ]
    return shown, ungrouped


# ---- the request prefix --------------------------------------------------------------------------


def request_prefix(conversation: Conversation, *, vision: bool) -> list[dict]:
    """The messages every request of the conversation's project starts with (none outside a
    project): its instructions, then its pinned references. Built only from the project, so it
    is byte-identical across the project's conversations (for models alike in vision)."""
    project = conversation_project(conversation)
    if project is None:
        return []
    messages: list[dict] = []
    if project.instructions:
        messages.append({"role": "system", "content": project.instructions})
    pins = list(
        project.pins.order_by("position", "id").prefetch_related(
            Prefetch(
                "attachment__parts",
                queryset=AttachmentPart.objects.select_related("image").order_by("index"),
            )
        )
    )
    if not pins:
        return messages
    if not vision:
        count = sum(len(pin.attachment.parts.all()) for pin in pins)
        messages.append(
            {
                "role": "user",
                "content": f"[{count} pinned reference image{'s' if count != 1 else ''} not "
                "shown: this model cannot see images]",
            }
        )
        return messages
    parts: list[dict] = [{"type": "text", "text": PINNED_INTRO}]
    for pin in pins:
        attachment = pin.attachment
        for part in attachment.parts.all():
            if part.caption:
                parts.append({"type": "text", "text": part.caption})
            data = read_image(part.image)
            if data is None:
                parts.append({"type": "text", "text": "[image no longer available]"})
            else:
                parts.append(
                    {"type": "image_url", "image_url": {"url": data_url(data, part.image.mime)}}
                )
        if attachment.note:
            parts.append({"type": "text", "text": attachment.note})
    messages.append({"role": "user", "content": parts})
    return messages


# ---- changes -------------------------------------------------------------------------------------


def _clean_name(name) -> str:
    name = " ".join(str(name or "").split())
    if not name:
        raise ClientError("empty_name", "Give the project a name.")
    if len(name) > NAME_MAX:
        raise ClientError("name_too_long", f"Project names are limited to {NAME_MAX} characters.")
    return name


def _clean_instructions(text) -> str:
    text = str(text or "").strip()
    if len(text) > INSTRUCTIONS_MAX:
        raise ClientError(
            "instructions_too_long",
            f"Instructions are limited to {INSTRUCTIONS_MAX:,} characters.",
        )
    return text


def _clean_budget(value) -> int | None:
    if value in (None, ""):
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ClientError("bad_budget", "The output budget must be a whole number.") from None
    if not BUDGET_MIN <= number <= BUDGET_MAX:
        raise ClientError(
            "bad_budget", f"The output budget must be from {BUDGET_MIN} to {BUDGET_MAX:,} tokens."
        )
    return number


def _clean_model(user, model_id):
    if model_id in (None, ""):
        return None
    return model_get_for_user(user, model_id)


def _state(project: Project) -> dict:
    return {
        "name": project.name,
        "instructions": project.instructions,
        "default_model": str(project.default_model) if project.default_model_id else None,
        "max_output_tokens": project.max_output_tokens,
        "team": project.team.name if project.team_id else None,
    }


def project_create(
    *,
    user,
    name,
    team: Team | None = None,
    instructions="",
    default_model_id=None,
    max_output_tokens=None,
    request=None,
) -> Project:
    """A new project: the user's own, or `team`'s (the caller resolved the team through
    access.team_get_for_curator)."""
    fields = {
        "name": _clean_name(name),
        "instructions": _clean_instructions(instructions),
        "default_model": _clean_model(user, default_model_id),
        "max_output_tokens": _clean_budget(max_output_tokens),
    }
    with transaction.atomic():
        project = Project.objects.create(
            owner=None if team else user, team=team, created_by=user, **fields
        )
        audit.audit_record(
            actor=user,
            action="project.created",
            obj=project,
            changes={k: [None, v] for k, v in _state(project).items() if v not in (None, "")},
            request=request,
        )
    return project


def project_update(
    *,
    project: Project,
    user,
    name,
    instructions,
    default_model_id,
    max_output_tokens,
    request=None,
) -> Project:
    before = _state(project)
    project.name = _clean_name(name)
    project.instructions = _clean_instructions(instructions)
    project.default_model = _clean_model(user, default_model_id)
    project.max_output_tokens = _clean_budget(max_output_tokens)
    with transaction.atomic():
        project.save()
        changes = audit.diff(before, _state(project))
        if changes:
            audit.audit_record(
                actor=user, action="project.changed", obj=project, changes=changes, request=request
            )
    return project


def project_delete(*, project: Project, user, request=None) -> None:
    """Delete the project and its pinned references; its conversations stay, ungrouped."""
    with transaction.atomic():
        audit.audit_record(
            actor=user,
            action="project.deleted",
            obj=project,
            changes={k: [v, None] for k, v in _state(project).items() if v not in (None, "")},
            request=request,
        )
        pinned = Attachment.objects.filter(project_pin__project=project)
        attachment_ids = list(pinned.values_list("pk", flat=True))
        project.delete()
        attachments_delete(attachments=Attachment.objects.filter(pk__in=attachment_ids))


def project_pin_add(*, project: Project, user, attachment_ids, request=None) -> list[Attachment]:
    """Pin the user's own unsent uploads (images, PDF pages) to the project, in order."""
    if not isinstance(attachment_ids, list) or not attachment_ids:
        raise ClientError("no_attachments", "Attach an image or a PDF to pin.")
    try:
        ids = [int(i) for i in attachment_ids]
    except (TypeError, ValueError):
        raise ClientError("bad_attachments", "Those are not image ids.") from None
    if len(set(ids)) != len(ids):
        raise ClientError("bad_attachments", "The same image is pinned twice.")
    with transaction.atomic():
        rows = {
            a.pk: a
            # of=self: the reverse one-to-one joins are outer joins, which PostgreSQL cannot lock.
            for a in Attachment.objects.select_for_update(of=("self",)).filter(
                pk__in=ids,
                owner=user,
                message__isnull=True,
                project_pin__isnull=True,
                batch_item__isnull=True,
                video__isnull=True,
            )
        }
        if len(rows) != len(ids):
            raise ClientError(
                "attachment_unavailable",
                "An image to pin is no longer available (already sent, pinned or removed), "
                "or is a recording (only images and PDF pages can be pinned).",
            )
        count = project.pins.count()
        if count + len(ids) > MAX_PINS:
            raise ClientError(
                "too_many_pins", f"A project can hold at most {MAX_PINS} pinned references."
            )
        last = project.pins.order_by("-position").values_list("position", flat=True).first()
        position = (last or 0) + 1
        added = []
        for pk in ids:
            attachment = rows[pk]
            # Detached from any conversation: it belongs to the project now.
            if attachment.conversation_id is not None:
                Attachment.objects.filter(pk=pk).update(conversation=None)
            ProjectPin.objects.create(project=project, attachment=attachment, position=position)
            position += 1
            added.append(attachment)
        audit.audit_record(
            actor=user,
            action="project.pinned",
            obj=project,
            changes={"pinned": [a.filename for a in added]},
            request=request,
        )
    return added


def project_pin_remove(*, project: Project, user, attachment_id, request=None) -> None:
    with transaction.atomic():
        pin = (
            ProjectPin.objects.select_related("attachment")
            .filter(project=project, attachment_id=attachment_id)
            .first()
        )
        if pin is None:
            raise ClientError("not_pinned", "That image is not pinned to this project.")
        audit.audit_record(
            actor=user,
            action="project.unpinned",
            obj=project,
            changes={"unpinned": [pin.attachment.filename]},
            request=request,
        )
        pin.delete()
        attachments_delete(attachments=Attachment.objects.filter(pk=attachment_id))


def conversation_move(*, conversation: Conversation, project: Project | None) -> Conversation:
    """Put the user's conversation in `project` (resolved through project_get_for_user), or
    take it out (None). The next reply is sent with the project's prefix and affinity id."""
    if conversation.project_id == (project.pk if project else None):
        return conversation
    conversation.project = project
    conversation.save(update_fields=["project", "updated_at"])
    return conversation


def conversation_create_in_project(*, user, project: Project) -> Conversation:
    """A new conversation in the project, with its default model (when the user may use it)
    and output budget; charged to the project's team when the user is in it."""
    model = None
    if project.default_model_id:
        model = next((m for m in models_for_user(user) if m.pk == project.default_model_id), None)
    if model is None:
        model = default_model_for(user)
    team = teams.current_team_for(user)
    if project.team_id and any(m.team_id == project.team_id for m in teams.memberships_for(user)):
        team = project.team
    return Conversation.objects.create(
        owner=user,
        model=model,
        team=team,
        project=project,
        max_output_tokens=project.max_output_tokens,
    )


def project_pins_dicts(project: Project) -> list[dict]:
    return [attachment_to_dict(a) for a in project_pins(project)]
