"""Sharing a conversation with team mates, and "Continue as my copy".

Contract:
* ``share_create`` shares a conversation, read-only, with the team it is charged to, or with
  chosen members of that team. Only its owner shares (the caller resolved the conversation
  through access.conversation_get_for_user), and only while a member of that team.
* Who reads through a share is decided once, by access.share_get_for_viewer.
* ``share_revoke`` ends a share at once: the row is marked revoked (kept for the record), and
  after commit every open shared view, in any process, is told and closed
  (events.share_sockets_close); the share's URL then 404s.
* ``conversation_fork`` copies the conversation up to a chosen reply into the viewer's own
  conversations, charged to the viewer's current team, with its own affinity id. Images are
  referenced, not duplicated: the copy's attachment rows point at the same StoredImage rows,
  which attachments.py deletes only once nothing references them, so deleting either
  conversation keeps the other's images.
* Every share, revoke and fork writes its audit entry in the same transaction.

Synchronous ORM code; async callers go through database_sync_to_async.
"""

from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from . import events, teams
from .audit import audit_record
from .errors import ClientError
from .model_catalog import default_model_for, models_for_user
from .models import (
    Attachment,
    AttachmentPart,
    Conversation,
    ConversationShare,
    Membership,
    Message,
    StoredImage,
)

MAX_CHOSEN = 200


def share_url(share: ConversationShare) -> str:
    return f"/shared/{share.pk}/"


def share_to_dict(share: ConversationShare) -> dict:
    members = sorted(u.get_username() for u in share.members.all())
    return {
        "id": share.pk,
        "url": share_url(share),
        "team": share.team.name,
        "members": members,
        "audience": ", ".join(members) if members else f"everyone in {share.team.name}",
        "shared_by": share.shared_by.get_username(),
        "created_at": share.created_at.isoformat(),
    }


def share_options(*, conversation: Conversation, user) -> dict:
    """What the owner's share dialog shows: the team, its other members, the live shares."""
    team = conversation.team
    in_team = team is not None and Membership.objects.filter(user=user, team=team).exists()
    members = []
    if in_team:
        rows = (
            Membership.objects.filter(team=team, user__is_active=True)
            .exclude(user=user)
            .select_related("user")
            .order_by("user__username")
        )
        members = [{"id": m.user_id, "username": m.user.get_username()} for m in rows]
    shares = conversation.shares.filter(revoked_at__isnull=True).select_related("team", "shared_by")
    return {
        "team": {"id": team.pk, "name": team.name} if in_team else None,
        "reason": "" if in_team else _no_team_reason(conversation),
        "members": members,
        "shares": [share_to_dict(s) for s in shares.prefetch_related("members")],
    }


def _no_team_reason(conversation: Conversation) -> str:
    if conversation.team is None:
        return "This conversation is not charged to a team, so there is no team to share it with."
    return (
        f"You are no longer in {conversation.team.name}, the team this conversation is charged to."
    )


def _member_ids(raw) -> list[int]:
    if raw in (None, ""):
        return []
    items = raw if isinstance(raw, list | tuple) else str(raw).replace(" ", "").split(",")
    try:
        ids = sorted({int(item) for item in items if str(item)})
    except (TypeError, ValueError):
        raise ClientError("bad_members", "members must be a list of user ids.") from None
    if len(ids) > MAX_CHOSEN:
        raise ClientError("bad_members", f"Choose at most {MAX_CHOSEN} members.")
    return ids


@transaction.atomic
def share_create(
    *, conversation: Conversation, user, scope: str, member_ids=None, request=None
) -> ConversationShare:
    """Share with the conversation's team (scope "team") or chosen members of it ("members")."""
    team = conversation.team
    if team is None or not Membership.objects.filter(user=user, team=team).exists():
        raise ClientError("no_team", _no_team_reason(conversation))
    if scope not in ("team", "members"):
        raise ClientError("bad_scope", "Share with the whole team or with chosen members.")
    chosen: list = []
    if scope == "members":
        ids = _member_ids(member_ids)
        if not ids:
            raise ClientError("no_members", "Choose at least one member to share with.")
        chosen = list(
            get_user_model()
            .objects.filter(pk__in=ids, is_active=True, memberships__team=team)
            .exclude(pk=user.pk)
        )
        if len(chosen) != len(ids):
            raise ClientError("not_a_member", f"You can share only with members of {team.name}.")
    share = ConversationShare.objects.create(conversation=conversation, shared_by=user, team=team)
    if chosen:
        share.members.set(chosen)
    audit_record(
        actor=user,
        action="share.created",
        obj=share,
        changes={
            "conversation": conversation.pk,
            "team": team.name,
            "members": sorted(u.get_username() for u in chosen) or "whole team",
        },
        request=request,
    )
    return share


@transaction.atomic
def share_revoke(*, share: ConversationShare, user, request=None) -> None:
    """End the share now; open views close once this commits (any process)."""
    updated = ConversationShare.objects.filter(pk=share.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now(), revoked_by=user
    )
    if not updated:
        return  # already revoked: nothing to record twice
    audit_record(
        actor=user,
        action="share.revoked",
        obj=share,
        changes={"conversation": share.conversation_id, "team": share.team.name},
        request=request,
    )
    share_id = share.pk
    transaction.on_commit(lambda: async_to_sync(events.share_sockets_close)(share_id))


def shares_close_for_conversation(conversation: Conversation) -> None:
    """Before a conversation is deleted: its open shared views close once the delete commits
    (the share rows go with the conversation). Call inside the delete's transaction."""
    ids = list(conversation.shares.filter(revoked_at__isnull=True).values_list("pk", flat=True))
    for share_id in ids:
        transaction.on_commit(
            lambda share_id=share_id: async_to_sync(events.share_sockets_close)(share_id)
        )


# ---- "Continue as my copy" ----------------------------------------------------------------------


def _cut(source: Conversation, message_id) -> Message:
    replies = source.messages.filter(role=Message.Role.ASSISTANT).exclude(
        status=Message.Status.STREAMING
    )
    if message_id in (None, ""):
        cut = replies.order_by("-created_at", "-id").first()
        if cut is None:
            raise ClientError("nothing_to_copy", "There is no finished reply to continue from yet.")
        return cut
    try:
        message_id = int(message_id)
    except (TypeError, ValueError):
        raise ClientError("bad_message", "Say which reply to continue from (message).") from None
    cut = source.messages.filter(pk=message_id).first()
    if cut is None:
        raise ClientError("bad_message", "That message is not in this conversation.")
    if cut.role != Message.Role.ASSISTANT:
        raise ClientError("bad_message", "Continue from a reply, not from a question.")
    if cut.status == Message.Status.STREAMING:
        raise ClientError("busy", "That reply is still being written. Wait for it to finish.")
    return cut


@transaction.atomic
def conversation_fork(*, share: ConversationShare, user, message_id=None, request=None):
    """Copy the shared conversation up to (and including) a reply into `user`'s conversations."""
    source = share.conversation
    cut = _cut(source, message_id)
    available = {m.pk: m for m in models_for_user(user)}
    model = available.get(source.model_id) or default_model_for(user)
    copy = Conversation.objects.create(
        owner=user,
        team=teams.current_team_for(user),
        model=model,
        title=f"{source.title or 'Conversation'} (copy)"[:200],
        system_prompt=source.system_prompt,
        thinking=source.thinking,
        max_output_tokens=source.max_output_tokens,
        temperature=source.temperature,
        reasoning_effort=source.reasoning_effort,
    )
    originals = list(
        source.messages.filter(pk__lte=cut.pk)
        .exclude(status=Message.Status.STREAMING)
        .order_by("created_at", "id")
    )
    attachments = list(
        Attachment.objects.filter(message__in=originals)
        .order_by("position", "id")
        .prefetch_related("parts")
    )
    # Lock the stored images we are about to reference: a concurrent delete of the source then
    # waits and sees our references (attachments._delete_unreferenced locks them too).
    image_ids = {a.thumbnail_id for a in attachments} | {
        a.video_id for a in attachments if a.video_id
    }
    image_ids |= {p.image_id for a in attachments for p in a.parts.all()}
    locked = set(
        StoredImage.objects.select_for_update()
        .filter(pk__in=image_ids)
        .values_list("pk", flat=True)
    )
    if locked != image_ids:
        raise ClientError("gone", "Some images of this conversation were just deleted. Try again.")
    by_message: dict[int, list[Attachment]] = {}
    for attachment in attachments:
        by_message.setdefault(attachment.message_id, []).append(attachment)
    for original in originals:
        message = Message.objects.create(
            conversation=copy,
            role=original.role,
            content=original.content,
            reasoning=original.reasoning,
            status=original.status,
            model=original.model,
            finish_reason=original.finish_reason,
            served_model=original.served_model,
            error=original.error,
            tool_calls=original.tool_calls,
            reasoning_details=original.reasoning_details,
            seq=original.seq,
        )
        for attachment in by_message.get(original.pk, ()):
            twin = Attachment.objects.create(
                owner=user,
                conversation=copy,
                message=message,
                position=attachment.position,
                filename=attachment.filename,
                source_format=attachment.source_format,
                source_width=attachment.source_width,
                source_height=attachment.source_height,
                thumbnail_id=attachment.thumbnail_id,
                note=attachment.note,
                video_id=attachment.video_id,
                seconds=attachment.seconds,
                source_seconds=attachment.source_seconds,
            )
            AttachmentPart.objects.bulk_create(
                AttachmentPart(
                    attachment=twin, index=p.index, image_id=p.image_id, caption=p.caption
                )
                for p in attachment.parts.all()
            )
    audit_record(
        actor=user,
        action="conversation.forked",
        obj=copy,
        changes={
            "from_conversation": source.pk,
            "share": share.pk,
            "up_to_message": cut.pk,
            "messages": len(originals),
        },
        request=request,
    )
    return copy
