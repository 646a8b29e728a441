"""Every access rule, once: the getters that views, consumers and services go through.

Each raises Http404 (or ClientError for a model) when the user may not use the object, so a
forbidden object looks exactly like a missing one.
"""

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import Http404

from .errors import ClientError
from .model_catalog import models_for_user
from .models import (
    Attachment,
    Batch,
    BatchItem,
    Conversation,
    ConversationShare,
    Membership,
    ModelConfig,
    Project,
    SavedPrompt,
    Team,
)


def conversation_get_for_user(user, pk) -> Conversation:
    """The one access rule for a conversation: raises Http404 when the user may not see it.

    Only its owner, while their account is active, may see or use a conversation. Nobody else
    does through the app: not a member of the same team, not a team admin (they see members'
    spend and tokens, never their chats), not staff (staff read conversations in the Django
    admin only). Every view, upload, image, export and socket goes through here. Reading it
    through a share, read-only, is the separate rule share_get_for_viewer below.
    """
    if not user.is_authenticated or not user.is_active:
        raise Http404("No such conversation")
    try:
        # owner__is_active: the database's word, not the copy of the user a socket loaded at
        # connect (a deactivated owner's open socket is refused at its next send).
        return Conversation.objects.select_related("model__provider").get(
            pk=pk, owner=user, owner__is_active=True
        )
    except (Conversation.DoesNotExist, ValueError, TypeError):
        raise Http404("No such conversation") from None


def model_get_for_user(user, model_pk) -> ModelConfig:
    for model in models_for_user(user):
        if str(model.pk) == str(model_pk):
            return model
    raise ClientError("model_unavailable", "That model is not available to you.")


def attachment_get_for_user(user, pk) -> Attachment:
    """Raises Http404 unless `user` may see this image."""
    if not user.is_authenticated or not user.is_active:
        raise Http404("No such image")
    try:
        attachment = Attachment.objects.select_related("thumbnail").get(pk=pk)
    except (Attachment.DoesNotExist, ValueError, TypeError):
        raise Http404("No such image") from None
    if attachment.message_id is None:
        if attachment.owner_id != user.pk:
            # A project's pinned reference image: whoever may use the project sees it.
            pin = getattr(attachment, "project_pin", None)
            if pin is None:
                raise Http404("No such image")
            project_get_for_user(user, pin.project_id)
    else:
        conversation_get_for_user(user, attachment.conversation_id)
    return attachment


def batch_get_for_user(user, pk) -> Batch:
    """The one access rule for a batch: like a conversation, only its owner while active sees
    or controls it (team admins see its spend on the usage and team pages, never its items)."""
    if not user.is_authenticated or not user.is_active:
        raise Http404("No such batch")
    try:
        return Batch.objects.select_related("model__provider", "team").get(
            pk=pk, owner=user, owner__is_active=True
        )
    except (Batch.DoesNotExist, ValueError, TypeError):
        raise Http404("No such batch") from None


def batch_item_get_for_user(user, batch_pk, item_pk) -> BatchItem:
    batch = batch_get_for_user(user, batch_pk)
    try:
        return batch.items.select_related("attachment", "batch__model", "batch__team").get(
            pk=item_pk
        )
    except (BatchItem.DoesNotExist, ValueError, TypeError):
        raise Http404("No such item") from None


# ---- projects and the prompt library ---------------------------------------------------------
#
# A personal project or prompt is its owner's only (while active). A team's is used (read) by
# the team's active members and by staff, and curated (changed) by the team's admins and staff.
# Using a team project never shows anyone another member's conversations: conversations stay
# behind conversation_get_for_user (projects.project_conversations lists the viewer's own).


def _team_ids(user, *, admin: bool = False) -> list[int]:
    rows = Membership.objects.filter(user=user)
    if admin:
        rows = rows.filter(role=Membership.Role.ADMIN)
    return list(rows.values_list("team_id", flat=True))


def _readable(user) -> Q:
    if user.is_staff:
        return Q(owner=user) | Q(team__isnull=False)
    return Q(owner=user) | Q(team_id__in=_team_ids(user))


def _curated(user) -> Q:
    if user.is_staff:
        return Q(owner=user) | Q(team__isnull=False)
    return Q(owner=user) | Q(team_id__in=_team_ids(user, admin=True))


def projects_for_user(user):
    """The projects `user` may use, personal first, then by team and name."""
    if not user.is_authenticated or not user.is_active:
        return Project.objects.none()
    return (
        Project.objects.filter(_readable(user))
        .select_related("team", "default_model")
        .order_by("team__name", "name", "id")
    )


def project_get_for_user(user, pk) -> Project:
    """Raises Http404 unless `user` may use the project (put conversations in it, read it)."""
    if not user.is_authenticated or not user.is_active:
        raise Http404("No such project")
    try:
        return projects_for_user(user).get(pk=pk)
    except (Project.DoesNotExist, ValueError, TypeError):
        raise Http404("No such project") from None


def conversation_project(conversation: Conversation) -> Project | None:
    """The project whose prefix and affinity id the conversation's requests carry: its project,
    while its owner may still use it (someone who left the team keeps the conversation, not
    the team's instructions and references)."""
    if conversation.project_id is None:
        return None
    owner = conversation.owner
    if not owner.is_active:
        return None
    return projects_for_user(owner).filter(pk=conversation.project_id).first()


def project_may_curate(user, project: Project) -> bool:
    if project.owner_id is not None:
        return project.owner_id == user.pk
    return bool(user.is_staff) or project.team_id in _team_ids(user, admin=True)


def project_get_for_curator(user, pk) -> Project:
    """Http404 unless the user may use it; PermissionDenied (403) unless they may change it."""
    project = project_get_for_user(user, pk)
    if not project_may_curate(user, project):
        raise PermissionDenied("Only the team's admins change a team project.")
    return project


def prompts_for_user(user):
    if not user.is_authenticated or not user.is_active:
        return SavedPrompt.objects.none()
    return SavedPrompt.objects.filter(_readable(user)).select_related("team")


def prompt_get_for_user(user, pk) -> SavedPrompt:
    if not user.is_authenticated or not user.is_active:
        raise Http404("No such prompt")
    try:
        return prompts_for_user(user).get(pk=pk)
    except (SavedPrompt.DoesNotExist, ValueError, TypeError):
        raise Http404("No such prompt") from None


def prompt_may_curate(user, prompt: SavedPrompt) -> bool:
    if prompt.owner_id is not None:
        return prompt.owner_id == user.pk
    return bool(user.is_staff) or prompt.team_id in _team_ids(user, admin=True)


def prompt_get_for_curator(user, pk) -> SavedPrompt:
    prompt = prompt_get_for_user(user, pk)
    if not prompt_may_curate(user, prompt):
        raise PermissionDenied("Only the team's admins change a team prompt.")
    return prompt


def team_get_for_curator(user, team_id):
    """The team whose projects and prompts `user` curates (admin of it, or staff); Http404 for
    a team they are not in, PermissionDenied for a plain member."""
    if not user.is_authenticated or not user.is_active:
        raise Http404("No such team")
    from_teams = _team_ids(user)
    try:
        team_id = int(team_id)
    except (TypeError, ValueError):
        raise Http404("No such team") from None
    if not user.is_staff and team_id not in from_teams:
        raise Http404("No such team")
    if not user.is_staff and team_id not in _team_ids(user, admin=True):
        raise PermissionDenied("Only the team's admins curate its library.")
    try:
        return Team.objects.get(pk=team_id)
    except Team.DoesNotExist:
        raise Http404("No such team") from None


def teams_curated_by(user) -> list:
    if not user.is_authenticated or not user.is_active:
        return []
    if user.is_staff:
        return list(Team.objects.all())
    return list(Team.objects.filter(pk__in=_team_ids(user, admin=True)))


# ---- sharing (issue 16) ------------------------------------------------------------------------


def share_get_for_viewer(user, pk) -> ConversationShare:
    """The one access rule for reading a conversation through a share: raises Http404 unless
    the share is live (not revoked) and `user`, active, may read it.

    Readers: the conversation's owner, and members of the share's team (the team the
    conversation is charged to), limited to the chosen members when the share names any. Being
    a team admin gives nothing more (a share to chosen members hides it from an admin not
    chosen); staff are readers only when they are such a member (they read every conversation
    in the Django admin, never here). The shared page, its socket, its images and "Continue as
    my copy" all go through here.
    """
    if not user.is_authenticated or not user.is_active:
        raise Http404("No such share")
    try:
        share = ConversationShare.objects.select_related(
            "conversation__model__provider", "shared_by", "team"
        ).get(pk=pk, revoked_at__isnull=True)
    except (ConversationShare.DoesNotExist, ValueError, TypeError):
        raise Http404("No such share") from None
    if share.conversation.owner_id == user.pk:
        return share
    if not Membership.objects.filter(user=user, team_id=share.team_id).exists():
        raise Http404("No such share")
    if share.members.exists() and not share.members.filter(pk=user.pk).exists():
        raise Http404("No such share")
    return share


def share_get_for_owner(user, pk) -> ConversationShare:
    """A share its conversation's owner manages (see who, revoke): 404 for anyone else, through
    the owner rule (conversation_get_for_user)."""
    try:
        share = ConversationShare.objects.select_related("team").get(pk=pk)
    except (ConversationShare.DoesNotExist, ValueError, TypeError):
        raise Http404("No such share") from None
    conversation_get_for_user(user, share.conversation_id)
    return share


def shared_conversation_readable(user, conversation_id: int) -> bool:
    """Whether `user` may read this conversation through any live share of it (images)."""
    for share_pk in ConversationShare.objects.filter(
        conversation_id=conversation_id, revoked_at__isnull=True
    ).values_list("pk", flat=True):
        try:
            share_get_for_viewer(user, share_pk)
        except Http404:
            continue
        return True
    return False


def attachment_get_for_reader(user, pk) -> Attachment:
    """The image views' rule: whoever may see the attachment (attachment_get_for_user), or read
    its sent message's conversation through a live share (share_get_for_viewer). Nobody else."""
    try:
        return attachment_get_for_user(user, pk)
    except Http404:
        if not user.is_authenticated or not user.is_active:
            raise
    attachment = Attachment.objects.select_related("thumbnail").filter(pk=pk).first()
    if (
        attachment is None
        or attachment.message_id is None
        or not shared_conversation_readable(user, attachment.conversation_id)
    ):
        raise Http404("No such image")
    return attachment


def team_members_manageable_by(admin):
    """The accounts `admin` may deactivate or reactivate from the team page. Staff: anyone but
    themselves. A team admin: the plain members of the teams they administer, never a co-admin
    (nor an admin of any team: the account is shared by all its teams), never staff."""
    users = get_user_model().objects.exclude(pk=admin.pk)
    if not admin.is_authenticated or not admin.is_active:
        return users.none()
    if admin.is_staff:
        return users
    run = Membership.objects.filter(user=admin, role=Membership.Role.ADMIN).values("team_id")
    admins = Membership.objects.filter(role=Membership.Role.ADMIN).values("user_id")
    return (
        users.filter(memberships__team_id__in=run, is_staff=False, is_superuser=False)
        .exclude(pk__in=admins)
        .distinct()
    )


def team_member_get_for_admin(admin, user_id):
    """The member `admin` manages on the team page; Http404 for anyone else."""
    try:
        return team_members_manageable_by(admin).get(pk=user_id)
    except (get_user_model().DoesNotExist, ValueError, TypeError):
        raise Http404("Not a member you manage") from None
